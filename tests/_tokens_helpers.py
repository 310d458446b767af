"""Hand-built tokens for the token tests: forged with cryptography, not with axid.tokens."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.keys import KeySet, SigningKey

ISSUER = "https://issuer.example.org"
AUDIENCE = "payments"
SUB = "spiffe://example.org/agent/planner"
NOW = 1_700_000_000
CNF = base64.urlsafe_b64encode(hashlib.sha256(b"leaf DER").digest()).rstrip(b"=").decode()
JTI = "AAECAwQFBgcICQoLDA0ODw"  # bytes 0..15


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


def good_header(kid: str) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": "axid+jwt", "kid": kid}


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": SUB,
        "aud": AUDIENCE,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "jti": JTI,
        "tenant": "acme",
        "agent": "planner",
        "run": "run-2",
        "spawn_parent": "run-1",
        "chain": ["run-0", "run-1"],
        "scope": "payments:read payments:refund",
        "cnf": {"x5t#S256": CNF},
    }
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


_DROP = object()
DROP: Any = _DROP


def segment(obj: Any) -> str:
    """JSON (compact) then base64url; a str/bytes is taken as the raw JSON text."""
    if isinstance(obj, bytes):
        raw = obj
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
    else:
        raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return b64(raw)


def forge(header: Any, payload: Any, key: Ed25519PrivateKey | SigningKey) -> str:
    """Sign header/payload with a raw Ed25519 key (cryptography only)."""
    private = key.private_key if isinstance(key, SigningKey) else key
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64(private.sign(signing_input.encode('ascii')))}"


def keyset(*keys: SigningKey) -> KeySet:
    return KeySet.of(*(k.public_key for k in keys))
