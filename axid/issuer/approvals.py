"""The issuer's approvals desk (DESIGN.md "Approvals"): filing, listing, showing and
deciding approval requests, minting the approval token, recording every step.

Who may do what (issuer config ``approvals``):

* file (``POST /v1/approvals``): for the ``service`` it names (the approval token's
  ``aud``), a peer matching that service's patterns in ``approvals.services``
  (``{service name: [SPIFFE ID patterns]}``, the SVIDs running its verifier); any
  other service name or peer is refused 403 ``forbidden`` and recorded (fail closed:
  none configured, nobody may file). A pending, unexpired request of the same
  (``sub``, ``run``, ``req``) is returned instead of a new one (200, same id); a new
  one is 201.
* list (``GET /v1/approvals[?status=...]``): approvers; each sees the requests whose
  approvers (the rule's ``approvers``, else ``approvals.approvers``) match them.
* show (``GET /v1/approvals/{id}``): the requesting agent (its ``sub``) or one of the
  request's approvers; once approved, the approval token (the same on every poll).
* decide (``POST /v1/approvals/{id}/decision``, ``{decision: approve|deny, note}``):
  one of the request's approvers, never the request's own ``sub``; once, while the
  request is pending and unexpired.

Undecided requests expire after ``approvals.timeout`` seconds (default 900) and
count as denied: no token is ever minted for them. Expiry is swept in the issuer's
background every ``min(5 s, timeout/2)`` (see :mod:`axid.issuer._routes.approvals`)
and at the start of every approvals request (:meth:`ApprovalDesk.sweep`); each
expiry is recorded once, by the replica whose conditional UPDATE expired it.
Every filing, decision, refusal and expiry is an entry in the issuer's decision log
(``peer`` the filing service, the approver, or the caller). ``approvals.notify_url``
(optional) gets a JSON POST (best effort, in the background) per new request.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

import httpx

from axid.issuer.approval_settings import _SERVICE_RE, ApprovalSettings, _patterns
from axid.issuer.approval_store import STATUSES, ApprovalRecord, ApprovalStore
from axid.issuer.problems import Refusal
from axid.issuer.service import DecisionDraft, IssuerService, Peer
from axid.tokens import APPROVAL_TOKEN_TYPE, ApprovedRequest, TokenError, mint_approval
from mtls.spiffeid import SpiffeIdError, SpiffeIdPattern, parse_spiffe_id

__all__ = ["ApprovalDesk", "ApprovalSettings"]

_log = logging.getLogger(__name__)

_FILE_KEYS: Final = frozenset(
    {"service", "tenant", "agent", "run", "sub", "cnf", "req", "scope", "jti", "approvers"}
)
_SLUG_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RUN_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
_CNF_RE: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_JTI_RE: Final = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
_SCOPE_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*")
_MAX_NOTE: Final = 500
APPROVAL_TTL: Final = 300


def _bad(detail: str) -> Refusal:
    return Refusal(400, "bad_request", detail)


def _text(doc: Mapping[str, Any], key: str, regex: re.Pattern[str]) -> str:
    value = doc[key]
    if not isinstance(value, str) or regex.fullmatch(value) is None:
        raise _bad(f"{key} is malformed")
    return value


def _filing(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The store's columns of a filing body (strict: exactly DESIGN's members)."""
    if set(doc) != _FILE_KEYS:
        raise _bad(f"an approval request has exactly the members {sorted(_FILE_KEYS)}")
    sub = doc["sub"]
    try:
        if not isinstance(sub, str) or parse_spiffe_id(sub).path == "":
            raise _bad("sub must be a SPIFFE workload ID")
    except SpiffeIdError:
        raise _bad("sub must be a SPIFFE workload ID") from None
    cnf = doc["cnf"]
    if not isinstance(cnf, dict) or set(cnf) != {"x5t#S256"}:
        raise _bad("cnf must be {x5t#S256}")
    if not isinstance(cnf["x5t#S256"], str) or _CNF_RE.fullmatch(cnf["x5t#S256"]) is None:
        raise _bad("cnf.x5t#S256 must be 32 bytes of base64url")
    try:
        req = ApprovedRequest.parse(doc["req"])
    except TokenError as exc:
        raise _bad(exc.message) from None
    scope, jti, approvers = doc["scope"], doc["jti"], doc["approvers"]
    if scope is not None and (not isinstance(scope, str) or _SCOPE_RE.fullmatch(scope) is None):
        raise _bad("scope is malformed")
    if jti is not None and (not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None):
        raise _bad("jti is malformed")
    if approvers is not None:
        try:
            approvers = [str(p) for p in _patterns(approvers, "approvers")] or None
        except ValueError as exc:
            raise _bad(str(exc)) from None
    return {
        "aud": _text(doc, "service", _SERVICE_RE),
        "tenant": _text(doc, "tenant", _SLUG_RE),
        "agent": _text(doc, "agent", _SLUG_RE),
        "run": _text(doc, "run", _RUN_RE),
        "sub": sub,
        "cnf": cnf["x5t#S256"],
        "method": req.method,
        "path": req.path,
        "body_sha256": req.body_sha256,
        "scope": scope,
        "jti": jti,
        "approvers": approvers,
    }


def _draft(method: str, path: str, record: ApprovalRecord) -> DecisionDraft:
    """A log entry about ``record`` (its tenant, agent, run, action jti, scope)."""
    rec = DecisionDraft(method, path)
    rec.tenant, rec.agent, rec.run = record.tenant, record.agent, record.run
    rec.jti, rec.scope_required = record.jti, record.scope
    return rec


class ApprovalDesk:
    """Approval requests over :class:`ApprovalStore`, recorded in the issuer's log."""

    def __init__(
        self, service: IssuerService, store: ApprovalStore, settings: ApprovalSettings
    ) -> None:
        self.service = service
        self.store = store
        self.settings = settings
        self._notifying: set[asyncio.Task[None]] = set()

    def _now(self) -> int:
        return int(self.service.clock())

    def _approvers(self, record: ApprovalRecord) -> tuple[SpiffeIdPattern, ...]:
        if record.approvers is not None:
            return tuple(SpiffeIdPattern.parse(p) for p in record.approvers)
        return self.settings.approvers

    def may_decide(self, peer: Peer, record: ApprovalRecord) -> bool:
        """An approver of ``record`` that is not the request's own agent."""
        if str(peer.spiffe_id) == record.sub:
            return False
        return any(p.matches(peer.spiffe_id) for p in self._approvers(record))

    def _may_read(self, peer: Peer, record: ApprovalRecord) -> bool:
        if str(peer.spiffe_id) == record.sub:
            return True
        return any(p.matches(peer.spiffe_id) for p in self._approvers(record))

    async def sweep(self) -> None:
        """Expire what is due and record each expiry (``approval_expired``) once."""
        expired = await asyncio.to_thread(self.store.expire_due, self._now())
        for record in expired:
            rec = _draft("POST", f"/v1/approvals/{record.id}", record)
            rec.add_note(f"approval {record.id} expired undecided (counts as denied)")
            await self.service.record(rec, "deny", "approval_expired")

    async def file(
        self, rec: DecisionDraft, peer: Peer, doc: Mapping[str, Any]
    ) -> tuple[ApprovalRecord, bool]:
        """File (or reuse) a request; refusals raise :class:`Refusal`. The caller
        records ``rec`` (filled in here) as the allow."""
        # Before the body is read: a peer that may file for no service learns nothing
        # from its validation.
        if not self.settings.may_file(peer.spiffe_id):
            raise Refusal(403, "forbidden", "only approvals.services may file approval requests")
        fields = _filing(doc)
        rec.tenant, rec.agent, rec.run = fields["tenant"], fields["agent"], fields["run"]
        rec.jti, rec.scope_required = fields["jti"], fields["scope"]
        if not self.settings.may_file(peer.spiffe_id, fields["aud"]):
            refused = f"approvals.services does not let this peer file for {fields['aud']!r}"
            rec.add_note(refused)
            raise Refusal(403, "forbidden", refused)
        fields["filed_by"] = str(peer.spiffe_id)
        record, new = await asyncio.to_thread(
            self.store.file, fields, now=self._now(), timeout=self.settings.timeout
        )
        rec.add_note(
            f"approval {record.id} {'requested' if new else 'reused'}: "
            f"{record.method} {record.path[:200]} at {record.aud} for {record.sub}"
        )
        if new and self.settings.notify_url is not None:
            self._notify(record)
        return record, new

    async def listing(self, peer: Peer, status: str | None) -> list[ApprovalRecord]:
        if status is not None and status not in STATUSES:
            raise _bad(f"status must be one of {', '.join(STATUSES)}")
        records = await asyncio.to_thread(self.store.list, status)
        if not self.settings.approvers and not any(r.approvers for r in records):
            raise Refusal(403, "forbidden", "only approvers may list approval requests")
        mine = [r for r in records if self._may_read(peer, r) and str(peer.spiffe_id) != r.sub]
        if not mine and not any(p.matches(peer.spiffe_id) for p in self.settings.approvers):
            raise Refusal(403, "forbidden", "only approvers may list approval requests")
        return mine

    async def show(self, peer: Peer, approval_id: str) -> ApprovalRecord:
        record = await asyncio.to_thread(self.store.get, approval_id)
        if record is None or not self._may_read(peer, record):
            # One answer for both: nobody learns which ids exist.
            raise Refusal(404, "not_found", "no such approval request for this caller")
        return record

    async def decide(
        self, rec: DecisionDraft, peer: Peer, approval_id: str, doc: Mapping[str, Any]
    ) -> ApprovalRecord:
        """Approve or deny; the caller records ``rec`` as the allow."""
        if set(doc) - {"decision", "note"} or doc.get("decision") not in ("approve", "deny"):
            raise _bad("the body is {decision: approve|deny, note?}")
        note = doc.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > _MAX_NOTE):
            raise _bad(f"note must be a string of at most {_MAX_NOTE} characters")
        record = await asyncio.to_thread(self.store.get, approval_id)
        if record is None:
            raise Refusal(404, "not_found", "no such approval request")
        rec.tenant, rec.agent, rec.run = record.tenant, record.agent, record.run
        rec.jti, rec.scope_required = record.jti, record.scope
        if not self.may_decide(peer, record):
            raise Refusal(403, "forbidden", "not an approver of this request (or its own agent)")
        approve = doc["decision"] == "approve"
        decided = await asyncio.to_thread(
            self.store.decide,
            approval_id,
            approve=approve,
            by=str(peer.spiffe_id),
            note=note,
            now=self._now(),
            token=lambda r: self._mint(r, str(peer.spiffe_id)),
        )
        if decided is None:  # decided by someone else meanwhile, or expired
            current = await asyncio.to_thread(self.store.get, approval_id)
            if current is None or current.status in ("expired", "pending"):
                raise Refusal(403, "approval_expired", "the request expired undecided")
            raise Refusal(403, "approval_invalid", f"the request was already {current.status}")
        verb = "approved" if approve else "denied"
        rec.add_note(f"approval {record.id} {verb}" + (f": {note}" if note else ""))
        return decided

    def _mint(self, record: ApprovalRecord, approver: str) -> str:
        now = self._now()
        key = self.service.keyring.signing_key(now)
        token = mint_approval(
            key=key,
            iss=self.service.iss,
            sub=record.sub,
            aud=record.aud,
            tenant=record.tenant,
            run=record.run,
            approval=record.id,
            approver=approver,
            req=ApprovedRequest(record.method, record.path, record.body_sha256),
            cnf_x5t_s256=record.cnf,
            now=now,
            ttl=APPROVAL_TTL,
        )
        _log.debug("minted an %s for approval %s", APPROVAL_TOKEN_TYPE, record.id)
        return token

    def _notify(self, record: ApprovalRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._post_notice(record))
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _post_notice(self, record: ApprovalRecord) -> None:
        assert self.settings.notify_url is not None
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
                await client.post(self.settings.notify_url, json=record.to_json())
        except httpx.HTTPError as exc:
            _log.warning("approvals.notify_url failed: %s", type(exc).__name__)
