"""A witness's key directory, as ``axid witness init`` writes it::

    DIR/witness.key          Ed25519 private key, PEM PKCS#8, mode 0600
    DIR/witness.vkey         its C2SP vkey (type 0x04, cosignature/v1) and a newline
    DIR/witness-mldsa.key    with --ml-dsa: ML-DSA-44 private key, PEM PKCS#8, 0600
    DIR/witness-mldsa.vkey   its vkey (type 0x06, subtree/v1)

Private keys are encrypted with ``AXID_KEY_PASSPHRASE`` when that variable is set
(as every AXID key file). Files are created exclusively (never overwritten) and
read only when they are regular files, not symlinks, without group/other access.
A key file and its vkey must agree, or loading fails.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey

from axid.audit.cosignature import CosignatureError, WitnessKey, WitnessSigner
from axid.audit.note import is_valid_key_name
from axid.witness.errors import WitnessError

__all__ = [
    "ED25519_FILES",
    "MLDSA_FILES",
    "PASSPHRASE_ENV",
    "WitnessKeyError",
    "check_name",
    "init_keys",
    "load_signers",
]

PASSPHRASE_ENV: Final = "AXID_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
ED25519_FILES: Final = ("witness.key", "witness.vkey")
MLDSA_FILES: Final = ("witness-mldsa.key", "witness-mldsa.vkey")
_MAX_FILE: Final = 64 * 1024
_MAX_NAME_BYTES: Final = 255  # subtree/v1 carries the name in a <1..2^8-1> vector

PrivateKey = Ed25519PrivateKey | MLDSA44PrivateKey


class WitnessKeyError(WitnessError):
    """A witness key directory cannot be written or read (the message names the file)."""


@dataclass(frozen=True)
class _Pair:
    key: Path
    vkey: Path


def _pairs(directory: Path, ml_dsa: bool) -> list[_Pair]:
    files = [ED25519_FILES, MLDSA_FILES] if ml_dsa else [ED25519_FILES]
    return [_Pair(directory / k, directory / v) for k, v in files]


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def check_name(name: str) -> str:
    """A witness name: a C2SP key name of at most 255 UTF-8 bytes."""
    if not is_valid_key_name(name) or len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise WitnessKeyError(
            "witness name must be a non-empty key name without spaces or '+',"
            f" at most {_MAX_NAME_BYTES} bytes (e.g. witness.example.org/w1)"
        )
    return name


# --------------------------------------------------------------------------- writing


def _write_new(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise WitnessKeyError(f"{path}: exists; refusing to overwrite") from None
    except OSError as exc:
        raise WitnessKeyError(f"{path}: cannot create ({exc.strerror})") from None
    try:
        os.fchmod(fd, mode)  # the umask can only narrow the mode; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def init_keys(directory: Path, name: str, *, ml_dsa: bool = False) -> list[WitnessKey]:
    """Create the witness's keys in ``directory`` (made 0700 if missing); refuse to
    overwrite any of the files. Returns the public keys (Ed25519 first)."""
    check_name(name)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise WitnessKeyError(f"{directory}: cannot create ({exc.strerror})") from None
    pairs = _pairs(directory, ml_dsa)
    for p in pairs:
        for path in (p.key, p.vkey):
            if path.exists() or path.is_symlink():
                raise WitnessKeyError(f"{path}: exists; refusing to overwrite")
    passphrase = _passphrase()
    out: list[WitnessKey] = []
    for p, key in zip(pairs, _new_keys(ml_dsa), strict=True):
        public = WitnessSigner(name, key).public()
        _write_new(p.key, _pem(key, passphrase), 0o600)
        _write_new(p.vkey, (public.vkey() + "\n").encode("ascii"), 0o644)
        out.append(public)
    return out


def _new_keys(ml_dsa: bool) -> list[PrivateKey]:
    keys: list[PrivateKey] = [Ed25519PrivateKey.generate()]
    if ml_dsa:
        keys.append(MLDSA44PrivateKey.generate())
    return keys


# --------------------------------------------------------------------------- reading


def _read(path: Path, *, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise WitnessKeyError(f"{path}: missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WitnessKeyError(f"{path}: is a symbolic link; refusing") from None
        raise WitnessKeyError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE:
            raise WitnessKeyError(f"{path}: not a regular file of at most {_MAX_FILE} bytes")
        if private and info.st_mode & 0o077:
            raise WitnessKeyError(
                f"{path}: mode {stat.S_IMODE(info.st_mode):04o} gives group/other access;"
                " refusing (chmod 600)"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(_MAX_FILE + 1)
    finally:
        os.close(fd)


def _load_private(path: Path, passphrase: bytes | None) -> PrivateKey:
    pem = _read(path, private=True)
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise WitnessKeyError(f"{path}: encrypted and {PASSPHRASE_ENV} is not set") from None
        raise WitnessKeyError(
            f"{path}: {PASSPHRASE_ENV} is set but the key is not encrypted"
        ) from None
    except Exception:  # cryptography raises assorted errors on garbage or a wrong passphrase
        if passphrase is not None and b"ENCRYPTED" in pem:
            raise WitnessKeyError(f"{path}: wrong passphrase ({PASSPHRASE_ENV})") from None
        raise WitnessKeyError(f"{path}: not a PEM PKCS#8 private key") from None
    if not isinstance(key, Ed25519PrivateKey | MLDSA44PrivateKey):
        raise WitnessKeyError(f"{path}: not an Ed25519 or ML-DSA-44 private key")
    return key


def _load_pair(pair: _Pair, passphrase: bytes | None) -> WitnessSigner:
    try:
        text = _read(pair.vkey, private=False).decode("ascii").removesuffix("\n")
        public = WitnessKey.from_vkey(text)
    except (UnicodeDecodeError, CosignatureError) as exc:
        raise WitnessKeyError(f"{pair.vkey}: not a witness vkey ({exc})") from None
    key = _load_private(pair.key, passphrase)
    signer = WitnessSigner(public.name, key)
    if signer.public() != public:
        raise WitnessKeyError(f"{pair.key}: does not match {pair.vkey.name}")
    return signer


def load_signers(directory: Path) -> list[WitnessSigner]:
    """The witness's signers from ``directory``: Ed25519, then ML-DSA-44 when present.

    Both keys must carry the same witness name."""
    passphrase = _passphrase()
    signers = [_load_pair(_pairs(directory, False)[0], passphrase)]
    ml = _pairs(directory, True)[1]
    if ml.key.exists() or ml.vkey.exists() or ml.key.is_symlink() or ml.vkey.is_symlink():
        signers.append(_load_pair(ml, passphrase))
        if signers[1].name != signers[0].name:
            raise WitnessKeyError(f"{directory}: the two witness keys have different names")
    return signers
