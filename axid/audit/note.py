"""C2SP signed notes, tlog checkpoints and verifier keys (Ed25519 only).

Formats (pure, no I/O):

- signed note (c2sp.org/signed-note, golang.org/x/mod/sumdb/note): the text,
  ending in a newline, a blank line, then one or more lines
  ``"\u2014 <key name> <base64(4-byte key id || signature)>\\n"``;
- key id = SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4];
- verifier key (vkey): ``"<name>+<8 lowercase hex key id>+<base64(0x01 || public key)>"``;
- checkpoint (c2sp.org/tlog-checkpoint): the note text
  ``"<origin>\\n<decimal size>\\n<base64 root hash>\\n"`` plus optional
  non-empty extension lines.

Parsing is strict and fails closed with :class:`NoteError`. Deliberate
tightenings over the Go implementation: base64 must be canonical, the key id
in a vkey is lowercase hex, repeated signatures by one key (name and id) are
rejected instead of silently dropped, and a verifier list holding two
different keys under one name and key id is rejected as ambiguous.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from axid.audit.errors import AuditError

__all__ = [
    "ALG_ED25519",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "VerifiedNote",
    "is_valid_key_name",
    "key_id",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
]

ALG_ED25519 = 0x01
MAX_NOTE_SIZE = 1 << 20  # 1 MiB: far above any checkpoint, bounds parsing work
MAX_SIGNATURES = 100  # C2SP requires accepting >= 16; Go rejects > 100
_ED25519_SIG_SIZE = 64
_ED25519_KEY_SIZE = 32
_HASH_SIZE = 32
_SIG_PREFIX = "\u2014 "  # em dash, space
_SIZE_RE = re.compile(r"0|[1-9][0-9]*")
_HEX_ID_RE = re.compile(r"[0-9a-f]{8}")
_MAX_TREE_SIZE = 2**64 - 1


class NoteError(AuditError, ValueError):
    """A note, checkpoint, signature or verifier key is malformed or does not verify."""


# --------------------------------------------------------------------------- helpers


def is_valid_key_name(name: object) -> bool:
    """Key names are non-empty and hold no Unicode space and no ``+`` (C2SP)."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(c.isspace() for c in name)
        and not _has_control(name)
        and _is_utf8_encodable(name)
    )


def _has_control(s: str) -> bool:
    return any(c < " " for c in s)


def _is_utf8_encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _b64decode_strict(s: str, what: str) -> bytes:
    """Standard base64 with padding, canonical only (re-encodes to the same string)."""
    if not s or not s.isascii():
        raise NoteError(f"{what}: empty or non-ASCII base64")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise NoteError(f"{what}: invalid base64") from e
    if base64.b64encode(raw).decode("ascii") != s:
        raise NoteError(f"{what}: non-canonical base64")
    return raw


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte C2SP key id of an Ed25519 key under ``name``."""
    return hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + _raw_public_key(public_key)
    ).digest()[:4]


def _check_text(text: object) -> str:
    """Validate note text: str, ends in newline, UTF-8, no control chars but newline."""
    if not isinstance(text, str):
        raise NoteError(f"note text must be str, got {type(text).__name__}")
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if not _is_utf8_encodable(text):
        raise NoteError("note text is not valid UTF-8")
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("note text contains a control character")
    return text


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted Ed25519 note key: name, 4-byte key id and public key."""

    name: str
    key_id: bytes
    public_key: Ed25519PublicKey = field(repr=False)

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise NoteError(f"invalid key name {self.name!r}")
        if not isinstance(self.public_key, Ed25519PublicKey):
            raise NoteError("public key must be an Ed25519 public key")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != 4:
            raise NoteError("key id must be 4 bytes")
        # Key ids are identifiers, not secrets: a plain compare is fine.
        if self.key_id != key_id(self.name, self.public_key):
            raise NoteError(f"key id {self.key_id.hex()} does not match key {self.name!r}")

    @classmethod
    def from_public_key(cls, name: str, public_key: Ed25519PublicKey) -> NoteVerifier:
        if not is_valid_key_name(name):
            raise NoteError(f"invalid key name {name!r}")
        if not isinstance(public_key, Ed25519PublicKey):
            raise NoteError("public key must be an Ed25519 public key")
        return cls(name, key_id(name, public_key), public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``name+hexid+base64(0x01 || pubkey)`` strictly."""
        if not isinstance(vkey, str):
            raise NoteError(f"vkey must be str, got {type(vkey).__name__}")
        if len(vkey) > 1024:
            raise NoteError("vkey too long")
        # The name holds no '+' and the id is hex, so the first two '+' split;
        # the base64 key may itself contain '+'.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise NoteError("malformed vkey: want name+keyid+key")
        name, hex_id, b64 = parts
        if not is_valid_key_name(name):
            raise NoteError("malformed vkey: invalid key name")
        if not _HEX_ID_RE.fullmatch(hex_id):
            raise NoteError("malformed vkey: key id must be 8 lowercase hex digits")
        raw = _b64decode_strict(b64, "malformed vkey key")
        if len(raw) == 0:
            raise NoteError("malformed vkey: empty key")
        if raw[0] != ALG_ED25519:
            raise NoteError(f"unsupported vkey algorithm {raw[0]:#04x} (want 0x01 Ed25519)")
        if len(raw) != 1 + _ED25519_KEY_SIZE:
            raise NoteError(f"malformed vkey: Ed25519 key must be {_ED25519_KEY_SIZE} bytes")
        want = hashlib.sha256(name.encode("utf-8") + b"\n" + raw).digest()[:4]
        if bytes.fromhex(hex_id) != want:
            raise NoteError("vkey key id does not match the key")
        try:
            public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
        except ValueError as e:
            raise NoteError("malformed vkey: invalid Ed25519 public key") from e
        return cls(name, want, public_key)

    def vkey(self) -> str:
        raw = bytes([ALG_ED25519]) + _raw_public_key(self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(raw).decode('ascii')}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is this key's Ed25519 signature of ``message``."""
        if len(signature) != _ED25519_SIG_SIZE:
            return False
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class NoteSigner:
    """An Ed25519 note signing key under a key name (usually the log's origin)."""

    name: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise NoteError(f"invalid key name {self.name!r}")
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise NoteError("private key must be an Ed25519 private key")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.private_key.public_key())

    def verifier(self) -> NoteVerifier:
        return NoteVerifier.from_public_key(self.name, self.private_key.public_key())

    def vkey(self) -> str:
        return self.verifier().vkey()

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class VerifiedNote:
    """An opened note: its text and the key names whose signatures verified (in order)."""

    text: str
    verified_by: tuple[str, ...]


def sign_note(text: str, signer: NoteSigner) -> bytes:
    """Sign ``text`` (which must end in a newline) and return the encoded note."""
    text = _check_text(text)
    if not isinstance(signer, NoteSigner):
        raise TypeError("signer must be a NoteSigner")
    msg = text.encode("utf-8")
    sig = base64.b64encode(signer.key_id + signer.sign(msg)).decode("ascii")
    note = msg + b"\n" + f"{_SIG_PREFIX}{signer.name} {sig}\n".encode()
    if len(note) > MAX_NOTE_SIZE:
        raise NoteError(f"note larger than {MAX_NOTE_SIZE} bytes")
    return note


def _verifier_map(
    verifiers: Sequence[NoteVerifier],
) -> dict[tuple[str, bytes], NoteVerifier]:
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        if not isinstance(v, NoteVerifier):
            raise TypeError("verifiers must be NoteVerifier instances")
        k = (v.name, v.key_id)
        prev = known.get(k)
        if prev is not None and _raw_public_key(prev.public_key) != _raw_public_key(v.public_key):
            # Two keys colliding on name and id: the trust config is broken.
            raise NoteError(f"ambiguous verifier key {v.name}+{v.key_id.hex()}")
        known[k] = v
    return known


def open_note(note: bytes, verifiers: Sequence[NoteVerifier]) -> VerifiedNote:
    """Parse a signed note and verify it against trusted keys (C2SP signed-note).

    Signatures by unknown keys are ignored; every signature by a known key
    must verify, and at least one must exist.
    """
    if not isinstance(note, bytes):
        raise TypeError(f"note must be bytes, got {type(note).__name__}")
    known = _verifier_map(verifiers)
    if len(note) > MAX_NOTE_SIZE:
        raise NoteError(f"note larger than {MAX_NOTE_SIZE} bytes")
    try:
        s = note.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteError("note is not valid UTF-8") from e
    if any(c < " " and c != "\n" for c in s):
        raise NoteError("note contains a control character other than newline")
    # The text ends at the last blank line; the signature block has none.
    split = s.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, sig_block = s[: split + 1], s[split + 2 :]
    if not sig_block:
        raise NoteError("note has no signature lines")
    if not sig_block.endswith("\n"):
        raise NoteError("note does not end with a newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")

    parsed: list[tuple[str, bytes, bytes]] = []
    seen: set[tuple[str, bytes]] = set()
    for n, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"signature line {n} does not start with an em dash and a space")
        name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep or not is_valid_key_name(name):
            raise NoteError(f"signature line {n}: invalid key name")
        raw = _b64decode_strict(b64, f"signature line {n}")
        if len(raw) < 5:
            raise NoteError(f"signature line {n}: signature too short")
        kid, sig = raw[:4], raw[4:]
        if (name, kid) in seen:
            raise NoteError(f"signature line {n}: repeated signature by {name}+{kid.hex()}")
        seen.add((name, kid))
        parsed.append((name, kid, sig))

    msg = text.encode("utf-8")
    verified: list[str] = []
    for name, kid, sig in parsed:
        v = known.get((name, kid))
        if v is None:
            continue  # unknown key (even if name or id alone matches): ignored per C2SP
        if not v.verify(msg, sig):
            raise NoteError(f"invalid signature for key {name}+{kid.hex()}")
        verified.append(name)
    if not verified:
        raise NoteError("no known signature: note is not signed by a trusted key")
    return VerifiedNote(text=text, verified_by=tuple(verified))


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_origin(self.origin)
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= _MAX_TREE_SIZE
        ):
            raise NoteError(f"checkpoint size out of range: {self.size!r}")
        if not isinstance(self.root, bytes) or len(self.root) != _HASH_SIZE:
            raise NoteError(f"checkpoint root must be {_HASH_SIZE} bytes")
        if not isinstance(self.extensions, tuple):
            raise NoteError("checkpoint extensions must be a tuple of str")
        for ext in self.extensions:
            if (
                not isinstance(ext, str)
                or not ext
                or _has_control(ext)
                or not _is_utf8_encodable(ext)
            ):
                raise NoteError("checkpoint extension lines must be non-empty single lines")

    def to_text(self) -> str:
        root = base64.b64encode(self.root).decode("ascii")
        lines = (self.origin, str(self.size), root, *self.extensions)
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly (it must round-trip through ``to_text``)."""
        if not isinstance(text, str):
            raise NoteError(f"checkpoint text must be str, got {type(text).__name__}")
        if len(text) > MAX_NOTE_SIZE:
            raise NoteError("checkpoint text too large")
        if not text.endswith("\n"):
            raise NoteError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("checkpoint needs origin, size and root hash lines")
        origin, size_s, root_s, *exts = lines
        if not origin:
            raise NoteError("checkpoint origin is empty")
        if not _SIZE_RE.fullmatch(size_s):
            raise NoteError("checkpoint size is not a decimal without leading zeros")
        size = int(size_s)
        if size > _MAX_TREE_SIZE:
            raise NoteError("checkpoint size exceeds 2**64-1")
        root = _b64decode_strict(root_s, "checkpoint root hash")
        if len(root) != _HASH_SIZE:
            raise NoteError(f"checkpoint root hash must be {_HASH_SIZE} bytes")
        if any(not e for e in exts):
            raise NoteError("checkpoint extension lines must be non-empty")
        return cls(origin, size, root, tuple(exts))


def _check_origin(origin: object) -> None:
    if not isinstance(origin, str) or not origin:
        raise NoteError("checkpoint origin must be a non-empty str")
    if _has_control(origin) or not _is_utf8_encodable(origin):
        raise NoteError("checkpoint origin contains a control character or is not UTF-8")
    # C2SP only recommends a schema-less URL; leading/trailing spaces are
    # never meaningful and make two visually equal origins differ.
    if origin != origin.strip():
        raise NoteError("checkpoint origin has leading or trailing whitespace")


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> bytes:
    """The signed note of ``cp``."""
    if not isinstance(cp, Checkpoint):
        raise TypeError("cp must be a Checkpoint")
    return sign_note(cp.to_text(), signer)


def open_checkpoint(
    note: bytes, verifiers: Sequence[NoteVerifier], *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint and parse it; optionally require its origin."""
    opened = open_note(note, verifiers)
    cp = Checkpoint.parse(opened.text)
    if origin is not None and cp.origin != origin:
        raise NoteError(f"checkpoint origin {cp.origin!r} is not {origin!r}")
    return cp
