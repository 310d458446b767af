"""Ed25519 signing keys for action tokens: the on-disk keyring and its rotation.

Thumbprints, JWKs and the KeySet live in :mod:`axid._keyset`, key files and
passphrases in :mod:`axid._keyfiles`; their public names are re-exported here.

Layout of a keyring directory (default ``.axid/keys/``)::

    DIR/keyring.json   key states and timestamps, no key material (written atomically)
    DIR/<kid>.pem      PKCS8 PEM private key, mode 0600, encrypted with
                       AXID_KEY_PASSPHRASE when that variable is set
    DIR/.lock          flock()ed while the keyring is rotated

A key's state is derived from its timestamps and the clock, never stored, so a
state change needs no write (and cannot be lost):

* ``next``: published (in the JWKS) but not yet signing: ``published_at <= now <
  active_from``. ``rotate`` sets ``active_from = now + publish_lead`` so every
  verifier's JWKS cache has seen the key before the first token it signs.
* ``current``: the newest key with ``active_from <= now``; the only one that signs.
* ``retired``: a newer key became current at ``retired_at``; still published while
  a token it signed may be accepted: ``now < retired_at + max_token_ttl + leeway``.
* ``expired``: past that point; left out of the JWKS (its file stays on disk).

The ``kid`` is the RFC 7638 thumbprint of the public key, so a JWKS member can be
checked against its own key material and file names need no escaping.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hmac
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid._keyfiles import (
    _FROM_ENV,
    _MAX_KEY_FILE_BYTES,
    PASSPHRASE_ENV,
    _atomic_write,
    _decode_private_key,
    _encode_private_key,
    _read_private_file,
    _resolve_passphrase,
    _write_new_private_file,
    read_private_key_file,
    write_private_key_file,
)
from axid._keyset import (
    KeyringError,
    KeySet,
    SigningKey,
    _strict_json_loads,
    b64url_decode,
    b64url_encode,
    jwk_thumbprint,
    public_jwk,
)
from mtls._files import file_stamp

__all__ = [
    "DEFAULT_KEYS_DIR",
    "DEFAULT_PUBLISH_LEAD",
    "KEYRING_FILE",
    "PASSPHRASE_ENV",
    "KeyInfo",
    "KeySet",
    "KeyState",
    "Keyring",
    "KeyringError",
    "SigningKey",
    "b64url_decode",
    "b64url_encode",
    "jwk_thumbprint",
    "public_jwk",
    "read_private_key_file",
    "write_private_key_file",
]

DEFAULT_KEYS_DIR: Final = Path(".axid/keys")
KEYRING_FILE: Final = "keyring.json"
# Longer than the verifiers' JWKS cache lifetime (DESIGN.md: default 330 s).
DEFAULT_PUBLISH_LEAD: Final = 330.0
_DEFAULT_MAX_TOKEN_TTL: Final = 300.0
_DEFAULT_LEEWAY: Final = 30.0

_MAX_KEYRING_FILE_BYTES: Final = 1024 * 1024
_KID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_KEYRING_VERSION: Final = 1


# --------------------------------------------------------------------------- keyring


class KeyState(enum.StrEnum):
    CURRENT = "current"
    NEXT = "next"
    RETIRED = "retired"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the keyring knows about one key at a given time (no key material)."""

    kid: str
    state: KeyState
    published_at: float
    active_from: float
    retired_at: float | None
    # When the key leaves the JWKS (retired_at + max_token_ttl + leeway), if retired.
    unpublish_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "state": str(self.state),
            "published_at": self.published_at,
            "active_from": self.active_from,
            "retired_at": self.retired_at,
            "unpublish_at": self.unpublish_at,
        }


@dataclass(frozen=True, slots=True)
class _Record:
    kid: str
    published_at: float
    active_from: float


def _check_time(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return float(value)


class Keyring:
    """The issuer's Ed25519 keys on disk, with publish-then-use rotation.

    Times are Unix seconds passed in by the caller (``now``), so the lifecycle is
    tested with a fake clock. ``load`` decrypts every key once and keeps the key
    objects in memory; ``signing_key`` and ``jwks`` do no I/O.
    """

    def __init__(
        self,
        directory: Path,
        records: list[_Record],
        keys: dict[str, SigningKey],
        passphrase: bytes | None,
        stamp: tuple[int, int, int] | None,
    ) -> None:
        self._dir = directory
        self._records = records
        self._keys = keys
        self._passphrase = passphrase
        self._stamp = stamp

    def __repr__(self) -> str:
        return f"Keyring({str(self._dir)!r}, kids={[r.kid for r in self._records]!r})"

    @property
    def directory(self) -> Path:
        return self._dir

    # ----------------------------------------------------------------- create / load

    @classmethod
    def init(
        cls, directory: str | os.PathLike[str], *, now: float, passphrase: Any = _FROM_ENV
    ) -> Keyring:
        """Create a keyring with one key, current from ``now``. Refuses an existing one."""
        now = _check_time(now, "now")
        secret = _resolve_passphrase(passphrase)
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(path):
            if (path / KEYRING_FILE).exists():
                raise KeyringError(f"{path / KEYRING_FILE} already exists; refusing to init")
            key = Ed25519PrivateKey.generate()
            signing = SigningKey.from_private_key(key)
            _write_new_private_file(path / f"{signing.kid}.pem", _encode_private_key(key, secret))
            records = [_Record(signing.kid, now, now)]
            _atomic_write(path / KEYRING_FILE, _dump_records(records))
            stamp = file_stamp(path / KEYRING_FILE, only_missing=True)
        return cls(path, records, {signing.kid: signing}, secret, stamp)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, passphrase: Any = _FROM_ENV) -> Keyring:
        """Load ``keyring.json`` and every key it names (passphrase from the env by default)."""
        secret = _resolve_passphrase(passphrase)
        path = Path(directory)
        records, keys, stamp = _load_state(path, secret)
        return cls(path, records, keys, secret, stamp)

    def reload_if_changed(self) -> bool:
        """Re-read the keyring if ``keyring.json`` changed on disk (e.g. ``axid keys rotate``
        ran in another process). Returns True if it reloaded. On error the old state
        is kept and the error raised."""
        stamp = file_stamp(self._dir / KEYRING_FILE, only_missing=True)
        if stamp == self._stamp:
            return False
        records, keys, stamp = _load_state(self._dir, self._passphrase)
        self._records, self._keys, self._stamp = records, keys, stamp
        return True

    # ----------------------------------------------------------------- rotation

    def rotate(self, now: float, *, publish_lead: float = DEFAULT_PUBLISH_LEAD) -> str:
        """Create the ``next`` key: published at ``now``, signing from ``now + publish_lead``.

        Refuses while a previous ``next`` key is still pending. Reads the on-disk state
        under a lock first, so two processes cannot both rotate from a stale view.
        """
        now = _check_time(now, "now")
        publish_lead = _check_time(publish_lead, "publish_lead")
        if publish_lead < 0:
            raise ValueError("publish_lead must be >= 0")
        with _locked(self._dir):
            records, keys, _ = _load_state(self._dir, self._passphrase)
            newest = records[-1]
            if newest.active_from > now:
                raise KeyringError(
                    f"key {newest.kid} is still pending (signs from {newest.active_from});"
                    " refusing to rotate again before then"
                )
            if newest.published_at > now:
                raise KeyringError("the clock is before the newest key's publication")
            if now + publish_lead <= newest.active_from:
                raise KeyringError(
                    "the new key must activate later than the current one"
                    " (clock behind, or publish_lead 0 at the same instant)"
                )
            key = Ed25519PrivateKey.generate()
            signing = SigningKey.from_private_key(key)
            _write_new_private_file(
                self._dir / f"{signing.kid}.pem", _encode_private_key(key, self._passphrase)
            )
            records = [*records, _Record(signing.kid, now, now + publish_lead)]
            _atomic_write(self._dir / KEYRING_FILE, _dump_records(records))
            keys[signing.kid] = signing
            self._records, self._keys = records, keys
            self._stamp = file_stamp(self._dir / KEYRING_FILE, only_missing=True)
        return signing.kid

    # ----------------------------------------------------------------- queries

    def _current_index(self, now: float) -> int:
        current = -1
        for index, record in enumerate(self._records):
            if record.active_from <= now:
                current = index
        return current

    def signing_key(self, now: float) -> SigningKey:
        """The key that signs at ``now``: the newest one whose ``active_from`` has passed."""
        index = self._current_index(now)
        if index < 0:
            raise KeyringError("no key is active at this time (clock before the keyring?)")
        return self._keys[self._records[index].kid]

    def keys(
        self,
        now: float,
        *,
        max_token_ttl: float = _DEFAULT_MAX_TOKEN_TTL,
        leeway: float = _DEFAULT_LEEWAY,
    ) -> list[KeyInfo]:
        """Every key with its state at ``now``, oldest first."""
        current = self._current_index(now)
        infos: list[KeyInfo] = []
        for index, record in enumerate(self._records):
            retired_at: float | None = None
            unpublish_at: float | None = None
            if index < current:
                # Retired when the next key in line became current.
                retired_at = self._records[index + 1].active_from
                unpublish_at = retired_at + max_token_ttl + leeway
                state = KeyState.RETIRED if now < unpublish_at else KeyState.EXPIRED
            elif index == current:
                state = KeyState.CURRENT
            else:
                state = KeyState.NEXT
            infos.append(
                KeyInfo(
                    record.kid,
                    state,
                    record.published_at,
                    record.active_from,
                    retired_at,
                    unpublish_at,
                )
            )
        return infos

    def _published(self, now: float, max_token_ttl: float, leeway: float) -> list[str]:
        order = {KeyState.CURRENT: 0, KeyState.NEXT: 1, KeyState.RETIRED: 2}
        infos = [
            info
            for info in self.keys(now, max_token_ttl=max_token_ttl, leeway=leeway)
            if info.state is not KeyState.EXPIRED
        ]
        infos.sort(key=lambda info: (order[info.state], -info.active_from))
        return [info.kid for info in infos]

    def jwks(
        self,
        now: float,
        *,
        max_token_ttl: float = _DEFAULT_MAX_TOKEN_TTL,
        leeway: float = _DEFAULT_LEEWAY,
    ) -> dict[str, list[dict[str, str]]]:
        """Current + next + retired keys whose last possible token may still be accepted."""
        return {
            "keys": [
                public_jwk(self._keys[kid].public_key)
                for kid in self._published(now, max_token_ttl, leeway)
            ]
        }

    def key_set(
        self,
        now: float,
        *,
        max_token_ttl: float = _DEFAULT_MAX_TOKEN_TTL,
        leeway: float = _DEFAULT_LEEWAY,
    ) -> KeySet:
        """The published keys as a :class:`KeySet` (what the issuer verifies with)."""
        return KeySet(
            {kid: self._keys[kid].public_key for kid in self._published(now, max_token_ttl, leeway)}
        )


# --------------------------------------------------------------------------- state file


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _dump_records(records: list[_Record]) -> bytes:
    doc = {
        "version": _KEYRING_VERSION,
        "keys": [
            {"kid": r.kid, "published_at": r.published_at, "active_from": r.active_from}
            for r in records
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _parse_records(data: bytes, path: Path) -> list[_Record]:
    try:
        doc = _strict_json_loads(data, str(path))
    except KeyringError as exc:
        raise KeyringError(str(exc)) from None
    if not isinstance(doc, dict) or set(doc) != {"version", "keys"}:
        raise KeyringError(f"{path}: expected an object with 'version' and 'keys'")
    if doc["version"] != _KEYRING_VERSION or isinstance(doc["version"], bool):
        raise KeyringError(f"{path}: unsupported version {doc['version']!r}")
    entries = doc["keys"]
    if not isinstance(entries, list) or not entries:
        raise KeyringError(f"{path}: 'keys' must be a non-empty array")
    records: list[_Record] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"kid", "published_at", "active_from"}:
            raise KeyringError(f"{path}: key #{index} must have kid, published_at, active_from")
        kid = entry["kid"]
        # The kid becomes a file name: only a well-formed thumbprint may.
        if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None or kid in seen:
            raise KeyringError(f"{path}: key #{index} has an invalid or duplicate kid")
        seen.add(kid)
        try:
            published_at = _check_time(entry["published_at"], "published_at")
            active_from = _check_time(entry["active_from"], "active_from")
        except ValueError as exc:
            raise KeyringError(f"{path}: key #{index}: {exc}") from None
        if active_from < published_at:
            raise KeyringError(f"{path}: key #{index} is active before it is published")
        if records and active_from <= records[-1].active_from:
            raise KeyringError(f"{path}: keys are not in activation order")
        records.append(_Record(kid, published_at, active_from))
    return records


def _load_state(
    directory: Path, passphrase: bytes | None
) -> tuple[list[_Record], dict[str, SigningKey], tuple[int, int, int] | None]:
    state_path = directory / KEYRING_FILE
    stamp = file_stamp(state_path, only_missing=True)
    if stamp is None:
        raise KeyringError(f"{state_path}: missing (run `axid keys init`)")
    # Others who can write the directory could swap keys or states: refuse.
    if os.stat(directory).st_mode & 0o022:
        raise KeyringError(f"{directory}: writable by group/other; refusing (chmod 700)")
    # keyring.json holds no secret, but whoever can write it controls which key signs.
    state_data = _read_private_file(state_path, _MAX_KEYRING_FILE_BYTES, forbidden_bits=0o022)
    records = _parse_records(state_data, state_path)
    keys: dict[str, SigningKey] = {}
    for record in records:
        key_path = directory / f"{record.kid}.pem"
        pem = _read_private_file(key_path, _MAX_KEY_FILE_BYTES)
        private_key = _decode_private_key(pem, passphrase, key_path)
        # A file swapped under another key's name would sign with an unpublished kid.
        if not hmac.compare_digest(jwk_thumbprint(private_key.public_key()), record.kid):
            raise KeyringError(f"{key_path}: key does not match its kid")
        keys[record.kid] = SigningKey(record.kid, private_key)
    return records, keys, stamp
