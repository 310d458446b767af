"""Ed25519 signing keys for action tokens: thumbprints, JWKS, and the on-disk keyring.

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

import base64
import binascii
import contextlib
import enum
import errno
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from axid._json import strict_loads
from axid.errors import AxidError
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
PASSPHRASE_ENV: Final = "AXID_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
# Longer than the verifiers' JWKS cache lifetime (DESIGN.md: default 330 s).
DEFAULT_PUBLISH_LEAD: Final = 330.0
_DEFAULT_MAX_TOKEN_TTL: Final = 300.0
_DEFAULT_LEEWAY: Final = 30.0

# JWKS input limits: our own issuer publishes a handful of keys.
_MAX_JWKS_BYTES: Final = 256 * 1024
_MAX_JWKS_KEYS: Final = 64
_MAX_KEY_FILE_BYTES: Final = 64 * 1024
_MAX_KEYRING_FILE_BYTES: Final = 1024 * 1024
# JWK members a public Ed25519 key may carry here (RFC 7517 / RFC 8037); anything
# else (notably "d", "x5u", "x5c") is refused rather than ignored.
_ALLOWED_JWK_MEMBERS: Final = frozenset({"kty", "crv", "x", "kid", "alg", "use", "key_ops"})
_KID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_KEYRING_VERSION: Final = 1


class KeyringError(AxidError):
    """A key, key set or keyring is invalid, unreadable, or an operation is refused."""


# --------------------------------------------------------------------------- base64url

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
# The last character of a partial quantum may only carry zero bits in the positions
# that encode nothing; otherwise several strings decode to the same bytes.
_CANONICAL_LAST: Final = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    # binascii directly: this is on the mint hot path (three calls per token).
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def b64url_decode(value: str) -> bytes:
    """Strict base64url: alphabet ``[A-Za-z0-9_-]``, no padding, canonical trailing bits.

    Raises ValueError otherwise. Canonical means exactly one string encodes given
    bytes, so no character change of an encoded value decodes to the same bytes.
    """
    if not isinstance(value, str):
        raise ValueError("base64url value must be a string")
    rem = len(value) % 4
    if rem == 1 or _B64URL_RE.fullmatch(value) is None:
        raise ValueError("not unpadded base64url")
    if rem and value[-1] not in _CANONICAL_LAST[rem]:
        raise ValueError("non-canonical base64url (unused trailing bits set)")
    return base64.urlsafe_b64decode(value + "=" * (-rem % 4))


# --------------------------------------------------------------------------- JWK


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"expected Ed25519PublicKey, not {type(public_key).__name__}")
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _thumbprint_of_x(x: str) -> str:
    # RFC 7638 section 3.2: required members only, lexicographic order, no whitespace.
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 SHA-256 JWK thumbprint of an Ed25519 public key (base64url, no padding)."""
    return _thumbprint_of_x(b64url_encode(_raw_public(public_key)))


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public JWK (RFC 8037) of an Ed25519 key, with kid = its RFC 7638 thumbprint."""
    x = b64url_encode(_raw_public(public_key))
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": _thumbprint_of_x(x),
        "alg": "EdDSA",
        "use": "sig",
    }


@dataclass(frozen=True)
class SigningKey:
    """A private signing key and its kid. ``repr`` shows the kid only."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise TypeError("SigningKey.private_key must be an Ed25519PrivateKey")
        # A kid that is not the key's own thumbprint would make verifiers look up
        # the wrong public key (or none): refuse it at construction.
        actual = jwk_thumbprint(self.private_key.public_key())
        if not isinstance(self.kid, str) or not hmac.compare_digest(self.kid, actual):
            raise KeyringError("SigningKey.kid is not the RFC 7638 thumbprint of its key")

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(jwk_thumbprint(private_key.public_key()), private_key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


def _strict_json_loads(data: bytes | str, what: str) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return strict_loads(text)
    except (ValueError, RecursionError) as exc:
        raise KeyringError(f"{what} is not strict JSON: {exc}") from None


def _key_from_jwk(jwk: object, index: int) -> tuple[str, Ed25519PublicKey]:
    where = f"JWKS key #{index}"
    if not isinstance(jwk, dict):
        raise KeyringError(f"{where} is not a JSON object")
    if "d" in jwk:
        raise KeyringError(f"{where} holds private key material ('d'): refused")
    extra = sorted(set(jwk) - _ALLOWED_JWK_MEMBERS)
    if extra:
        raise KeyringError(f"{where} has unsupported members {extra}")
    if jwk.get("kty") != "OKP":
        raise KeyringError(f"{where}: kty must be 'OKP'")
    if jwk.get("crv") != "Ed25519":
        raise KeyringError(f"{where}: crv must be 'Ed25519'")
    if "alg" in jwk and jwk["alg"] != "EdDSA":
        raise KeyringError(f"{where}: alg must be 'EdDSA' when present")
    if "use" in jwk and jwk["use"] != "sig":
        raise KeyringError(f"{where}: use must be 'sig' when present")
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if not isinstance(ops, list) or "verify" not in ops:
            raise KeyringError(f"{where}: key_ops must be a list containing 'verify'")
    x = jwk.get("x")
    try:
        raw = b64url_decode(x) if isinstance(x, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyringError(f"{where}: x must be 32 bytes of canonical unpadded base64url")
    public_key = Ed25519PublicKey.from_public_bytes(raw)
    thumbprint = _thumbprint_of_x(x)  # type: ignore[arg-type]  # x is a str here
    if "kid" in jwk:
        kid = jwk["kid"]
        if not isinstance(kid, str) or not hmac.compare_digest(kid, thumbprint):
            raise KeyringError(f"{where}: kid is not the RFC 7638 thumbprint of the key")
    return thumbprint, public_key


class KeySet:
    """Verification keys by kid, in memory: the only place token verification finds keys.

    Immutable after construction; build a new one when the JWKS changes. It also
    holds a small cache of already-validated JWS header segments (see
    :mod:`axid.tokens`) which is valid exactly because the set never changes.
    """

    __slots__ = ("_header_cache", "_keys")

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        checked: dict[str, Ed25519PublicKey] = {}
        for kid, key in (keys or {}).items():
            if not hmac.compare_digest(kid, jwk_thumbprint(key)):
                raise KeyringError("KeySet kid is not the RFC 7638 thumbprint of its key")
            checked[kid] = key
        self._keys: dict[str, Ed25519PublicKey] = checked
        # header segment -> (kid, public key); filled by axid.tokens.verify.
        self._header_cache: dict[str, tuple[str, Ed25519PublicKey]] = {}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any] | bytes | str) -> KeySet:
        """Load a JWKS strictly; any bad member rejects the whole set.

        Every key must be ``kty=OKP``, ``crv=Ed25519`` with a 32-byte canonical ``x``,
        no private ``d``, no members beyond kty/crv/x/kid/alg/use/key_ops, and a
        ``kid`` (if present) equal to its RFC 7638 thumbprint; kids are unique.
        Rejecting the whole set, rather than skipping the bad key, is deliberate: the
        JWKS comes from our own issuer, so a bad member means corruption or
        tampering, and the caller should keep its previous key set and alert rather
        than run on a silently partial one.
        """
        if isinstance(jwks, bytes | str):
            if len(jwks) > _MAX_JWKS_BYTES:
                raise KeyringError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
            doc = _strict_json_loads(jwks, "JWKS")
        elif isinstance(jwks, Mapping):
            doc = jwks
        else:
            raise TypeError(f"JWKS must be a mapping, bytes or str, not {type(jwks).__name__}")
        if not isinstance(doc, Mapping) or set(doc) != {"keys"}:
            raise KeyringError('JWKS must be a JSON object with exactly one member, "keys"')
        members = doc["keys"]
        if not isinstance(members, list):
            raise KeyringError('JWKS "keys" must be an array')
        if len(members) > _MAX_JWKS_KEYS:
            raise KeyringError(f"JWKS has more than {_MAX_JWKS_KEYS} keys")
        keys: dict[str, Ed25519PublicKey] = {}
        for index, jwk in enumerate(members):
            kid, public_key = _key_from_jwk(jwk, index)
            if kid in keys:
                raise KeyringError(f"JWKS key #{index} duplicates kid {kid}")
            keys[kid] = public_key
        return cls(keys)

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> KeySet:
        keys: dict[str, Ed25519PublicKey] = {}
        for key in public_keys:
            keys[jwk_thumbprint(key)] = key
        return cls(keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [public_jwk(key) for key in self._keys.values()]}

    def __repr__(self) -> str:
        return f"KeySet(kids={list(self._keys)!r})"


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


def _check_time(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return float(value)


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
