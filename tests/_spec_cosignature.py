"""C2SP tlog-cosignature and signed-note, written from the spec texts alone (test oracle).

Deliberately independent of ``axid.audit.cosignature``: built with hashlib,
struct, base64 and cryptography only, from these passages:

- signed-note: a signature line is ``"\u2014 " <key name> " " base64(4-byte key ID ||
  signature) "\\n"``; ``key ID = SHA-256(key name || 0x0A || signature type ||
  public key)[:4]``; a vkey is ``<name>+<hex key ID>+<base64(type || public key)>``.
- tlog-cosignature: the key ID of an Ed25519 cosigner uses type 0x04 and the
  32-byte key, of an ML-DSA-44 cosigner type 0x06 and the 1312-byte key. The
  signature is a ``timestamped_signature``: ``u64 timestamp`` (big endian), then
  the 64-byte Ed25519 or 2420-byte ML-DSA-44 signature.
- Ed25519 signed message: ``"cosignature/v1\\n"``, ``"time <T>\\n"`` (decimal, no
  leading zeroes), then the whole checkpoint body with its final newline.
- ML-DSA-44 signed message: the ``cosigned_message`` struct (RFC 8446
  presentation language): ``uint8 label[12] = "subtree/v1\\n\\0"``, ``opaque
  cosigner_name<1..2^8-1>`` (one length byte), ``uint64 timestamp``, ``opaque
  log_origin<1..2^8-1>``, ``uint64 start`` (0 for a checkpoint), ``uint64 end``
  (the tree size), ``uint8 hash[32]`` (the root).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PublicKey

EM_DASH = "\u2014"
TYPE_ED25519_COSIGNATURE = 0x04
TYPE_MLDSA44_SUBTREE = 0x06


class SpecError(AssertionError):
    """The cosignature does not meet the spec."""


@dataclass(frozen=True)
class SpecKey:
    name: str
    kind: int
    public: bytes

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(
            self.name.encode() + b"\x0a" + bytes([self.kind]) + self.public
        ).digest()[:4]


def parse_vkey(vkey: str) -> SpecKey:
    name, hex_id, b64 = vkey.strip().split("+", 2)
    raw = base64.b64decode(b64, validate=True)
    key = SpecKey(name, raw[0], raw[1:])
    want_len = {TYPE_ED25519_COSIGNATURE: 32, TYPE_MLDSA44_SUBTREE: 1312}[key.kind]
    if len(key.public) != want_len or key.key_id.hex() != hex_id:
        raise SpecError(f"bad vkey {vkey!r}")
    return key


def checkpoint_fields(body: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint body (the note text)."""
    origin, size, root = body.split("\n")[:3]
    return origin, int(size), base64.b64decode(root, validate=True)


def ed25519_message(body: str, timestamp: int) -> bytes:
    return b"cosignature/v1\n" + f"time {timestamp}\n".encode() + body.encode()


def subtree_message(name: str, body: str, timestamp: int) -> bytes:
    origin, size, root = checkpoint_fields(body)
    n, o = name.encode(), origin.encode()
    return (
        b"subtree/v1\n\x00"
        + bytes([len(n)])
        + n
        + struct.pack(">Q", timestamp)
        + bytes([len(o)])
        + o
        + struct.pack(">Q", 0)
        + struct.pack(">Q", size)
        + root
    )


def verify_line(line: str, body: str, key: SpecKey) -> int:
    """Check one cosignature line (with or without its newline) by ``key`` on the
    checkpoint ``body``; return its timestamp, or raise :class:`SpecError`."""
    prefix = f"{EM_DASH} {key.name} "
    if not line.startswith(prefix):
        raise SpecError(f"not a line by {key.name}: {line!r}")
    blob = base64.b64decode(line[len(prefix) :].rstrip("\n"), validate=True)
    if blob[:4] != key.key_id:
        raise SpecError("wrong key ID")
    (timestamp,) = struct.unpack(">Q", blob[4:12])
    signature = blob[12:]
    try:
        if key.kind == TYPE_ED25519_COSIGNATURE:
            if len(signature) != 64:
                raise SpecError("Ed25519 signature is not 64 bytes")
            Ed25519PublicKey.from_public_bytes(key.public).verify(
                signature, ed25519_message(body, timestamp)
            )
        else:
            if len(signature) != 2420:
                raise SpecError("ML-DSA-44 signature is not 2420 bytes")
            MLDSA44PublicKey.from_public_bytes(key.public).verify(
                signature, subtree_message(key.name, body, timestamp)
            )
    except InvalidSignature:
        raise SpecError(f"cosignature by {key.name} does not verify") from None
    return timestamp
