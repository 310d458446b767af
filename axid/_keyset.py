"""Ed25519 verification keys: strict base64url, RFC 7638 thumbprints, JWKs and the KeySet.

Split from :mod:`axid.keys` (which re-exports every public name here): this is the
part verifiers need, without the issuer's on-disk keyring.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from axid._json import strict_loads
from axid.errors import AxidError

__all__ = [
    "KeySet",
    "KeyringError",
    "SigningKey",
    "b64url_decode",
    "b64url_encode",
    "jwk_thumbprint",
    "public_jwk",
]

# JWKS input limits: our own issuer publishes a handful of keys.
_MAX_JWKS_BYTES: Final = 256 * 1024
_MAX_JWKS_KEYS: Final = 64
# JWK members a public Ed25519 key may carry here (RFC 7517 / RFC 8037); anything
# else (notably "d", "x5u", "x5c") is refused rather than ignored.
_ALLOWED_JWK_MEMBERS: Final = frozenset({"kty", "crv", "x", "kid", "alg", "use", "key_ops"})


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
