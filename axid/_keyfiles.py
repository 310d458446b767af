"""Private key files: passphrases, exclusive creation, atomic replacement, strict reading.

Split from :mod:`axid.keys` (which re-exports the public names here). A private
file is never followed through a symlink, never readable by group or other, and
never overwritten in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid._keyset import KeyringError

__all__ = ["PASSPHRASE_ENV", "read_private_key_file", "write_private_key_file"]

PASSPHRASE_ENV: Final = "AXID_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
_MAX_KEY_FILE_BYTES: Final = 64 * 1024


_FROM_ENV: Final[Any] = object()


def _passphrase_from_env() -> bytes | None:
    # An empty variable is treated as unset: an empty passphrase cannot encrypt.
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def _resolve_passphrase(passphrase: object) -> bytes | None:
    if passphrase is _FROM_ENV:
        return _passphrase_from_env()
    if passphrase is None:
        return None
    if not isinstance(passphrase, bytes) or not passphrase:
        raise TypeError("passphrase must be non-empty bytes or None")
    return passphrase


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a 0600 temp file + fsync + os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` (0600) holding ``data``; never replaces an existing file.

    Written to a private temporary file and hard-linked into place, so a concurrent
    reader never sees a partial key and an existing key is never overwritten.
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise KeyringError(f"{path}: cannot create ({exc.strerror})") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails if path exists
        except FileExistsError:
            raise KeyringError(f"{path}: exists; refusing to overwrite a key") from None
        except OSError as exc:
            raise KeyringError(f"{path}: cannot create ({exc.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _read_private_file(path: Path, max_bytes: int, forbidden_bits: int = 0o077) -> bytes:
    """Read a secret-holding file, refusing symlinks, non-regular files, group/other bits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyringError(f"{path}: missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyringError(f"{path}: is a symbolic link; refusing") from None
        raise KeyringError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyringError(f"{path}: not a regular file")
        if info.st_mode & forbidden_bits:
            raise KeyringError(
                f"{path}: mode {stat.S_IMODE(info.st_mode):04o} gives group/other access;"
                " refusing (chmod 600)"
            )
        if info.st_size > max_bytes:
            raise KeyringError(f"{path}: larger than {max_bytes} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)


def _encode_private_key(private_key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _decode_private_key(pem: bytes, passphrase: bytes | None, path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError:
        # cryptography: a password for an unencrypted key, or none for an encrypted one.
        if passphrase is None:
            raise KeyringError(
                f"{path}: key is encrypted and {PASSPHRASE_ENV} is not set"
            ) from None
        raise KeyringError(
            f"{path}: {PASSPHRASE_ENV} is set but the key is not encrypted; refusing"
        ) from None
    except ValueError:
        if passphrase is not None and b"ENCRYPTED" in pem:
            raise KeyringError(f"{path}: wrong passphrase ({PASSPHRASE_ENV})") from None
        raise KeyringError(f"{path}: not a PEM PKCS8 private key") from None
    except Exception:  # cryptography raises assorted errors on garbage input
        raise KeyringError(f"{path}: not a PEM PKCS8 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyringError(f"{path}: not an Ed25519 private key")
    return key


def read_private_key_file(
    path: str | os.PathLike[str], *, passphrase: bytes | Any | None = _FROM_ENV
) -> Ed25519PrivateKey:
    """Load one Ed25519 private key file (PEM PKCS8; passphrase from ``AXID_KEY_PASSPHRASE``
    unless given). Refuses symlinks, non-regular files and any group/other access."""
    p = Path(path)
    pem = _read_private_file(p, _MAX_KEY_FILE_BYTES)
    return _decode_private_key(pem, _resolve_passphrase(passphrase), p)


def write_private_key_file(
    path: str | os.PathLike[str],
    private_key: Ed25519PrivateKey,
    *,
    passphrase: bytes | Any | None = _FROM_ENV,
) -> None:
    """Write a new key file (0600, encrypted when a passphrase is set); never overwrites."""
    p = Path(path)
    _write_new_private_file(p, _encode_private_key(private_key, _resolve_passphrase(passphrase)))
