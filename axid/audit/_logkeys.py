"""The decision log's Ed25519 signing key files (re-exported by :mod:`axid.audit.store`)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.errors import AuditError
from axid.keys import KeyringError, read_private_key_file, write_private_key_file

__all__ = ["KEY_PASSPHRASE_ENV", "LogKeyError", "generate_log_key", "load_log_key"]

KEY_PASSPHRASE_ENV = "AXID_KEY_PASSPHRASE"  # noqa: S105 - an env var name, not a secret


class LogKeyError(AuditError, ValueError):
    """A log signing key file is missing, unsafe, unreadable or not Ed25519."""


def load_log_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the log's Ed25519 key (PEM PKCS#8, passphrase from ``AXID_KEY_PASSPHRASE``).

    The same file rules as the token keys (:func:`axid.keys.read_private_key_file`):
    refuses a symbolic link, a non-regular file, and any group/other access.
    """
    try:
        return read_private_key_file(path)
    except KeyringError as e:
        raise LogKeyError(f"log key {e}") from None


def generate_log_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Create a new Ed25519 log key at ``path`` (mode 0600, never overwriting),
    encrypted with ``AXID_KEY_PASSPHRASE`` when that is set."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    try:
        write_private_key_file(p, key)
    except KeyringError as e:
        raise LogKeyError(f"log key {e}") from None
    return key
