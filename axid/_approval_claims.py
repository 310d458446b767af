"""AXID approval token claims (``typ`` ``axid-approval+jwt``): the claim set and its shapes.

An approval token says that ``approver`` approved approval request ``approval`` for
exactly one request ``req`` (method, raw target, body SHA-256) of the agent ``sub``
(certificate ``cnf``) in run ``run`` of ``tenant``, at service ``aud`` (DESIGN.md,
"Approvals"). It is verified by the same function as an action token
(:func:`axid.tokens.verify_approval`), which reads the payload with
:func:`_approval_claims` instead of the action claim parser: the two claim sets
differ (no ``nbf``, ``agent``, ``scope`` or ``chain`` here; ``approval``,
``approver``, ``req`` only here), so neither token passes as the other even
before the header's ``typ`` is compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from axid._token_claims import (
    _JTI_RE,
    _audiences,
    _fail,
    _integer,
    _is_workload_id,
    _text,
    _thumbprint,
)

__all__ = ["APPROVAL_ID_RE", "ApprovalClaims", "ApprovedRequest"]

# An approval id: 16 random bytes, canonical base64url (like a jti).
APPROVAL_ID_RE: Final = _JTI_RE
# RFC 9110 token, as the verifier's normal form allows (at most 32 characters).
_METHOD_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
# The raw request target in origin form: '/' then visible ASCII, query included.
_TARGET_RE: Final = re.compile(r"/[\x21-\x7e]{0,8191}")
_BODY_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")

_REQUIRED: Final = frozenset(
    {
        "iss",
        "sub",
        "cnf",
        "aud",
        "iat",
        "exp",
        "jti",
        "approval",
        "approver",
        "tenant",
        "run",
        "req",
    }
)
_REQ_MEMBERS: Final = frozenset({"method", "path", "body_sha256"})


@dataclass(frozen=True, slots=True)
class ApprovedRequest:
    """The one request an approval covers: method, raw target (query included), and
    the lowercase hex SHA-256 of its body."""

    method: str
    path: str
    body_sha256: str

    def to_json(self) -> dict[str, str]:
        return {"method": self.method, "path": self.path, "body_sha256": self.body_sha256}

    @classmethod
    def parse(cls, value: object) -> ApprovedRequest:
        """Strict: an object of exactly the three members, each of its shape."""
        if type(value) is not dict or value.keys() != _REQ_MEMBERS:
            raise _fail("token_malformed", "req must be an object of method, path, body_sha256")
        method, path, digest = value["method"], value["path"], value["body_sha256"]
        if type(method) is not str or _METHOD_RE.fullmatch(method) is None:
            raise _fail("token_malformed", "req.method must be an HTTP method token")
        if type(path) is not str or _TARGET_RE.fullmatch(path) is None:
            raise _fail("token_malformed", "req.path must be a request target starting with '/'")
        if type(digest) is not str or _BODY_SHA256_RE.fullmatch(digest) is None:
            raise _fail("token_malformed", "req.body_sha256 must be 64 lowercase hex digits")
        return cls(method, path, digest)


@dataclass(frozen=True, slots=True)
class ApprovalClaims:
    """The verified claims of an approval token (plus the header's ``kid``)."""

    iss: str
    sub: str
    aud: tuple[str, ...]
    iat: int
    exp: int
    jti: str
    approval: str
    approver: str
    tenant: str
    run: str
    req: ApprovedRequest
    cnf_x5t_s256: str
    kid: str

    @property
    def nbf(self) -> int:
        """An approval token has no ``nbf``: it is valid from ``iat``."""
        return self.iat

    def to_json(self) -> dict[str, Any]:
        """The claims as in the token (``aud`` a string when it has one member)."""
        return {
            "iss": self.iss,
            "sub": self.sub,
            "cnf": {"x5t#S256": self.cnf_x5t_s256},
            "aud": self.aud[0] if len(self.aud) == 1 else list(self.aud),
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
            "approval": self.approval,
            "approver": self.approver,
            "tenant": self.tenant,
            "run": self.run,
            "req": self.req.to_json(),
        }


def _approval_claims(payload: dict[str, Any], kid: str) -> ApprovalClaims:
    """Presence and type checks of an approval token's payload (steps 11-12 of
    :mod:`axid.tokens`): a missing claim is ``token_missing_claim``, any other
    deviation ``token_malformed``."""
    if payload.keys() != _REQUIRED:
        missing = _REQUIRED - payload.keys()
        if missing:
            raise _fail("token_missing_claim", f"missing claims {sorted(missing)}")
        raise _fail("token_malformed", "token has claims outside the approval claim set")
    cnf = payload["cnf"]
    if type(cnf) is dict and "x5t#S256" not in cnf:
        raise _fail("token_missing_claim", "missing claim cnf.x5t#S256")
    iss, tenant, run = payload["iss"], payload["tenant"], payload["run"]
    iat, exp, jti = payload["iat"], payload["exp"], payload["jti"]
    sub, approver, approval = payload["sub"], payload["approver"], payload["approval"]
    if not (_text(iss) and _text(tenant) and _text(run)):
        raise _fail("token_malformed", "iss, tenant and run must be non-empty strings")
    if not (_integer(iat) and _integer(exp)):
        raise _fail("token_malformed", "iat and exp must be integers")
    if type(sub) is not str or not _is_workload_id(sub):
        raise _fail("token_malformed", "sub is not a SPIFFE workload ID")
    if type(approver) is not str or not _is_workload_id(approver):
        raise _fail("token_malformed", "approver is not a SPIFFE workload ID")
    audiences = _audiences(payload["aud"])
    if type(jti) is not str or _JTI_RE.fullmatch(jti) is None:
        raise _fail("token_malformed", "jti must be 16 bytes of base64url")
    if type(approval) is not str or APPROVAL_ID_RE.fullmatch(approval) is None:
        raise _fail("token_malformed", "approval must be 16 bytes of base64url")
    req = ApprovedRequest.parse(payload["req"])
    thumb = _thumbprint(cnf)
    return ApprovalClaims(
        iss, sub, audiences, iat, exp, jti, approval, approver, tenant, run, req, thumb, kid
    )
