"""C2SP tlog-cosignature: witness keys, cosigning and checking cosignatures.

Two types, as the spec defines them:

- ``cosignature/v1`` (vkey type 0x04): Ed25519 over ``"cosignature/v1\\n"``,
  ``"time <T>\\n"`` and the whole checkpoint body;
- ``subtree/v1`` (vkey type 0x06): ML-DSA-44 over the binary
  ``cosigned_message`` (label, cosigner name, timestamp, origin, start=0,
  end=size, root hash).

The signature of a cosignature line is ``key ID (4) || u64 timestamp (big
endian) || signature``. Pure functions over bytes and strings: the witness
service signs with them, the log and the auditors check with them.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey, MLDSA44PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from axid.audit.errors import AuditError
from axid.audit.note import Checkpoint, NoteError, _b64decode_strict, is_valid_key_name

__all__ = [
    "COSIGNATURE_V1",
    "SUBTREE_V1",
    "CosignatureError",
    "WitnessKey",
    "WitnessSigner",
    "cosignature_lines",
    "cosigned_by",
    "signed_message",
    "verify_cosignature",
]

COSIGNATURE_V1: Final = 0x04  # Ed25519, cosignature/v1
SUBTREE_V1: Final = 0x06  # ML-DSA-44, subtree/v1
_SIZES: Final = {COSIGNATURE_V1: (32, 64), SUBTREE_V1: (1312, 2420)}  # public key, signature
_SIG_PREFIX: Final = "\u2014 "
_HEX_ID_RE: Final = re.compile(r"[0-9a-f]{8}")
_MAX_TIMESTAMP: Final = 2**63 - 1
_SUBTREE_LABEL: Final = b"subtree/v1\n\x00"


class CosignatureError(AuditError, ValueError):
    """A witness key or cosignature is malformed, or a cosignature does not verify."""


# --------------------------------------------------------------------------- keys


def _key_id(name: str, kind: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([kind]) + public).digest()[:4]


@dataclass(frozen=True)
class WitnessKey:
    """A witness's public key: name, type (0x04 or 0x06) and raw key bytes."""

    name: str
    kind: int
    public: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise CosignatureError(f"invalid witness key name {self.name!r}")
        sizes = _SIZES.get(self.kind)
        if sizes is None:
            raise CosignatureError(f"unsupported witness key type {self.kind:#04x}")
        if not isinstance(self.public, bytes) or len(self.public) != sizes[0]:
            raise CosignatureError(f"witness key of type {self.kind:#04x} must be {sizes[0]} bytes")

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, self.kind, self.public)

    @classmethod
    def from_vkey(cls, vkey: str) -> WitnessKey:
        """Parse ``name+hexid+base64(type || key)`` strictly (type 0x04 or 0x06)."""
        if not isinstance(vkey, str) or len(vkey) > 4096:
            raise CosignatureError("witness vkey must be a string of at most 4096 characters")
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or not _HEX_ID_RE.fullmatch(parts[1]):
            raise CosignatureError("malformed witness vkey: want name+keyid+key")
        name, hex_id, b64 = parts
        try:
            raw = _b64decode_strict(b64, "witness vkey key")
        except NoteError as e:
            raise CosignatureError(str(e)) from None
        if not raw:
            raise CosignatureError("malformed witness vkey: empty key")
        key = cls(name, raw[0], raw[1:])
        if key.key_id.hex() != hex_id:
            raise CosignatureError("witness vkey key id does not match the key")
        return key

    def vkey(self) -> str:
        raw = base64.b64encode(bytes([self.kind]) + self.public).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{raw}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            if self.kind == COSIGNATURE_V1:
                Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
            else:
                MLDSA44PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class WitnessSigner:
    """A witness's private key under its name; signs cosignature lines."""

    name: str
    private_key: Ed25519PrivateKey | MLDSA44PrivateKey = field(repr=False)

    def public(self) -> WitnessKey:
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        kind = COSIGNATURE_V1 if isinstance(self.private_key, Ed25519PrivateKey) else SUBTREE_V1
        return WitnessKey(self.name, kind, raw)

    def cosign(self, checkpoint: Checkpoint, timestamp: int) -> str:
        """One cosignature line (``— name base64(...)\\n``) on ``checkpoint``."""
        key = self.public()
        msg = signed_message(key, checkpoint, timestamp)
        sig = self.private_key.sign(msg)
        blob = key.key_id + struct.pack(">Q", timestamp) + sig
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(blob).decode('ascii')}\n"


# --------------------------------------------------------------------------- messages


def signed_message(key: WitnessKey, checkpoint: Checkpoint, timestamp: int) -> bytes:
    """What a cosignature of ``key``'s type signs over ``checkpoint`` at ``timestamp``."""
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise CosignatureError("cosignature timestamp must be an int")
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise CosignatureError("cosignature timestamp out of range")
    if key.kind == COSIGNATURE_V1:
        return f"cosignature/v1\ntime {timestamp}\n{checkpoint.to_text()}".encode()
    name, origin = key.name.encode("utf-8"), checkpoint.origin.encode("utf-8")
    if len(name) > 255 or len(origin) > 255:
        raise CosignatureError("subtree/v1 needs a cosigner name and an origin of <= 255 bytes")
    return b"".join(
        (
            _SUBTREE_LABEL,
            bytes([len(name)]) + name,
            struct.pack(">Q", timestamp),
            bytes([len(origin)]) + origin,
            struct.pack(">QQ", 0, checkpoint.size),
            checkpoint.root,
        )
    )


# --------------------------------------------------------------------------- checking


def verify_cosignature(line: str, checkpoint: Checkpoint, key: WitnessKey) -> int:
    """Check one cosignature line by ``key`` on ``checkpoint``; return its timestamp.

    Raises :class:`CosignatureError` if the line is not ``key``'s (name and key
    ID) or its signature does not verify.
    """
    name, blob = _split_line(line)
    if name != key.name or blob[:4] != key.key_id:
        raise CosignatureError(f"not a cosignature by {key.name}+{key.key_id.hex()}")
    sig_size = _SIZES[key.kind][1]
    if len(blob) != 4 + 8 + sig_size:
        raise CosignatureError(f"cosignature by {key.name} has the wrong length")
    (timestamp,) = struct.unpack(">Q", blob[4:12])
    if timestamp > _MAX_TIMESTAMP:
        raise CosignatureError("cosignature timestamp out of range")
    if not key.verify(signed_message(key, checkpoint, timestamp), blob[12:]):
        raise CosignatureError(f"invalid cosignature by {key.name}+{key.key_id.hex()}")
    return timestamp


def _split_line(line: str) -> tuple[str, bytes]:
    text = line[:-1] if line.endswith("\n") else line
    if not text.startswith(_SIG_PREFIX) or "\n" in text:
        raise CosignatureError("a signature line starts with an em dash and a space")
    name, sep, b64 = text[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not is_valid_key_name(name):
        raise CosignatureError("signature line: invalid key name")
    try:
        blob = _b64decode_strict(b64, "signature line")
    except NoteError as e:
        raise CosignatureError(str(e)) from None
    if len(blob) < 5:
        raise CosignatureError("signature line: signature too short")
    return name, blob


def cosignature_lines(note: bytes) -> list[str]:
    """The signature lines of a signed note (``— name base64\\n`` each), unverified."""
    try:
        text = note.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CosignatureError("note is not UTF-8") from e
    split = text.rfind("\n\n")
    if split < 0 or not text.endswith("\n"):
        raise CosignatureError("not a signed note")
    return [ln + "\n" for ln in text[split + 2 : -1].split("\n")]


def cosigned_by(note: bytes, checkpoint: Checkpoint, keys: list[WitnessKey]) -> frozenset[str]:
    """Names of the witnesses among ``keys`` whose cosignature on ``note`` verifies.

    A line that claims to be by a known key (its name and key ID) and does not
    verify raises :class:`CosignatureError`: that is tampering, not absence.
    Lines by unknown keys are ignored, as C2SP says.
    """
    known = {(k.name, k.key_id): k for k in keys}
    names: set[str] = set()
    for line in cosignature_lines(note):
        name, blob = _split_line(line)
        key = known.get((name, blob[:4]))
        if key is not None:
            verify_cosignature(line, checkpoint, key)
            names.add(name)
    return frozenset(names)
