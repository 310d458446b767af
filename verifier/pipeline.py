"""The decision pipeline, steps 1-7 of DESIGN.md, free of ASGI.

:meth:`Pipeline.decide` takes what a request presented and its route rule and
returns a :class:`~verifier.decision.Decision`, stopping at the first failure:

1. peer identity (TLS chain, or XFCC from a trusted proxy)    -> SPIFFE ID  (identity.py)
2. the token header, verified (EdDSA, typ, kid in the key set, claims, times,
   ``iss``, ``aud``)                                          -> claims     (axid.tokens)
3. ``sub`` equals the peer's SPIFFE ID, ``cnf.x5t#S256`` the peer leaf's hash
   (constant-time)                                  subject_mismatch / cert_binding_mismatch
4. ``aud`` holds this service (checked in 2), ``tenant`` is served here
5. the route rule: allowed agents, tenants, required scope, single use (rules.py,
   replay.py); no rule at all -> ``scope_insufficient``
6. not revoked (jti, run, any run of the chain, agent, tenant)     (revocation.py)
   then, for an ``approval: required`` rule, the approval step     (approval.py)
7. custom checks                                                   (checks.py)
   then the approval id and, for a ``single_use`` rule, the jti are claimed (replay.py)

Step 8, committing the decision to the log before the app runs, is the
middleware's (middleware.py). What the steps share (:class:`Presented`, the private
deny, the log fields they fill in, the single-use store call) is in _steps.py.

Verified tokens are cached by their exact text (bounded LRU) so a repeated token
costs no signature check; each hit is re-checked for time (nbf/exp/iat with
leeway) and its ``kid`` still being in the current key set, and steps 3-7 always
run.

Single use: step 5 only looks whether the jti was used already (``replayed``, so the
reasons keep DESIGN's order); the jti is claimed last, after steps 6 and 7, so a
request denied for any other reason (a stale revocation list included) does not
burn the token. The claim is atomic in the shared table (replay.py): of concurrent
requests with one token, exactly one claims it and the others are ``replayed``, even
though each of them may have run the custom checks (what a check reserved, like
:class:`~verifier.budget.BudgetLedger`'s budget, is released, through its
``CheckResult.undo``, for a request that then loses that race or is denied by a
later check; :meth:`Pipeline.decide_with_undo` hands the undo of an allow to the
middleware, for a log append that fails). The claim precedes the log append, so a
token the log then fails to record (503 ``audit_unavailable``) is spent.

A request the middleware could not match to any rule because its method or path is
not in normal form (``Presented.unroutable``) is denied ``scope_insufficient`` at
step 5 (or earlier, by steps 1-4), with that explanation in the note.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final

from axid.keys import KeySet
from axid.tokens import ActionClaims, TokenError, verify
from verifier._steps import Deny, Facts, Presented, replay_call, short
from verifier.approval import ApprovalFiler, ApprovalStep
from verifier.checks import CheckResult, RequestInfo, Undo, check_name
from verifier.config import VerifierConfig
from verifier.decision import Decision, VerifiedAction
from verifier.identity import PeerError, PeerIdentity, PeerResolver
from verifier.jwks import JwksSource
from verifier.replay import ReplayGuard
from verifier.revocation import RevocationSource
from verifier.rules import RouteRule

__all__ = ["Pipeline", "Presented", "TokenCache"]

_Facts = Facts  # the name bench/verifier.py imports

# Failures axid.tokens.verify reports only after the signature verified: the
# claims of such a token are the issuer's, and worth recording.
_SIGNED_FAILURES: Final = frozenset(
    {"token_expired", "token_not_yet_valid", "token_wrong_issuer", "token_wrong_audience"}
)

_log = logging.getLogger(__name__)


class TokenCache:
    """Verified claims by exact token text: a bounded LRU. Only successes go in."""

    __slots__ = ("_entries", "_max", "hits", "misses")

    def __init__(self, maxsize: int = 4096) -> None:
        self._entries: OrderedDict[str, ActionClaims] = OrderedDict()
        self._max = maxsize
        self.hits = 0
        self.misses = 0

    def get(self, token: str, keys: KeySet) -> ActionClaims | None:
        claims = self._entries.get(token)
        if claims is None:
            self.misses += 1
            return None
        if claims.kid not in keys:  # its key left the key set: verify afresh (and fail)
            del self._entries[token]
            self.misses += 1
            return None
        self._entries.move_to_end(token)
        self.hits += 1
        return claims

    def put(self, token: str, claims: ActionClaims) -> None:
        if self._max <= 0:
            return
        self._entries[token] = claims
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, token: str) -> None:
        self._entries.pop(token, None)

    def __len__(self) -> int:
        return len(self._entries)


def _time_problem(claims: ActionClaims, now: float, leeway: int) -> str | None:
    """The time checks of axid.tokens.verify (steps 15-17), for a cached token."""
    if now < claims.nbf - leeway:
        return "token_not_yet_valid"
    if now >= claims.exp + leeway:
        return "token_expired"
    if claims.iat > now + leeway:
        return "token_not_yet_valid"
    return None


def _bound(claims: ActionClaims, peer: PeerIdentity) -> None:
    """Step 3: minted for this peer's SPIFFE ID and its very certificate (constant-time)."""
    if not hmac.compare_digest(claims.sub.encode(), peer.spiffe_id.encode()):
        raise Deny("subject_mismatch", "the token was minted for another workload")
    if not hmac.compare_digest(claims.cnf_x5t_s256.encode(), peer.x5t_s256.encode()):
        raise Deny(
            "cert_binding_mismatch",
            "the token is bound to another certificate of this workload",
        )


class Pipeline(ApprovalStep):
    """Steps 1-7 for one verifier; built by the middleware from its config."""

    def __init__(
        self,
        *,
        config: VerifierConfig,
        peers: PeerResolver,
        jwks: JwksSource,
        revocations: RevocationSource,
        replay: ReplayGuard | None = None,
        clock: Callable[[], float] | None = None,
        approvals: ApprovalFiler | None = None,
    ) -> None:
        self._issuer = config.issuer
        self._service = config.service
        self._audience = config.audience
        self._leeway = config.leeway
        self._tenants = None if config.any_tenant else frozenset(config.tenants)
        self._checks = tuple((check_name(c), c) for c in config.checks)
        self._check_timeout = config.check_timeout
        self._clock = clock or config.clock
        self._peers = peers
        self._jwks = jwks
        self._revocations = revocations
        self._replay = replay
        self._approvals = approvals
        self._service = config.service
        self.token_cache = TokenCache(config.token_cache_size)

    async def decide(self, request: Presented, rule: RouteRule | None) -> Decision:
        """Steps 1-7 for a governed request (see the module docstring)."""
        return (await self.decide_with_undo(request, rule))[0]

    async def decide_with_undo(
        self, request: Presented, rule: RouteRule | None
    ) -> tuple[Decision, Undo | None]:
        """:meth:`decide`, and for an allow whose checks reserved something, what
        releases it (never raises) if the allow cannot be recorded; else None."""
        facts = Facts(
            rule,
            request.method if request.logged_method is None else request.logged_method,
            request.path if request.logged_path is None else request.logged_path,
            self._service,
        )
        facts.add_note(request.unroutable)  # recorded whichever step denies
        try:
            action, undo = await self._steps(request, rule, facts)
        except Deny as deny:
            facts.add_note(deny.note)
            return Decision.of(facts, deny.reason, deny.detail, approval=deny.approval), None
        return Decision.of(facts, "ok", action=action), undo

    async def _steps(
        self, req: Presented, rule: RouteRule | None, facts: Facts
    ) -> tuple[VerifiedAction, Undo | None]:
        peer = self._peer(req, facts)  # 1
        if req.token_headers > 1:  # 2
            raise Deny("token_malformed", "more than one token header")
        if req.token is None:
            raise Deny("token_missing", "no action token was presented")
        claims = await self._verify_token(req.token, facts)
        facts.set_claims(claims)
        _bound(claims, peer)  # 3
        rule = self._authorized(req, rule, claims)  # 4, 5
        if rule.single_use:
            await self._unused(claims)  # a look only: claimed last, see the module doc
        self._not_revoked(claims)  # 6
        approval = None
        if rule.approval_required:  # between 6 and 7: budgets only for approved requests
            approval = await self._approved(req, rule, claims, peer, facts)
        action = VerifiedAction.from_claims(claims)
        undo = None
        if self._checks:
            undo = await self._checked(action, req.info.for_rule(rule), facts)  # 7
        # The consuming steps, last (before the middleware's log append).
        if rule.single_use or approval is not None:
            try:
                if approval is not None:
                    await self._claim_approval(approval)
                if rule.single_use:
                    await self._claim_once(claims)
            except BaseException:  # not allowed in the end: release what checks reserved
                if undo is not None:
                    await undo()
                raise
        return action, undo

    def _peer(self, req: Presented, facts: Facts) -> PeerIdentity:
        """Step 1: the peer's identity."""
        try:
            peer = self._peers.resolve(
                req.tls_chain, req.client_ip, req.xfcc, xfcc_headers=req.xfcc_headers
            )
        except PeerError as exc:
            facts.peer_cert = exc.peer_cert
            facts.add_note(exc.note)
            raise Deny(exc.reason, exc.detail, note=exc.detail) from None
        facts.set_peer(peer)
        return peer

    def _authorized(
        self, req: Presented, rule: RouteRule | None, claims: ActionClaims
    ) -> RouteRule:
        """Steps 4 (audience, checked by verify, and tenant) and 5 (the route rule, but
        for the single-use look)."""
        if self._tenants is not None and claims.tenant not in self._tenants:
            raise Deny("tenant_not_allowed", "this service does not serve the token's tenant")
        if rule is None:
            if req.unroutable is not None:  # already in the note (decide)
                raise Deny(
                    "scope_insufficient", "the request's method or path is not in normal form"
                )
            raise Deny("scope_insufficient", "no route rule covers this request")
        if rule.agents is not None and claims.agent not in rule.agents:
            raise Deny("agent_not_allowed", "this route does not allow the token's agent")
        if rule.tenants is not None and claims.tenant not in rule.tenants:
            raise Deny("tenant_not_allowed", "this route does not allow the token's tenant")
        if not rule.scope <= claims.scope:
            missing = " ".join(sorted(rule.scope - claims.scope))
            raise Deny(
                "scope_insufficient",
                "the token's scope lacks what this route requires",
                note=f"missing {missing}",
            )
        return rule

    def _not_revoked(self, claims: ActionClaims) -> None:
        """Step 6."""
        revocations = self._revocations.current()
        if revocations is None:
            raise Deny("revocation_unavailable", "the revocation list is not fresh")
        hit = revocations.match(claims)
        if hit is not None:
            raise Deny("revoked", "the action is revoked", note=hit.describe())

    async def _checked(
        self, action: VerifiedAction, info: RequestInfo, facts: Facts
    ) -> Undo | None:
        """Step 7: the custom checks, in order; the first deny (or failure) denies, with
        the check's reason (403), and releases what the checks before it reserved.
        Returns what releases the reservations of an allow (None if there are none)."""
        undos: list[Undo] = []
        try:
            for name, check in self._checks:
                result = await self._run_check(name, check, action, info)
                note = f"{name}: {result.note}" if result.note else None
                if not result.allow:
                    raise Deny(result.deny_reason, "denied by a custom check", note=note or name)
                facts.add_note(note)
                if result.undo is not None:
                    undos.append(result.undo)
        except BaseException:
            await self._undo(undos)
            raise
        if not undos:
            return None
        return lambda: self._undo(undos)

    async def _run_check(
        self, name: str, check: Any, action: VerifiedAction, info: RequestInfo
    ) -> CheckResult:
        try:
            async with asyncio.timeout(self._check_timeout):
                result = await check(action, info)
        except (Exception, asyncio.CancelledError) as exc:  # a failing check denies
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise  # the request itself is cancelled (client gone, shutdown)
            raise Deny(
                "custom_check_denied",
                "a custom check failed",
                note=f"{name}: failed ({type(exc).__name__})",
            ) from None
        if not isinstance(result, CheckResult):
            raise Deny(
                "custom_check_denied",
                "a custom check failed",
                note=f"{name}: returned no CheckResult",
            )
        return result

    async def _undo(self, undos: Sequence[Undo]) -> None:
        """Release what allowing checks reserved, last first. An undo that fails or
        outlasts ``check_timeout`` is logged and skipped (its reservation stays)."""
        for undo in reversed(undos):
            try:
                async with asyncio.timeout(self._check_timeout):
                    await undo()
            except Exception:
                _log.warning("a custom check's undo failed; its reservation stays", exc_info=True)

    async def _verify_token(self, token: str, facts: Facts) -> ActionClaims:
        keys = self._jwks.key_set()
        if keys is None:
            raise Deny("jwks_unavailable", "the issuer's keys are not available")
        now = self._clock()
        claims = self.token_cache.get(token, keys)
        if claims is not None:
            problem = _time_problem(claims, now, self._leeway)
            if problem is not None:
                facts.set_claims(claims)
                if problem == "token_expired":
                    self.token_cache.discard(token)
                raise Deny(problem, "the token is outside its validity window")
            return claims
        try:
            claims = self._verify(token, keys, now)
        except TokenError as exc:
            if exc.reason != "token_unknown_kid":
                raise self._token_denial(exc, token, facts) from None
            # A rotated key may have started signing: refetch (rate limited) and retry.
            await self._jwks.refresh_for_unknown_kid()
            fresh = self._jwks.key_set()
            if fresh is None or fresh is keys:
                raise self._token_denial(exc, token, facts) from None
            try:
                claims = self._verify(token, fresh, now)
            except TokenError as again:
                raise self._token_denial(again, token, facts) from None
        self.token_cache.put(token, claims)
        return claims

    def _verify(self, token: str, keys: KeySet, now: float) -> ActionClaims:
        return verify(
            token, keys, issuer=self._issuer, audience=self._audience, now=now, leeway=self._leeway
        )

    @staticmethod
    def _token_denial(exc: TokenError, token: str, facts: Facts) -> Deny:
        if exc.reason in _SIGNED_FAILURES:
            facts.set_signed_payload(token)
        return Deny(exc.reason, exc.message)

    def _replay_store(self) -> ReplayGuard:
        if self._replay is None:  # a single_use rule without a store: refuse, never allow twice
            raise Deny("audit_unavailable", "no single-use store is configured")
        return self._replay

    async def _unused(self, claims: ActionClaims) -> None:
        """Step 5: deny ``replayed`` if the jti was claimed already (consumes nothing)."""
        used_by = await replay_call(self._replay_store().used_by, claims.jti)
        if used_by is not None:
            raise Deny(
                "replayed",
                "this single-use token was already used",
                note=f"first used by service {short(used_by)}",
            )

    async def _claim_once(self, claims: ActionClaims) -> None:
        """Claim the jti (atomic across replicas); ``replayed`` if another request did."""
        replay = self._replay_store()
        if not await replay_call(replay.claim, claims.jti, claims.exp, int(self._clock())):
            raise Deny("replayed", "this single-use token was already used")


def _being_cancelled() -> bool:
    """Whether the current task has been asked to cancel (not a stray CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
