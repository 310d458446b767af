"""The issuer's rules, free of HTTP: who may mint what, spawning, revocation.

:meth:`IssuerService.mint` applies DESIGN.md's minting rules in this order; the
first failure wins (status, reason):

 1. the peer is registered (first matching registration)      403 agent_not_allowed
 2. the agent slug is one the registration allows               403 agent_not_allowed
 3. every audience is allowed by the registration              403 audience_not_allowed
 4. the scope is a subset of the registration's widest scope   403 scope_insufficient
 5. an asserted ``tenant`` is the registration's tenant         403 tenant_not_allowed
 6. ``ttl_seconds`` is at most the configured maximum           400 bad_request
 7. with ``parent_token``:
    a. it verifies against the issuer's own published keys
       (every check but the audience; leeway 0)                 401 token_*
    b. same tenant as the caller's registration                 403 tenant_not_allowed
    b'. the parent's ``sub`` matches a ``spawn_from`` pattern of
       the caller's registration (none without ``spawn_from``)  403 spawn_not_allowed
    c. the child run is neither the parent's run nor in its
       chain                                                    409 run_conflict
    d. ``len(parent.chain) + 1 <= 8``                           403 spawn_too_deep
    e. scope a subset of the parent's                           403 scope_insufficient
    f. audiences a subset of the parent's                       403 audience_not_allowed
    g. ``exp`` capped at the parent's ``exp``
 8. nothing revoked: the parent's jti, the child run and every
    run of its chain, the agent (and the parent's), the tenant  403 revoked
 9. the run binding: a run id is bound by its first mint to
    (tenant, agent, SPIFFE ID, parent) for good                 409 run_conflict
10. sign: ``sub`` = the peer's SPIFFE ID, ``cnf`` = its leaf's
    ``x5t#S256``; ``spawn_parent`` = parent.run, ``chain`` =
    parent.chain + [parent.run] (``null`` / ``[]`` for a root)

Every outcome is appended to the issuer's decision log by the caller (the app)
before it answers; the service fills a :class:`DecisionDraft` as it learns, which
ends in the log's one record type, :class:`~axid.audit.entry.DecisionFields`.

A parent token is a bearer credential, so holding one is not enough: only a workload
whose registration names the parent's ``sub`` in ``spawn_from`` may mint children
under its run (explicit delegation). So that attribution is never confused, the parent is
verified first (its error is still raised at step 7a, keeping the order above) and
every request carrying a parent token records the parent's ``jti``, ``run`` and
``sub`` in the decision-log entry's ``note``, refusals included; a parent that does
not verify is noted by its reason code only (its claims are untrusted).

A ``run_conflict`` with a run bound in ANOTHER tenant answers only "run id is not
available", so that a tenant cannot probe other tenants' run ids; within the tenant
the detail says what differs. (The decision log's note keeps the precise cause.)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError

from axid.audit.draft import DecisionDraft as AuditDecisionDraft
from axid.audit.entry import DecisionFields
from axid.audit.log import AuditUnavailable, DecisionLog
from axid.audit.receipt import Receipt
from axid.issuer._mint_checks import MintChecks
from axid.issuer.problems import Refusal
from axid.issuer.registry import Registration, Registry
from axid.issuer.schemas import MintRequest, RevocationRequest
from axid.issuer.store import IssuerStore, MintCheck, Revocation, RunConflict, RunRecord
from axid.keys import Keyring, KeyringError, KeySet, b64url_encode
from axid.tokens import (
    MAX_CHAIN_DEPTH,
    ActionClaims,
    TokenError,
    mint,
    verify_parent_token,
)
from mtls.spiffeid import SpiffeId, SpiffeIdPattern

__all__ = [
    "SERVICE_NAME",
    "DecisionDraft",
    "IssuerService",
    "Minted",
    "Peer",
]

SERVICE_NAME: Final = "axid-issuer"
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    """The verified mTLS peer of a request."""

    spiffe_id: SpiffeId
    x5t_s256: str


class DecisionDraft(AuditDecisionDraft):
    """What the issuer has learned of one request's decision so far: the log's
    :class:`~axid.audit.DecisionDraft`, with the issuer as its service."""

    __slots__ = ()

    def __init__(self, method: str, path: str) -> None:
        super().__init__(method, path, SERVICE_NAME)

    def set_peer(self, peer: Peer) -> None:
        self.peer = str(peer.spiffe_id)
        self.peer_cert = peer.x5t_s256


@dataclass(frozen=True)
class Minted:
    """A minted token; ``repr`` leaves the token out."""

    token: str = field(repr=False)
    jti: str
    kid: str
    expires_at: int
    tenant: str
    run: str
    spawn_parent: str | None
    chain: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The ``POST /v1/tokens`` answer."""
        return {
            "token": self.token,
            "jti": self.jti,
            "kid": self.kid,
            "expires_at": self.expires_at,
        }


def _finished(rec: DecisionDraft, decision: str, reason: str, iss: str) -> DecisionFields:
    rec.iss = iss  # every issuer decision is its own
    return rec.finish(decision, reason)


def _store_down() -> Refusal:
    return Refusal(503, "store_unavailable", "the issuer's database is unavailable")


def _parent_note(parent: ActionClaims) -> str:
    # sub last: jti and run stay whole even if a 2 KiB SPIFFE ID hits the note's cap.
    return f"parent jti {parent.jti} run {parent.run} sub {parent.sub}"


@dataclass(frozen=True, slots=True)
class _Grant:
    """What the caller's registration allows one mint request (steps 1-6)."""

    registration: Registration
    scope: frozenset[str]
    ttl: int

    @property
    def tenant(self) -> str:
        return self.registration.tenant


@dataclass(frozen=True, slots=True)
class _Lineage:
    """Where the new run hangs in its spawn tree; all empty for a root run."""

    chain: tuple[str, ...] = ()
    spawn_parent: str | None = None
    parent_jti: str | None = None
    parent_agent: str | None = None
    exp: int | None = None  # the parent's: the child's cap


_ROOT: Final = _Lineage()


def _check_parent(
    rec: DecisionDraft,
    req: MintRequest,
    grant: _Grant,
    parent: ActionClaims | TokenError | None,
) -> _Lineage:
    """Step 7: a child's parent, and the child's place under it (module docstring)."""
    if isinstance(parent, TokenError):
        raise Refusal(401, parent.reason, f"parent_token: {parent.message}")
    if parent is None:
        return _ROOT
    if parent.tenant != grant.tenant:
        raise Refusal(403, "tenant_not_allowed", "the parent token belongs to another tenant")
    if not grant.registration.may_spawn_from(parent.sub):
        raise Refusal(
            403, "spawn_not_allowed", "parent token's workload may not spawn this workload"
        )
    if req.run == parent.run or req.run in parent.chain:
        raise Refusal(
            409, "run_conflict", "a child run must differ from its parent's run and chain"
        )
    chain = (*parent.chain, parent.run)
    rec.chain, rec.spawn_parent = chain, parent.run
    if len(chain) > MAX_CHAIN_DEPTH:
        raise Refusal(403, "spawn_too_deep", f"spawn chains are at most {MAX_CHAIN_DEPTH} deep")
    if not grant.scope <= parent.scope:
        raise Refusal(403, "scope_insufficient", "a child's scope must be within its parent's")
    if not set(req.audiences) <= set(parent.aud):
        raise Refusal(
            403, "audience_not_allowed", "a child's audiences must be within its parent's"
        )
    return _Lineage(chain, parent.run, parent.jti, parent.agent, parent.exp)


class IssuerService:
    """Minting, revocation and the decision log, for one issuer (``iss``)."""

    def __init__(
        self,
        *,
        iss: str,
        keyring: Keyring,
        store: IssuerStore,
        registry: Registry,
        admins: Sequence[SpiffeIdPattern] = (),
        default_ttl: int = 120,
        max_ttl: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= default_ttl <= max_ttl <= 300:
            raise ValueError("need 1 <= default_ttl <= max_ttl <= 300")
        self.iss = iss
        self.keyring = keyring
        self.store = store
        self.registry = registry
        self.admins = tuple(admins)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock = clock
        self.log: DecisionLog | None = None
        self._checks = MintChecks(
            store, parallel=4 if store.engine.dialect.name == "postgresql" else 1
        )

    # ------------------------------------------------------------------ keys

    def reload_keys(self) -> None:
        """Pick up a rotation done by another process (``axid keys rotate``)."""
        try:
            if self.keyring.reload_if_changed():
                _log.info("keyring reloaded from %s", self.keyring.directory)
        except (KeyringError, OSError) as exc:
            # Keep signing with the keys we have; a half-written rotation retries later.
            _log.warning("keyring changed on disk but cannot be loaded: %s", exc)

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        self.reload_keys()
        return self.keyring.jwks(self.clock() if now is None else now, max_token_ttl=self.max_ttl)

    def key_set(self, now: float) -> KeySet:
        return self.keyring.key_set(now, max_token_ttl=self.max_ttl)

    # ------------------------------------------------------------------ decision log

    async def record(self, rec: DecisionDraft, decision: str, reason: str) -> Receipt:
        """Append one decision and return its receipt once it is committed; raises
        AuditUnavailable if it did not commit."""
        if self.log is None:
            raise AuditUnavailable("the issuer's decision log is not open")
        return await self.log.append(_finished(rec, decision, reason, self.iss))

    # ------------------------------------------------------------------ admin

    def is_admin(self, peer: Peer) -> bool:
        return any(p.matches(peer.spiffe_id) for p in self.admins)

    # ------------------------------------------------------------------ mint

    async def mint(self, rec: DecisionDraft, peer: Peer, req: MintRequest) -> Minted:
        """Apply the minting rules (module docstring) and sign; raises Refusal."""
        now_f = self.clock()
        now = int(now_f)  # token times are whole seconds; key choice uses the exact time
        rec.agent, rec.run, rec.scope_required = req.agent, req.run, req.scope
        self.reload_keys()
        # The parent is verified before the registration checks only so that every
        # refusal of a child mint names whose token was presented; its error still
        # surfaces at step 7a.
        parent = self._verify_parent(rec, req.parent_token, now_f, now)
        grant = self._check_registration(rec, peer, req)
        lineage = _check_parent(rec, req, grant, parent)
        # A child never outlives its parent (verify_parent_token: now < parent.exp).
        ttl = grant.ttl if lineage.exp is None else min(grant.ttl, lineage.exp - now)
        await self._bind_run(rec, peer, req, grant.tenant, lineage, now_f)
        return self._sign(rec, peer, req, grant, lineage, now_f, ttl)

    def _verify_parent(
        self, rec: DecisionDraft, token: str | None, now_f: float, now: int
    ) -> ActionClaims | TokenError | None:
        """Step 7a, early: the parent's claims, or why it did not verify (noted)."""
        if token is None:
            return None
        try:
            parent = verify_parent_token(token, self.key_set(now_f), issuer=self.iss, now=now)
        except TokenError as exc:
            rec.note = f"parent_token did not verify: {exc.reason}"
            return exc
        rec.note = _parent_note(parent)
        return parent

    def _check_registration(self, rec: DecisionDraft, peer: Peer, req: MintRequest) -> _Grant:
        """Steps 1-6: what the peer's registration lets this request have."""
        registration = self.registry.match(peer.spiffe_id)
        if registration is None:
            raise Refusal(403, "agent_not_allowed", "the peer's SPIFFE ID is not registered")
        rec.rule = registration.rule
        rec.tenant = registration.tenant
        if req.agent not in registration.agents:
            raise Refusal(403, "agent_not_allowed", "the registration does not allow this agent")
        if not set(req.audiences) <= registration.audiences:
            raise Refusal(
                403, "audience_not_allowed", "the registration does not allow this audience"
            )
        scope = req.scope_set
        if not scope <= registration.scope:
            raise Refusal(403, "scope_insufficient", "scope is wider than the registration allows")
        if req.tenant is not None and req.tenant != registration.tenant:
            raise Refusal(403, "tenant_not_allowed", "the peer is not registered for this tenant")
        ttl = self.default_ttl if req.ttl_seconds is None else req.ttl_seconds
        if ttl > self.max_ttl:
            raise Refusal(400, "bad_request", f"ttl_seconds: at most {self.max_ttl}")
        return _Grant(registration, scope, ttl)

    async def _bind_run(
        self,
        rec: DecisionDraft,
        peer: Peer,
        req: MintRequest,
        tenant: str,
        lineage: _Lineage,
        now_f: float,
    ) -> None:
        """Steps 8 and 9 as one database round: the revocation lookup, then (if nothing
        is revoked) the binding. Both read the database itself, no cache: a revocation
        committed by any replica is seen by the next mint."""
        chain = lineage.chain
        binding = RunRecord(
            run=req.run,
            tenant=tenant,
            agent=req.agent,
            spiffe_id=str(peer.spiffe_id),
            parent=lineage.spawn_parent,
            root=chain[0] if chain else req.run,
            depth=len(chain),
            created_at=int(now_f * 1000),
        )
        check = MintCheck(
            binding,
            jtis=(lineage.parent_jti,) if lineage.parent_jti else (),
            runs=(req.run, *chain),
            agents=(req.agent, lineage.parent_agent) if lineage.parent_agent else (req.agent,),
            tenants=(tenant,),
        )
        try:
            outcome = await self._checks.run(check)
        except SQLAlchemyError:
            raise _store_down() from None
        if isinstance(outcome, RunConflict):
            if outcome.existing.tenant != tenant:
                # Do not tell a tenant that a run id exists elsewhere; the log keeps it.
                rec.add_note("run id is bound in another tenant")
                raise Refusal(409, "run_conflict", "run id is not available")
            rec.add_note(f"run is bound with another {outcome.what}")
            raise Refusal(
                409, "run_conflict", f"the run is already bound with another {outcome.what}"
            )
        if outcome is not None:
            raise Refusal(
                403, "revoked", f"{outcome.kind} {outcome.value} is revoked (seq {outcome.seq})"
            )

    def _sign(
        self,
        rec: DecisionDraft,
        peer: Peer,
        req: MintRequest,
        grant: _Grant,
        lineage: _Lineage,
        now_f: float,
        ttl: int,
    ) -> Minted:
        """Step 10: the token, for the peer and bound to its certificate."""
        now = int(now_f)
        key = self.keyring.signing_key(now_f)
        jti = b64url_encode(os.urandom(16))  # 128-bit random (DESIGN.md)
        token = mint(
            key=key,
            iss=self.iss,
            sub=str(peer.spiffe_id),
            aud=req.audience if isinstance(req.audience, str) else list(req.audience),
            tenant=grant.tenant,
            agent=req.agent,
            run=req.run,
            spawn_parent=lineage.spawn_parent,
            chain=lineage.chain,
            scope=grant.scope,
            cnf_x5t_s256=peer.x5t_s256,
            now=now,
            ttl=ttl,
            jti=jti,
        )
        rec.kid, rec.jti = key.kid, jti
        return Minted(
            token,
            jti,
            key.kid,
            now + ttl,
            grant.tenant,
            req.run,
            lineage.spawn_parent,
            lineage.chain,
        )

    # ------------------------------------------------------------------ revocation

    async def revoke(
        self, rec: DecisionDraft, peer: Peer, req: RevocationRequest
    ) -> tuple[Revocation, list[Revocation]]:
        """Store a revocation by an admin peer; raises Refusal."""
        rec.note = f"revoke {req.kind} {req.value}: {req.reason}"
        if req.kind == "jti":
            rec.jti = req.value
        elif req.kind == "run":
            rec.run = req.value
        elif req.kind == "agent":
            rec.agent = req.value
        else:
            rec.tenant = req.value
        if not self.is_admin(peer):
            raise Refusal(403, "forbidden", "only admin SPIFFE IDs may revoke")
        req.check_value()
        now_ms = int(self.clock() * 1000)
        try:
            return await anyio.to_thread.run_sync(
                lambda: self.store.revoke(
                    req.kind, req.value, req.reason, created_by=str(peer.spiffe_id), now_ms=now_ms
                )
            )
        except SQLAlchemyError:
            raise _store_down() from None

    async def revocations(self, since: int, limit: int) -> list[Revocation]:
        try:
            return await anyio.to_thread.run_sync(self.store.revocations, since, limit)
        except SQLAlchemyError:
            raise _store_down() from None
