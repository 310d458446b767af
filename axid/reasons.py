"""Every reason code AXID answers or records, with its HTTP status: the one table.

A reason code is a stable string (DESIGN.md): the ``reason`` member of a
problem+json answer and the ``reason`` field of a decision-log entry. Each
code and its status is written once, below; the verifier's and the issuer's
sets are derived from this table (``verifier.decision.STATUS``,
``axid.issuer.problems.ISSUER_REASONS``). The token family is
:data:`axid.tokens.REASONS` (what :func:`axid.tokens.verify` reports).

The issuer answers a few codes with another status than the table's when the
HTTP layer says more (``bad_request`` as 413 for a body too large, 415 for one
not ``application/json``); the table holds the code's usual status.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from axid.tokens import REASONS as TOKEN_REASONS

__all__ = [
    "IDENTITY_REASONS",
    "ISSUER_REASONS",
    "STATUS",
    "TOKEN_REASONS",
    "VERIFIER_REASONS",
    "VERIFIER_STATUS",
    "status_of",
]

# Step 1: who is calling could not be established.
IDENTITY_REASONS: Final = frozenset({"no_peer_cert", "peer_untrusted", "peer_not_svid"})

# What the verifier decides (and the issuer answers where the same rule applies).
_VERIFIER: Final[dict[str, int]] = {
    "ok": 200,
    # 401: who is calling, or with what token, could not be established.
    **dict.fromkeys(IDENTITY_REASONS, 401),
    **dict.fromkeys(TOKEN_REASONS, 401),
    "subject_mismatch": 401,
    "cert_binding_mismatch": 401,
    # 403: the caller is known and refused.
    "tenant_not_allowed": 403,
    "agent_not_allowed": 403,
    "scope_insufficient": 403,
    "revoked": 403,
    "replayed": 403,
    "custom_check_denied": 403,
    "budget_exceeded": 403,
    "unsupported_protocol": 403,
    # 503: the verifier cannot decide safely right now (fail closed).
    "audit_unavailable": 503,
    "revocation_unavailable": 503,
    "jwks_unavailable": 503,
}

# Codes only the issuer answers (see axid.issuer.problems for what each means).
_ISSUER_ONLY: Final[dict[str, int]] = {
    "bad_request": 400,
    "audience_not_allowed": 403,
    "spawn_too_deep": 403,
    "spawn_not_allowed": 403,  # a parent the caller's spawn_from does not name
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "run_conflict": 409,
    "internal_error": 500,
    "store_unavailable": 503,
}

# DESIGN.md's approvals (the verifier's approval step); joins _VERIFIER with that step.
_APPROVALS: Final[dict[str, int]] = {
    "approval_required": 403,  # filed at the issuer: an approver must decide first
    "approval_invalid": 403,  # not for this peer, service, request or run; or used
    "approval_expired": 403,  # the approval token (or the approval) has expired
    "approval_unavailable": 503,  # the issuer could not be reached to file the request
}

STATUS: Final[Mapping[str, int]] = MappingProxyType({**_VERIFIER, **_ISSUER_ONLY, **_APPROVALS})
if len(STATUS) != len(_VERIFIER) + len(_ISSUER_ONLY) + len(_APPROVALS):  # pragma: no cover
    raise RuntimeError("a reason code is defined twice")
VERIFIER_STATUS: Final[Mapping[str, int]] = MappingProxyType({**_VERIFIER, **_APPROVALS})
VERIFIER_REASONS: Final = frozenset(VERIFIER_STATUS)
ISSUER_REASONS: Final = frozenset(_ISSUER_ONLY)


def status_of(reason: str) -> int:
    """The HTTP status of a reason code (KeyError for an unknown one)."""
    return STATUS[reason]
