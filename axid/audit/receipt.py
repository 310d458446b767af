"""Receipts: the evidence a caller keeps of one recorded decision.

A receipt is the entry's seq, its leaf hash, the exact entry bytes that were
hashed and the signed checkpoint note (of a size > seq) that committed it. On
the wire it is the ``AXID-Receipt`` header, an RFC 8941 dictionary::

    AXID-Receipt: seq=N, leaf=:B64:, entry=:B64:, checkpoint=:B64:

Serialising is a format string (it runs on every governed response); parsing
(auditors, ``axid audit receipt check``) goes through ``http_sfv``, a
maintained RFC 8941 implementation, then checks each member strictly.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Final

import http_sfv

from axid.audit.merkle import HASH_SIZE, leaf_hash
from axid.audit.note import Checkpoint, NoteError

__all__ = ["RECEIPT_HEADER", "Receipt", "ReceiptError"]

RECEIPT_HEADER: Final = "AXID-Receipt"
_MEMBERS: Final = ("seq", "leaf", "entry", "checkpoint")
_MAX_ENTRY: Final = 64 * 1024
_MAX_HEADER: Final = 128 * 1024  # far above any real receipt (entries are a few KiB)


class ReceiptError(ValueError):
    """A receipt header is malformed or does not hold together."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof of commit: the entry's position, leaf hash and bytes, and its checkpoint."""

    seq: int
    leaf_hash: bytes
    entry: bytes
    checkpoint: bytes  # the signed checkpoint note, as stored

    @property
    def checkpoint_size(self) -> int:
        """The size of the checkpoint that committed the entry (its note's text, unverified)."""
        return _checkpoint_of(self.checkpoint).size

    def header_value(self) -> str:
        """The ``AXID-Receipt`` header value (an RFC 8941 dictionary)."""
        b64 = base64.b64encode
        return (
            f"seq={self.seq}, leaf=:{b64(self.leaf_hash).decode()}:, "
            f"entry=:{b64(self.entry).decode()}:, checkpoint=:{b64(self.checkpoint).decode()}:"
        )

    @classmethod
    def from_header(cls, value: str | bytes) -> Receipt:
        """Parse an ``AXID-Receipt`` header value strictly.

        Checks the form only, and that the leaf hash is the entry's and the
        checkpoint's size covers the seq; the checkpoint's signature is the
        auditor's to check (``axid audit receipt check``).
        """
        raw = value.encode("latin-1") if isinstance(value, str) else value
        if not isinstance(raw, bytes) or len(raw) > _MAX_HEADER:
            raise ReceiptError("receipt header is not a string of acceptable size")
        d = http_sfv.Dictionary()
        try:
            d.parse(raw.strip())
        except ValueError as e:
            raise ReceiptError(f"receipt header is not an RFC 8941 dictionary: {e}") from None
        if sorted(d.keys()) != sorted(_MEMBERS):
            raise ReceiptError(f"receipt header needs exactly the members {', '.join(_MEMBERS)}")
        seq = _item(d, "seq", int)
        if isinstance(seq, bool) or seq < 0:
            raise ReceiptError("receipt seq must be a non-negative integer")
        receipt = cls(
            seq=seq,
            leaf_hash=_item(d, "leaf", bytes),
            entry=_item(d, "entry", bytes),
            checkpoint=_item(d, "checkpoint", bytes),
        )
        receipt._check()
        return receipt

    def _check(self) -> None:
        if len(self.leaf_hash) != HASH_SIZE:
            raise ReceiptError(f"receipt leaf must be {HASH_SIZE} bytes")
        if not hmac.compare_digest(leaf_hash(self.entry), self.leaf_hash):
            raise ReceiptError("receipt leaf is not the hash of its entry bytes")
        if len(self.entry) > _MAX_ENTRY:
            raise ReceiptError("receipt entry is too large")
        if self.checkpoint_size <= self.seq:
            raise ReceiptError("receipt checkpoint does not cover its seq")


def _item(d: http_sfv.Dictionary, name: str, kind: type) -> object:
    member = d[name]
    if not isinstance(member, http_sfv.Item) or member.params:
        raise ReceiptError(f"receipt member {name} must be a bare item without parameters")
    value = member.value
    if type(value) is not kind:
        raise ReceiptError(f"receipt member {name} must be {kind.__name__}")
    return value


def _checkpoint_of(note: bytes) -> Checkpoint:
    """The checkpoint text of a signed note, without checking its signature."""
    try:
        text = note.decode("utf-8")
        body = text[: text.index("\n\n") + 1]
        return Checkpoint.parse(body)
    except (UnicodeDecodeError, ValueError, NoteError) as e:
        raise ReceiptError(f"receipt checkpoint is not a checkpoint note: {e}") from None
