"""AXID action tokens: mint and verify (compact JWS, EdDSA/Ed25519, ``typ`` axid+jwt).

PyJWT supplies the JWS algorithm (its registered ``EdDSA`` algorithm object signs
and verifies the JWS signing input). The compact serialization is parsed here,
not by ``PyJWS.decode_complete``, because AXID needs stricter rules than PyJWT
applies (no padding, size cap before decoding, duplicate JSON members, a closed
header) and because ``decode_complete`` scans every character in Python, which
alone costs about a third of an Ed25519 verify.

``verify`` checks, in this order; the first failure wins and maps to one reason:

 1. ``None``/empty                                     -> ``token_missing``
 2. more than MAX_TOKEN_BYTES (before any decoding)    -> ``token_too_large``
 3. not ASCII, not exactly three non-empty segments of
    canonical unpadded base64url                       -> ``token_malformed``
 4. header not a JSON object of UTF-8, duplicate member -> ``token_malformed``
 5. ``alg`` not exactly ``"EdDSA"`` (missing, none, HS256, ...) -> ``token_bad_alg``
 6. ``typ`` not exactly ``"axid+jwt"``                 -> ``token_bad_type``
 7. any header member besides alg/typ/kid (``crit``, ``jku``, ``x5u``, ``x5c``,
    ``jwk``, ``b64``, ...)                             -> ``token_malformed``.
    ``crit`` is not ``token_bad_alg``: we implement no extension, so every such
    header is simply not an AXID header.
 8. ``kid`` missing, not a string, or not in the in-memory KeySet -> ``token_unknown_kid``
 9. signature not 64 bytes or not valid for that key    -> ``token_bad_signature``
    (nothing in the payload is looked at before this point)
10. payload not a JSON object of UTF-8, duplicate member -> ``token_malformed``
11. a required claim absent (``cnf`` without ``x5t#S256`` included) -> ``token_missing_claim``
12. an unknown claim, or a claim of the wrong type/shape -> ``token_malformed``
    (ints are JSON integers in [0, 2**53), not bools or floats; strings non-empty and
    printable; ``sub`` a strict SPIFFE workload ID; ``aud`` a string or non-empty
    array of strings; ``jti`` 16 bytes, ``cnf.x5t#S256`` 32 bytes of canonical
    base64url; ``scope`` space-separated RFC 6749 scope tokens, no duplicates;
    ``chain`` at most MAX_CHAIN_DEPTH unique run ids, ``spawn_parent`` null iff
    ``chain == []`` and otherwise ``chain[-1]``, ``run`` not in ``chain``)
13. ``exp - iat > MAX_TTL``                             -> ``token_ttl_too_long``
14. ``nbf < iat`` or ``exp <= nbf``                     -> ``token_malformed``
15. ``now < nbf - leeway``                              -> ``token_not_yet_valid``
16. ``now >= exp + leeway``                             -> ``token_expired``
17. ``iat > now + leeway``                              -> ``token_not_yet_valid``
    (implied by 14 and 15; kept as defence in depth)
18. ``iss != issuer`` (exact)                           -> ``token_wrong_issuer``
19. ``audience`` not in ``aud``                         -> ``token_wrong_audience``

Approval tokens (``typ`` ``axid-approval+jwt``, DESIGN.md "Approvals") go through
the same steps (:func:`verify_approval`), told to expect that ``typ`` (step 6) and
the approval claim set (steps 11-12, :mod:`axid._approval_claims`; no ``nbf``, so
step 14 reads ``nbf`` as ``iat``). An action token is never accepted as an approval
token nor the reverse: the ``typ`` differs, and so do the claim sets.

Programming errors (a ``leeway`` outside [0, MAX_LEEWAY], a KeySet of the wrong
type, an empty issuer) raise ``ValueError``/``TypeError``, never ``TokenError``.
Error messages never contain the token or any attacker-chosen string.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from base64 import urlsafe_b64decode
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from axid._approval_claims import APPROVAL_ID_RE, ApprovalClaims, ApprovedRequest, _approval_claims
from axid._json import strict_loads
from axid._token_claims import (
    _CNF_MEMBER,
    _JTI_RE,
    _SCOPE_RE,
    _SHA256_RE,
    MAX_CHAIN_DEPTH,
    REASONS,
    ActionClaims,
    TokenError,
    _check_chain,
    _claims,
    _fail,
    _integer,
    _is_workload_id,
    _text,
)
from axid.keys import KeySet, SigningKey, b64url_encode

__all__ = [
    "APPROVAL_TOKEN_TYPE",
    "MAX_CHAIN_DEPTH",
    "MAX_LEEWAY",
    "MAX_TOKEN_BYTES",
    "MAX_TTL",
    "REASONS",
    "TOKEN_TYPE",
    "ActionClaims",
    "ApprovalClaims",
    "ApprovedRequest",
    "TokenError",
    "mint",
    "mint_approval",
    "verify",
    "verify_approval",
    "verify_parent_token",
]

MAX_TOKEN_BYTES: Final = 8192
MAX_TTL: Final = 300
MAX_LEEWAY: Final = 30
TOKEN_TYPE: Final = "axid+jwt"  # noqa: S105 - a media type, not a secret
APPROVAL_TOKEN_TYPE: Final = "axid-approval+jwt"  # noqa: S105 - a media type
ALGORITHM: Final = "EdDSA"


# --------------------------------------------------------------------------- internals

# PyJWT's EdDSA algorithm object: one instance, reused (no per-call construction).
_EDDSA: Final = jwt.PyJWS(algorithms=[ALGORITHM]).get_algorithm_by_name(ALGORITHM)

_HEADER_MEMBERS: Final = frozenset({"alg", "typ", "kid"})
_SIGNATURE_CHARS: Final = 86  # 64 bytes of base64url

# Three non-empty segments of the base64url alphabet. fullmatch, never match + "$".
_COMPACT_RE: Final = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_CANONICAL_LAST: Final = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}

_HEADER_CACHE_MAX: Final = 64


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _canonical_segment(segment: str) -> bool:
    rem = len(segment) % 4
    return rem != 1 and (rem == 0 or segment[-1] in _CANONICAL_LAST[rem])


def _b64(segment: str) -> bytes:
    # Only for segments _split_compact has already checked to be canonical base64url.
    return urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _decode_json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        obj = strict_loads(_b64(segment).decode("utf-8"))
    except (ValueError, RecursionError):
        raise _fail("token_malformed", f"{what} is not strict UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise _fail("token_malformed", f"{what} is not a JSON object")
    return obj


def _split_compact(token: object) -> tuple[str, str, str]:
    """Size, ASCII and base64url structure checks (steps 1-3). Returns the segments."""
    if token is None:
        raise _fail("token_missing", "no token")
    if isinstance(token, str):
        if not token:
            raise _fail("token_missing", "empty token")
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail("token_too_large", f"token is larger than {MAX_TOKEN_BYTES} bytes")
        if not token.isascii():
            if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
                raise _fail("token_too_large", f"token is larger than {MAX_TOKEN_BYTES} bytes")
            raise _fail("token_malformed", "token is not ASCII")
        text = token
    elif isinstance(token, bytes | bytearray):
        if not token:
            raise _fail("token_missing", "empty token")
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail("token_too_large", f"token is larger than {MAX_TOKEN_BYTES} bytes")
        if not token.isascii():
            raise _fail("token_malformed", "token is not ASCII")
        text = token.decode("ascii")
    else:
        raise TypeError(f"token must be str or bytes, not {type(token).__name__}")
    match = _COMPACT_RE.fullmatch(text)
    if match is None:
        raise _fail("token_malformed", "token is not three base64url segments")
    header, payload, signature = match.groups()
    if not (
        _canonical_segment(header) and _canonical_segment(payload) and _canonical_segment(signature)
    ):
        raise _fail("token_malformed", "token segment is not canonical unpadded base64url")
    return header, payload, signature


def _header_key(segment: str, keys: KeySet, typ: str = TOKEN_TYPE) -> tuple[str, Ed25519PublicKey]:
    """Header checks (steps 4-8). Returns (kid, key); caches the result per KeySet."""
    # The cache maps an already-accepted header segment to its key. Valid because a
    # KeySet never changes; bounded, and cleared when full (only speed is at stake).
    # An approval header is cached under another key ("a:" never starts a base64url
    # segment), so a header accepted for one typ is never a hit for the other.
    cache = keys._header_cache
    cache_key = segment if typ == TOKEN_TYPE else "a:" + segment
    hit = cache.get(cache_key)
    if hit is not None:
        return hit
    header = _decode_json_object(segment, "header")
    if header.get("alg") != ALGORITHM:
        raise _fail("token_bad_alg", "alg must be EdDSA")
    if header.get("typ") != typ:
        raise _fail("token_bad_type", f"typ must be {typ}")
    if len(header) > len(_HEADER_MEMBERS) or not header.keys() <= _HEADER_MEMBERS:
        extra = sorted(set(header) - _HEADER_MEMBERS)
        # Member names are attacker-chosen: name the known dangerous ones only.
        known = [m for m in extra if m in {"crit", "jku", "jwk", "x5u", "x5c", "b64"}]
        raise _fail(
            "token_malformed",
            f"header has members other than alg, typ, kid{' ' + str(known) if known else ''}",
        )
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise _fail("token_unknown_kid", "kid is missing or not in the key set")
    if len(cache) >= _HEADER_CACHE_MAX:
        cache.clear()
    result = (kid, key)
    cache[cache_key] = result
    return result


def _check_now_leeway(now: float | None, leeway: int) -> float:
    if type(leeway) is not int or not 0 <= leeway <= MAX_LEEWAY:
        raise ValueError(f"leeway must be an int in [0, {MAX_LEEWAY}]")
    if now is None:
        return time.time()
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise TypeError("now must be a finite number (Unix seconds)")
    return now


def _check_expected(issuer: object, audience: object) -> None:
    """The caller's expected ``iss`` and ``aud``: a wrong type is the caller's bug."""
    if type(issuer) is not str or not issuer:
        raise TypeError("issuer must be a non-empty str")
    if type(audience) is not str or not audience:
        raise TypeError("audience must be a non-empty str")


def _verify(
    token: object,
    keys: KeySet,
    issuer: str,
    audience: str | None,
    now: float,
    leeway: int,
    approval: bool = False,
) -> Any:
    """The shared verification (module docstring); ``approval`` selects the approval
    token's ``typ`` and claim set instead of the action token's."""
    if not isinstance(keys, KeySet):
        raise TypeError("keys must be an axid.keys.KeySet")
    header_seg, payload_seg, signature_seg = _split_compact(token)
    typ = APPROVAL_TOKEN_TYPE if approval else TOKEN_TYPE
    kid, public_key = _header_key(header_seg, keys, typ)

    if len(signature_seg) != _SIGNATURE_CHARS:
        raise _fail("token_bad_signature", "signature is not 64 bytes")
    signing_input = f"{header_seg}.{payload_seg}".encode("ascii")
    if not _EDDSA.verify(signing_input, public_key, _b64(signature_seg)):
        raise _fail("token_bad_signature", "signature does not verify")

    parse = _approval_claims if approval else _claims
    claims: ActionClaims | ApprovalClaims = parse(_decode_json_object(payload_seg, "payload"), kid)
    iat, nbf, exp = claims.iat, claims.nbf, claims.exp
    if exp - iat > MAX_TTL:
        raise _fail("token_ttl_too_long", f"exp - iat is more than {MAX_TTL} s")
    if nbf < iat or exp <= nbf:
        raise _fail("token_malformed", "need iat <= nbf < exp")
    if now < nbf - leeway:
        raise _fail("token_not_yet_valid", "token is not valid yet (nbf)")
    if now >= exp + leeway:
        raise _fail("token_expired", "token has expired")
    if iat > now + leeway:
        raise _fail("token_not_yet_valid", "token was issued in the future (iat)")
    if claims.iss != issuer:
        raise _fail("token_wrong_issuer", "iss is not the expected issuer")
    if audience is not None and audience not in claims.aud:
        raise _fail("token_wrong_audience", "aud does not include this service")
    return claims


# --------------------------------------------------------------------------- public API


def verify(
    token: str | bytes | None,
    keys: KeySet,
    *,
    issuer: str,
    audience: str,
    now: float | None = None,
    leeway: int = 0,
) -> ActionClaims:
    """Verify an action token and return its claims; raises :class:`TokenError`.

    ``keys`` is the only source of verification keys (never ``jku``/``x5u``/``jwk``).
    ``now`` defaults to the wall clock; ``leeway`` (seconds, at most 30) widens the
    nbf/exp/iat windows. See the module docstring for the exact order of checks.
    """
    _check_expected(issuer, audience)
    return _verify(token, keys, issuer, audience, _check_now_leeway(now, leeway), leeway)


def verify_approval(
    token: str | bytes | None,
    keys: KeySet,
    *,
    issuer: str,
    audience: str,
    now: float | None = None,
    leeway: int = 0,
) -> ApprovalClaims:
    """Verify an approval token (``typ`` ``axid-approval+jwt``) and return its claims.

    The same checks, in the same order, as :func:`verify`, with the approval token's
    ``typ`` and claim set: an action token fails here (``token_bad_type``), and an
    approval token fails :func:`verify`. Binding the claims to a request (peer, run,
    method, target, body) is the caller's (the verifier's approval step).
    """
    _check_expected(issuer, audience)
    now_ = _check_now_leeway(now, leeway)
    claims: ApprovalClaims = _verify(token, keys, issuer, audience, now_, leeway, approval=True)
    return claims


def verify_parent_token(
    token: str | bytes | None,
    keys: KeySet,
    *,
    issuer: str,
    now: float | None = None,
    leeway: int = 0,
) -> ActionClaims:
    """Verify a *parent* token presented to the issuer with a mint request.

    Every check of :func:`verify` except the audience: a parent token's ``aud`` names
    the services it was minted for, not the issuer. Only the issuer's mint path
    should call this; services must use :func:`verify`.
    """
    if type(issuer) is not str or not issuer:
        raise TypeError("issuer must be a non-empty str")
    return _verify(token, keys, issuer, None, _check_now_leeway(now, leeway), leeway)


@lru_cache(maxsize=64)
def _header_segment(kid: str, typ: str = TOKEN_TYPE) -> str:
    return _encode_segment({"alg": ALGORITHM, "typ": typ, "kid": kid})


def _encode_segment(obj: dict[str, Any]) -> str:
    return b64url_encode(_ENCODER.encode(obj).encode("utf-8"))


def _sign_compact(header_segment: str, payload: bytes, key: SigningKey | Any) -> str:
    """JWS compact serialization (RFC 7515 section 7.1) signed with PyJWT's EdDSA."""
    private_key = key.private_key if isinstance(key, SigningKey) else key
    signing_input = f"{header_segment}.{b64url_encode(payload)}"
    signature = _EDDSA.sign(signing_input.encode("ascii"), private_key)
    return f"{signing_input}.{b64url_encode(signature)}"


def _jws_signature_valid(token: str, public_key: Ed25519PublicKey) -> bool:
    """Structure + signature only (no header or claim rules): for RFC 8037 A.5."""
    header, payload, signature = _split_compact(token)
    if len(signature) != _SIGNATURE_CHARS:
        return False
    return bool(_EDDSA.verify(f"{header}.{payload}".encode("ascii"), public_key, _b64(signature)))


def _mint_error(message: str) -> ValueError:
    return ValueError(f"cannot mint: {message}")


def _scope_string(scope: str | Iterable[str]) -> str:
    items = scope.split(" ") if isinstance(scope, str) else list(scope)
    for item in items:
        if type(item) is not str or _SCOPE_RE.fullmatch(item) is None or " " in item:
            raise _mint_error("scope items must be RFC 6749 scope tokens")
    if not items:
        raise _mint_error("scope must name at least one action")
    return " ".join(sorted(set(items)))


def _aud_claim(aud: str | Sequence[str]) -> str | list[str]:
    if isinstance(aud, str):
        if not _text(aud):
            raise _mint_error("aud must be a non-empty string")
        return aud
    aud_claim = list(aud)
    if not aud_claim or not all(_text(a) for a in aud_claim):
        raise _mint_error("aud must be a string or a non-empty list of strings")
    return aud_claim


def _chain_claim(spawn_parent: str | None, chain: Sequence[str], run: str) -> list[str]:
    if isinstance(chain, str | bytes):  # list("run-1") would be its characters
        raise _mint_error("chain must be a sequence of run ids, not a string")
    chain_claim = list(chain)
    problem = _check_chain(spawn_parent, chain_claim, run)
    if problem is not None:
        raise _mint_error(problem)
    return chain_claim


def _nbf_exp(now: int, ttl: int, nbf: int | None) -> tuple[int, int]:
    if not _integer(now):
        raise _mint_error("now must be a non-negative int")
    if type(ttl) is not int or not 0 < ttl <= MAX_TTL:
        raise _mint_error(f"ttl must be an int in (0, {MAX_TTL}]")
    exp = now + ttl
    if nbf is None:
        nbf = now
    elif not _integer(nbf) or not now <= nbf < exp:
        raise _mint_error("nbf must be an int with now <= nbf < now + ttl")
    if not _integer(exp):
        raise _mint_error("exp out of range")
    return nbf, exp


def _jti_claim(jti: str | None) -> str:
    if jti is None:
        return b64url_encode(os.urandom(16))
    if type(jti) is not str or _JTI_RE.fullmatch(jti) is None:
        raise _mint_error("jti must be 16 bytes of base64url")
    return jti


def mint(
    *,
    key: SigningKey,
    iss: str,
    sub: str,
    aud: str | Sequence[str],
    tenant: str,
    agent: str,
    run: str,
    spawn_parent: str | None,
    chain: Sequence[str],
    scope: str | Iterable[str],
    cnf_x5t_s256: str,
    now: int,
    ttl: int = MAX_TTL,
    nbf: int | None = None,
    jti: str | None = None,
) -> str:
    """Sign an action token. Input that :func:`verify` would refuse raises ValueError.

    ``iat = now``, ``exp = now + ttl`` (``0 < ttl <= 300``), ``nbf`` defaults to
    ``now``; ``jti`` defaults to 16 random bytes. The scope is normalized to its
    sorted, de-duplicated items.
    """
    if not isinstance(key, SigningKey):
        raise TypeError("key must be an axid.keys.SigningKey")
    if not (_text(iss) and _text(tenant) and _text(agent) and _text(run)):
        raise _mint_error("iss, tenant, agent and run must be non-empty printable strings")
    if type(sub) is not str or not _is_workload_id(sub):
        raise _mint_error("sub must be a SPIFFE workload ID")
    aud_claim = _aud_claim(aud)
    chain_claim = _chain_claim(spawn_parent, chain, run)
    scope_claim = _scope_string(scope)
    if type(cnf_x5t_s256) is not str or _SHA256_RE.fullmatch(cnf_x5t_s256) is None:
        raise _mint_error("cnf_x5t_s256 must be 32 bytes of base64url")
    nbf, exp = _nbf_exp(now, ttl, nbf)
    jti = _jti_claim(jti)
    claims = {
        "iss": iss,
        "sub": sub,
        "aud": aud_claim,
        "iat": now,
        "nbf": nbf,
        "exp": exp,
        "jti": jti,
        "tenant": tenant,
        "agent": agent,
        "run": run,
        "spawn_parent": spawn_parent,
        "chain": chain_claim,
        "scope": scope_claim,
        "cnf": {_CNF_MEMBER: cnf_x5t_s256},
    }
    token = _sign_compact(
        _header_segment(key.kid), _ENCODER.encode(claims).encode("utf-8"), key.private_key
    )
    if len(token) > MAX_TOKEN_BYTES:
        raise _mint_error(f"token would be larger than {MAX_TOKEN_BYTES} bytes")
    return token


def mint_approval(
    *,
    key: SigningKey,
    iss: str,
    sub: str,
    aud: str | Sequence[str],
    tenant: str,
    run: str,
    approval: str,
    approver: str,
    req: ApprovedRequest,
    cnf_x5t_s256: str,
    now: int,
    ttl: int = MAX_TTL,
    jti: str | None = None,
) -> str:
    """Sign an approval token. Input that :func:`verify_approval` would refuse raises
    ValueError. ``iat = now``, ``exp = now + ttl`` (``0 < ttl <= 300``)."""
    if not isinstance(key, SigningKey):
        raise TypeError("key must be an axid.keys.SigningKey")
    if not (_text(iss) and _text(tenant) and _text(run)):
        raise _mint_error("iss, tenant and run must be non-empty printable strings")
    for name, value in (("sub", sub), ("approver", approver)):
        if type(value) is not str or not _is_workload_id(value):
            raise _mint_error(f"{name} must be a SPIFFE workload ID")
    if type(approval) is not str or APPROVAL_ID_RE.fullmatch(approval) is None:
        raise _mint_error("approval must be 16 bytes of base64url")
    if not isinstance(req, ApprovedRequest):
        raise TypeError("req must be an axid.tokens.ApprovedRequest")
    try:
        req = ApprovedRequest.parse(req.to_json())
    except TokenError as exc:
        raise _mint_error(exc.message) from None
    if type(cnf_x5t_s256) is not str or _SHA256_RE.fullmatch(cnf_x5t_s256) is None:
        raise _mint_error("cnf_x5t_s256 must be 32 bytes of base64url")
    _, exp = _nbf_exp(now, ttl, None)
    claims = {
        "iss": iss,
        "sub": sub,
        "cnf": {_CNF_MEMBER: cnf_x5t_s256},
        "aud": _aud_claim(aud),
        "iat": now,
        "exp": exp,
        "jti": _jti_claim(jti),
        "approval": approval,
        "approver": approver,
        "tenant": tenant,
        "run": run,
        "req": req.to_json(),
    }
    header = _header_segment(key.kid, APPROVAL_TOKEN_TYPE)
    token = _sign_compact(header, _ENCODER.encode(claims).encode("utf-8"), key.private_key)
    if len(token) > MAX_TOKEN_BYTES:
        raise _mint_error(f"token would be larger than {MAX_TOKEN_BYTES} bytes")
    return token
