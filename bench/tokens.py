"""Action-token benchmarks: ``token.mint`` and ``token.verify``.

Baselines are the bare Ed25519 operations from ``cryptography`` on the same
bytes, so the ratio shows what the token layer (claim checks, JSON, base64url,
JWS framing) costs on top of the signature itself.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid import tokens
from axid.keys import KeySet, SigningKey
from bench._harness import BenchError, Context, Result, compare_rates, register

ISSUER = "https://issuer.example.org"
AUDIENCE = "payments"
SUB = "spiffe://example.org/agent/worker"
NOW = 1_700_000_000
# A realistic spawned worker: parent run, two-level chain, two scopes.
_CNF = base64.urlsafe_b64encode(hashlib.sha256(b"leaf DER").digest()).rstrip(b"=").decode()


def _mint_args(key: SigningKey) -> dict[str, Any]:
    return {
        "key": key,
        "iss": ISSUER,
        "sub": SUB,
        "aud": AUDIENCE,
        "tenant": "acme",
        "agent": "worker",
        "run": "run-7f3a9c",
        "spawn_parent": "run-51be02",
        "chain": ["run-0c91d4", "run-51be02"],
        "scope": "payments:read payments:refund",
        "cnf_x5t_s256": _CNF,
        "now": NOW,
        "ttl": 300,
    }


def _signing_input(token: str) -> tuple[bytes, bytes]:
    header, payload, sig = token.split(".")
    pad = "=" * (-len(sig) % 4)
    return f"{header}.{payload}".encode("ascii"), base64.urlsafe_b64decode(sig + pad)


def _timing(ctx: Context) -> dict[str, Any]:
    if ctx.iterations is not None:
        return {"n": ctx.iterations, "repeat": 1}
    return {"seconds": 0.25 if ctx.quick else 1.0, "repeat": ctx.repeats()}


@register("token.mint")
def token_mint(ctx: Context) -> Result:
    """``axid.tokens.mint`` vs a bare Ed25519 sign of the same signing input."""
    key = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    args = _mint_args(key)
    token = tokens.mint(**args)
    signing_input, _ = _signing_input(token)
    private_key = key.private_key
    value, base = compare_rates(
        lambda: tokens.mint(**args),
        lambda: private_key.sign(signing_input),
        **_timing(ctx),
    )
    return Result.of("token.mint", value, "ops/s", "Ed25519 sign (cryptography)", base)


@register("token.verify")
def token_verify(ctx: Context) -> Result:
    """``axid.tokens.verify`` (all checks) vs a bare Ed25519 verify of the same token."""
    key = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    keys = KeySet.of(key.public_key)
    token = tokens.mint(**_mint_args(key))
    signing_input, signature = _signing_input(token)
    public_key = key.public_key
    claims = tokens.verify(token, keys, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    if claims.run != "run-7f3a9c":  # the measured path must be the accepting one
        raise BenchError("token.verify: the benchmark token did not verify")
    value, base = compare_rates(
        lambda: tokens.verify(token, keys, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1),
        lambda: public_key.verify(signature, signing_input),
        **_timing(ctx),
    )
    return Result.of("token.verify", value, "ops/s", "Ed25519 verify (cryptography)", base)
