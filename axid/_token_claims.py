"""AXID action token claims: the claim set, its types and shapes, and the token's errors.

Split from :mod:`axid.tokens` (which re-exports every public name here): this
module reads a decoded payload (steps 11-12 of the order of checks in
:mod:`axid.tokens`) and holds the per-claim rules :func:`axid.tokens.mint`
shares; the JWS parsing, signing and verification stay in :mod:`axid.tokens`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from axid.errors import AxidError
from mtls.spiffeid import SpiffeIdError, parse_spiffe_id

__all__ = ["MAX_CHAIN_DEPTH", "REASONS", "ActionClaims", "TokenError"]

MAX_CHAIN_DEPTH: Final = 8

REASONS: Final = frozenset(
    {
        "token_missing",
        "token_malformed",
        "token_too_large",
        "token_bad_alg",
        "token_bad_type",
        "token_unknown_kid",
        "token_bad_signature",
        "token_expired",
        "token_not_yet_valid",
        "token_ttl_too_long",
        "token_wrong_issuer",
        "token_wrong_audience",
        "token_missing_claim",
    }
)


class TokenError(AxidError):
    """A token failed verification. ``reason`` is one of :data:`REASONS`."""

    reason: str
    message: str

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:  # pragma: no cover - guards this module's own calls
            raise ValueError(f"unknown token reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ActionClaims:
    """The verified claims of an action token (plus the header's ``kid``)."""

    iss: str
    sub: str
    aud: tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    jti: str
    tenant: str
    agent: str
    run: str
    spawn_parent: str | None
    chain: tuple[str, ...]
    scope: frozenset[str]
    scope_str: str
    cnf_x5t_s256: str
    kid: str

    def to_json(self) -> dict[str, Any]:
        """The claims as in the token (``aud`` a string when it has one member)."""
        return {
            "iss": self.iss,
            "sub": self.sub,
            "aud": self.aud[0] if len(self.aud) == 1 else list(self.aud),
            "iat": self.iat,
            "nbf": self.nbf,
            "exp": self.exp,
            "jti": self.jti,
            "tenant": self.tenant,
            "agent": self.agent,
            "run": self.run,
            "spawn_parent": self.spawn_parent,
            "chain": list(self.chain),
            "scope": self.scope_str,
            "cnf": {"x5t#S256": self.cnf_x5t_s256},
        }


_REQUIRED: Final = frozenset(
    {
        "iss",
        "sub",
        "aud",
        "iat",
        "nbf",
        "exp",
        "jti",
        "tenant",
        "agent",
        "run",
        "spawn_parent",
        "chain",
        "scope",
        "cnf",
    }
)
_CNF_MEMBER: Final = "x5t#S256"
_MAX_INT: Final = 2**53 - 1  # I-JSON (RFC 7493) safe integers
# Canonical base64url of exactly 16 and 32 bytes (unused trailing bits zero).
_JTI_RE: Final = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
_SHA256_RE: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), space separated.
_SCOPE_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*")


def _fail(reason: str, message: str) -> TokenError:
    return TokenError(reason, message)


@lru_cache(maxsize=4096)
def _is_workload_id(value: str) -> bool:
    # Cached: only signed tokens and the issuer's own input reach this.
    try:
        return parse_spiffe_id(value).path != ""
    except SpiffeIdError:
        return False


def _text(value: object) -> bool:
    return type(value) is str and value != "" and value.isprintable()


def _integer(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _check_chain(spawn_parent: object, chain: object, run: str) -> str | None:
    """Returns None if consistent, else what is wrong."""
    if type(chain) is not list:
        return "chain must be an array"
    if len(chain) > MAX_CHAIN_DEPTH:
        return f"chain deeper than {MAX_CHAIN_DEPTH}"
    for item in chain:
        if not _text(item):
            return "chain entries must be non-empty strings"
    if len(set(chain)) != len(chain) or run in chain:
        return "chain repeats a run id"
    if spawn_parent is None:
        if chain:
            return "spawn_parent is null but chain is not empty"
    elif not _text(spawn_parent):
        return "spawn_parent must be null or a non-empty string"
    elif not chain or chain[-1] != spawn_parent:
        return "spawn_parent must be the last entry of chain"
    return None


def _audiences(aud: object) -> tuple[str, ...]:
    if type(aud) is str:
        if not _text(aud):
            raise _fail("token_malformed", "aud must be a non-empty string")
        return (aud,)
    if type(aud) is list and aud and all(_text(a) for a in aud):
        return tuple(aud)
    raise _fail("token_malformed", "aud must be a string or a non-empty array of strings")


def _scopes(scope: object) -> frozenset[str]:
    if type(scope) is not str or _SCOPE_RE.fullmatch(scope) is None:
        raise _fail("token_malformed", "scope must be space-separated scope tokens")
    scopes = scope.split(" ")
    scope_set = frozenset(scopes)
    if len(scope_set) != len(scopes):
        raise _fail("token_malformed", "scope repeats an action")
    return scope_set


def _thumbprint(cnf: object) -> str:
    if type(cnf) is not dict or len(cnf) != 1:
        raise _fail("token_malformed", "cnf must be an object with only x5t#S256")
    thumb = cnf[_CNF_MEMBER]
    if type(thumb) is not str or _SHA256_RE.fullmatch(thumb) is None:
        raise _fail("token_malformed", "cnf.x5t#S256 must be 32 bytes of base64url")
    return thumb


def _claims(payload: dict[str, Any], kid: str) -> ActionClaims:
    """Presence and type checks (steps 11-12), in the order of the module doc of axid.tokens."""
    if payload.keys() != _REQUIRED:
        missing = _REQUIRED - payload.keys()
        if missing:
            raise _fail("token_missing_claim", f"missing claims {sorted(missing)}")
        raise _fail("token_malformed", "token has claims outside the AXID claim set")
    cnf = payload["cnf"]
    if type(cnf) is dict and _CNF_MEMBER not in cnf:
        raise _fail("token_missing_claim", "missing claim cnf.x5t#S256")
    iss, sub, tenant = payload["iss"], payload["sub"], payload["tenant"]
    agent, run = payload["agent"], payload["run"]
    iat, nbf, exp = payload["iat"], payload["nbf"], payload["exp"]
    jti, spawn_parent, chain = payload["jti"], payload["spawn_parent"], payload["chain"]

    if not (_text(iss) and _text(tenant) and _text(agent) and _text(run)):
        raise _fail("token_malformed", "iss, tenant, agent and run must be non-empty strings")
    if not (_integer(iat) and _integer(nbf) and _integer(exp)):
        raise _fail("token_malformed", "iat, nbf and exp must be integers")
    if type(sub) is not str or not _is_workload_id(sub):
        raise _fail("token_malformed", "sub is not a SPIFFE workload ID")
    audiences = _audiences(payload["aud"])
    if type(jti) is not str or _JTI_RE.fullmatch(jti) is None:
        raise _fail("token_malformed", "jti must be 16 bytes of base64url")
    scope_set = _scopes(payload["scope"])
    thumb = _thumbprint(cnf)
    problem = _check_chain(spawn_parent, chain, run)
    if problem is not None:
        raise _fail("token_malformed", problem)
    return ActionClaims(
        iss,
        sub,
        audiences,
        iat,
        nbf,
        exp,
        jti,
        tenant,
        agent,
        run,
        spawn_parent,
        tuple(chain),
        scope_set,
        payload["scope"],
        thumb,
        kid,
    )
