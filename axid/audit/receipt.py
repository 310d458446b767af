"""Receipts: the evidence a caller keeps of one recorded decision.

A receipt is the entry's seq, its leaf hash, the exact entry bytes that were
hashed and the signed checkpoint note (of a size > seq) that committed it. On
the wire it is the ``AXID-Receipt`` header, an RFC 8941 dictionary::

    AXID-Receipt: seq=N, leaf=:B64:, entry=:B64:, checkpoint=:B64:

Serialising is a format string (it runs on every governed response); parsing
(auditors, ``axid audit receipt check``) goes through ``http_sfv``, a
maintained RFC 8941 implementation, then checks each member strictly (byte
sequences must be canonical base64, as everywhere in the log's formats).

The auditor's check of a receipt against what the log answers is
:mod:`axid.audit.receipt_check`. Every error of both is a :class:`ReceiptError`.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Final

import http_sfv

from axid.audit.errors import AuditError
from axid.audit.merkle import HASH_SIZE, leaf_hash
from axid.audit.note import Checkpoint

__all__ = [
    "RECEIPT_HEADER",
    "Receipt",
    "ReceiptError",
    "checkpoint_of",
    "receipt_from_text",
]

RECEIPT_HEADER: Final = "AXID-Receipt"
_MEMBERS: Final = ("seq", "leaf", "entry", "checkpoint")
_MAX_ENTRY: Final = 64 * 1024
_MAX_HEADER: Final = 128 * 1024  # far above any real receipt (entries are a few KiB)
_HEADER_NAME: Final = "axid-receipt:"


class ReceiptError(AuditError, ValueError):
    """A receipt, or the log's answer about it, is malformed or not about this log."""


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
        return checkpoint_of(self.checkpoint).size

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
        auditor's to check (``axid audit receipt check``). Surrounding spaces
        and tabs (HTTP's OWS) are ignored; nothing else is.
        """
        raw = _header_bytes(value)
        d = http_sfv.Dictionary()
        try:
            d.parse(raw)
        except ValueError as e:
            raise ReceiptError(f"receipt header is not an RFC 8941 dictionary: {e}") from None
        if sorted(d.keys()) != sorted(_MEMBERS):
            raise ReceiptError(f"receipt header needs exactly the members {', '.join(_MEMBERS)}")
        seq = _item(d, "seq", int)
        if isinstance(seq, bool) or seq < 0:
            raise ReceiptError("receipt seq must be a non-negative integer")
        receipt = cls(
            seq=seq,
            leaf_hash=_bytes_item(d, raw, "leaf"),
            entry=_bytes_item(d, raw, "entry"),
            checkpoint=_bytes_item(d, raw, "checkpoint"),
        )
        receipt._check()
        return receipt

    def _check(self) -> None:
        if len(self.leaf_hash) != HASH_SIZE:
            raise ReceiptError(f"receipt leaf must be {HASH_SIZE} bytes")
        if len(self.entry) > _MAX_ENTRY:
            raise ReceiptError("receipt entry is too large")
        if not hmac.compare_digest(leaf_hash(self.entry), self.leaf_hash):
            raise ReceiptError("receipt leaf is not the hash of its entry bytes")
        if self.checkpoint_size <= self.seq:
            raise ReceiptError("receipt checkpoint does not cover its seq")


def receipt_from_text(text: str) -> Receipt:
    """A receipt from one line of text: ``AXID-Receipt: <value>`` or the bare value.

    The header name is matched without regard to case (HTTP field names are
    case-insensitive); one trailing line break is allowed, no other line.
    """
    if not isinstance(text, str):
        raise ReceiptError("receipt text must be str")
    line = text.removesuffix("\n").removesuffix("\r")
    if "\n" in line or "\r" in line:
        raise ReceiptError("receipt text must be one line (the header or its value)")
    if line[: len(_HEADER_NAME)].lower() == _HEADER_NAME:
        line = line[len(_HEADER_NAME) :]
    return Receipt.from_header(line)


def _header_bytes(value: object) -> bytes:
    if isinstance(value, str):
        if not value.isascii():
            raise ReceiptError("receipt header is not ASCII")
        value = value.encode("ascii")
    if not isinstance(value, bytes) or len(value) > _MAX_HEADER:
        raise ReceiptError("receipt header is not a string of acceptable size")
    return value.strip(b" \t")


def _item(d: http_sfv.Dictionary, name: str, kind: type) -> object:
    member = d[name]
    if not isinstance(member, http_sfv.Item) or member.params:
        raise ReceiptError(f"receipt member {name} must be a bare item without parameters")
    value = member.value
    if type(value) is not kind:
        raise ReceiptError(f"receipt member {name} must be {kind.__name__}")
    return value


def _bytes_item(d: http_sfv.Dictionary, raw: bytes, name: str) -> bytes:
    """A byte-sequence member whose base64 in ``raw`` is canonical.

    ``http_sfv`` decodes leniently (it ignores what follows padding and
    non-zero pad bits), so the canonical encoding of what it decoded must be
    what the header says.
    """
    value = _item(d, name, bytes)
    assert isinstance(value, bytes)
    if f"{name}=:{base64.b64encode(value).decode()}:".encode() not in raw:
        raise ReceiptError(f"receipt member {name} is not canonical base64")
    return value


def checkpoint_of(note: bytes) -> Checkpoint:
    """The checkpoint text of a signed note, without checking its signature."""
    try:
        text = note.decode("utf-8")
        body = text[: text.index("\n\n") + 1]
        return Checkpoint.parse(body)
    except (AttributeError, ValueError) as e:  # UnicodeDecodeError and NoteError are ValueErrors
        raise ReceiptError(f"not a checkpoint note: {e}") from None
