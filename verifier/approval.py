"""The verifier's approval step (DESIGN.md "Approvals"), between revocation (6) and
the custom checks (7), for a rule with ``approval: required``.

Without an ``X-AXID-Approval`` header the request is denied ``approval_required`` and
filed at the issuer (:class:`ApprovalFiler`: ``POST /v1/approvals`` over the mTLS
client the verifier already uses for keys and revocations, presenting this
service's own SVID); the problem+json names the approval (``approval: {id, url,
expires_at}``). The issuer unreachable, or answering anything but an approval:
503 ``approval_unavailable``.

With the header, the approval token is verified by :func:`axid.tokens.verify_approval`
(the shared verification, ``typ`` ``axid-approval+jwt``) and bound
(:func:`binding_problem`) to the peer (``sub``, ``cnf``), this request (method, raw
target with its query, body SHA-256) and the action token (``run``, ``tenant``);
``aud`` is checked by the verification. Each approval id allows one request across
replicas: it is claimed in the single-use table (:mod:`verifier.replay`) under
:func:`replay_key`, last, like a single-use jti.

:class:`ApprovalStep` is the step itself, a part of :class:`verifier.pipeline.Pipeline`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx

from axid.tokens import ActionClaims, ApprovalClaims, ApprovedRequest, TokenError, verify_approval
from verifier._steps import Deny, Facts, Presented, replay_call, short
from verifier.errors import VerifierError
from verifier.identity import PeerIdentity
from verifier.jwks import JwksSource
from verifier.replay import ReplayGuard
from verifier.rules import RouteRule

__all__ = [
    "APPROVAL_ID_PREFIX",
    "ApprovalFiler",
    "ApprovalStep",
    "ApprovalTicket",
    "ApprovalUnavailable",
    "binding_problem",
    "replay_key",
]

# Approval ids share the single-use table with jtis; a jti never holds ':'.
APPROVAL_ID_PREFIX: Final = "approval:"
_MAX_ANSWER: Final = 64 * 1024


class ApprovalUnavailable(VerifierError):
    """The issuer could not file the approval request (unreachable, or a bad answer)."""


@dataclass(frozen=True, slots=True)
class ApprovalTicket:
    """A filed approval request, as the deny's problem+json names it."""

    id: str
    url: str
    expires_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "expires_at": self.expires_at}


def replay_key(approval_id: str) -> str:
    """The approval id's row key in the single-use table."""
    return APPROVAL_ID_PREFIX + approval_id


def binding_problem(
    approval: ApprovalClaims,
    *,
    peer: PeerIdentity,
    action: ActionClaims,
    request: ApprovedRequest,
) -> str | None:
    """What the approval token is not bound to (a short note), or None if it is bound
    to this peer, this action token's run and tenant, and this exact request."""
    if not hmac.compare_digest(approval.sub.encode(), peer.spiffe_id.encode()):
        return "approved for another workload"
    if not hmac.compare_digest(approval.cnf_x5t_s256.encode(), peer.x5t_s256.encode()):
        return "approved for another certificate"
    if approval.run != action.run or approval.tenant != action.tenant:
        return "approved for another run"
    if approval.req.method != request.method:
        return "approved for another method"
    if approval.req.path != request.path:
        return "approved for another path"
    if not hmac.compare_digest(approval.req.body_sha256, request.body_sha256):
        return "approved for another body"
    return None


class ApprovalFiler:
    """Files approval requests at the issuer over the verifier's mTLS client."""

    def __init__(self, client: httpx.AsyncClient, url: str, *, timeout: float) -> None:
        self._client = client
        self._url = url.rstrip("/")
        self._timeout = timeout

    async def file(self, request: dict[str, Any]) -> ApprovalTicket:
        """POST the request; the issuer answers 201 (new) or 200 (the pending one for
        the same sub, run and req). Raises :class:`ApprovalUnavailable`."""
        try:
            response = await self._client.post(self._url, json=request, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise ApprovalUnavailable(f"the issuer is unreachable ({type(exc).__name__})") from None
        if response.status_code not in (200, 201) or len(response.content) > _MAX_ANSWER:
            raise ApprovalUnavailable(f"the issuer answered {response.status_code}")
        try:
            doc = response.json()
        except ValueError:
            raise ApprovalUnavailable("the issuer's answer is not JSON") from None
        return self._ticket(doc)

    def _ticket(self, doc: object) -> ApprovalTicket:
        if not isinstance(doc, dict):
            raise ApprovalUnavailable("the issuer's answer is not an object")
        approval_id, expires_at = doc.get("id"), doc.get("expires_at")
        if not isinstance(approval_id, str) or not approval_id.isascii():
            raise ApprovalUnavailable("the issuer's answer has no approval id")
        if not approval_id.replace("-", "").replace("_", "").isalnum() or len(approval_id) > 64:
            raise ApprovalUnavailable("the issuer's approval id is malformed")
        if type(expires_at) is not int or expires_at < 0:
            raise ApprovalUnavailable("the issuer's answer has no expires_at")
        return ApprovalTicket(approval_id, f"{self._url}/{approval_id}", expires_at)


class ApprovalStep:
    """The approval step's methods, mixed into :class:`verifier.pipeline.Pipeline`."""

    _approvals: ApprovalFiler | None
    _audience: str
    _clock: Callable[[], float]
    _issuer: str
    _jwks: JwksSource
    _leeway: int
    _service: str

    def _replay_store(self) -> ReplayGuard:  # pragma: no cover - Pipeline's
        raise NotImplementedError

    async def _approved(
        self,
        req: Presented,
        rule: RouteRule,
        claims: ActionClaims,
        peer: PeerIdentity,
        facts: Facts,
    ) -> ApprovalClaims:
        """The approval step: file the request (``approval_required``), or verify and
        bind the approval token and check its id is unused (claimed later)."""
        if req.approval_headers > 1:
            raise Deny("approval_invalid", "more than one approval header")
        if req.body_sha256 is None or req.target is None:
            raise Deny(
                "approval_invalid",
                "the request body is larger than this service approves",
                note="body over approvals.max_body",
            )
        request = ApprovedRequest(req.method, req.target, req.body_sha256)
        if req.approval is None:
            raise await self._filed(request, rule, claims)
        approval = self._verified_approval(req.approval)
        problem = binding_problem(approval, peer=peer, action=claims, request=request)
        if problem is not None:
            raise Deny("approval_invalid", "the approval is for another request", note=problem)
        store = self._replay_store()
        if await replay_call(store.used_by, replay_key(approval.approval)) is not None:
            raise Deny(
                "approval_invalid",
                "this approval was already used",
                note=f"approval {approval.approval} used before",
            )
        facts.add_note(f"approval {approval.approval} by {short(approval.approver)}")
        return approval

    async def _filed(self, request: ApprovedRequest, rule: RouteRule, claims: ActionClaims) -> Deny:
        """File the approval request at the issuer: the ``approval_required`` deny."""
        if self._approvals is None:
            raise Deny("approval_unavailable", "no approvals issuer is configured")
        body = {
            "service": self._audience,  # the approval token's aud
            "tenant": claims.tenant,
            "agent": claims.agent,
            "run": claims.run,
            "sub": claims.sub,
            "cnf": {"x5t#S256": claims.cnf_x5t_s256},
            "req": request.to_json(),
            "scope": rule.scope_required,
            "jti": claims.jti,
            "approvers": list(rule.approvers) if rule.approvers is not None else None,
        }
        try:
            ticket = await self._approvals.file(body)
        except ApprovalUnavailable as exc:
            raise Deny(
                "approval_unavailable", "the approval could not be requested", note=str(exc)
            ) from None
        return Deny(
            "approval_required",
            "this request needs an approval: poll the approval, then repeat the request "
            "with the approval token in X-AXID-Approval",
            note=f"approval {ticket.id} requested",
            approval=ticket.to_json(),
        )

    def _verified_approval(self, token: str) -> ApprovalClaims:
        keys = self._jwks.key_set()
        if keys is None:
            raise Deny("jwks_unavailable", "the issuer's keys are not available")
        try:
            return verify_approval(
                token,
                keys,
                issuer=self._issuer,
                audience=self._audience,
                now=self._clock(),
                leeway=self._leeway,
            )
        except TokenError as exc:
            if exc.reason == "token_expired":
                raise Deny("approval_expired", "the approval has expired") from None
            raise Deny(
                "approval_invalid", "the approval token is not valid", note=exc.reason
            ) from None

    async def _claim_approval(self, approval: ApprovalClaims) -> None:
        """Claim the approval id (atomic across replicas): one request per approval."""
        store = self._replay_store()
        key = replay_key(approval.approval)
        if not await replay_call(store.claim, key, approval.exp, int(self._clock())):
            raise Deny("approval_invalid", "this approval was already used")
