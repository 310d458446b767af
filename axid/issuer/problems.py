"""RFC 9457 problem details for every error the issuer answers.

Body: ``{"type": "about:blank", "title": <HTTP reason phrase>, "status": N,
"detail": <human text>, "reason": <stable code>}`` with media type
``application/problem+json``. ``detail`` never holds a token, a key or an
exception's internals.

Reason codes are DESIGN.md's (``no_peer_cert``, ``peer_untrusted``,
``peer_not_svid``, the ``token_*`` codes for a bad ``parent_token``,
``tenant_not_allowed``, ``agent_not_allowed``, ``scope_insufficient``,
``revoked``, ``audit_unavailable``) plus these, which only the issuer uses:

=======================  ======  ===============================================
``bad_request``          400     body not JSON / wrong types / unknown or missing
                                 members / ttl out of range; bad query (also 413
                                 body too large, 415 not ``application/json``)
``audience_not_allowed`` 403     an audience the registration (or, for a child,
                                 the parent token) does not allow
``spawn_too_deep``       403     the child's chain would be longer than 8
``spawn_not_allowed``    403     the parent token's ``sub`` is not named in the
                                 caller's ``spawn_from`` (DESIGN.md's code)
``forbidden``            403     not an admin (revocations), or a peer of another
                                 trust domain reading revocations
``not_found``            404     no such route; no checkpoint yet
``method_not_allowed``   405     wrong method for the route
``run_conflict``         409     the run id is bound to another tenant, agent,
                                 workload or parent; a child naming its parent's
                                 run or one of its ancestors
``store_unavailable``    503     the issuer's database failed
``internal_error``       500     anything unexpected (details only in server logs)
=======================  ======  ===============================================

These codes and statuses are defined once, in :mod:`axid.reasons`
(:data:`ISSUER_REASONS` is its issuer-only part).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from axid.issuer.errors import IssuerBaseError
from axid.reasons import ISSUER_REASONS
from mtls._problem import PROBLEM_MEDIA_TYPE, problem_document

__all__ = [
    "ISSUER_REASONS",
    "PROBLEM_MEDIA_TYPE",
    "Refusal",
    "problem_response",
]


class Refusal(IssuerBaseError):
    """A request is refused: becomes a problem+json answer (and a ``deny`` entry)."""

    status: int
    reason: str
    detail: str

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


def problem_response(
    status: int, reason: str, detail: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An ``application/problem+json`` response (RFC 9457) with a ``reason`` member."""
    all_headers = {"Cache-Control": "no-store"}
    if status == 401:
        # As the verifier does: the scheme names AXID, the error the reason code.
        all_headers["WWW-Authenticate"] = f'AXID error="{reason}"'
    if headers:
        all_headers.update(headers)
    return JSONResponse(
        problem_document(status, reason, detail),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=all_headers,
    )
