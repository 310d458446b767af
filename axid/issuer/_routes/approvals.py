"""The approvals routes (DESIGN.md route table; who may call which: see
:mod:`axid.issuer.approvals`):

* ``POST /v1/approvals``: a verifier files a request (recorded; 201 new, 200 reused);
* ``GET /v1/approvals[?status=pending]``: approvers list what they may decide;
* ``GET /v1/approvals/{id}``: the requesting agent or an approver polls it; once
  approved the answer carries ``token``, the approval token (the same on every poll);
* ``POST /v1/approvals/{id}/decision``: an approver decides (recorded, ``peer`` the
  approver).

Reads are not recorded (like the revocation feed); filings, decisions, their
refusals and expiries are. The desk is built once per app, on first use, from the
app's state and ``components.approvals`` (issuer config ``approvals``).
:func:`sweep_forever` (run by the app's lifespan) expires due requests and records
each expiry without waiting for a request, every ``approvals`` ``sweep_interval``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from fastapi import APIRouter, FastAPI
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from axid._approval_claims import APPROVAL_ID_RE
from axid.issuer._http import read_json, receipt_headers
from axid.issuer._state import IssuerState, state_of
from axid.issuer.approval_store import ApprovalStore
from axid.issuer.approvals import ApprovalDesk, ApprovalSettings
from axid.issuer.problems import Refusal
from axid.issuer.service import DecisionDraft
from axid.tokens import APPROVAL_TOKEN_TYPE

__all__ = ["install", "router", "sweep_forever"]

_log = logging.getLogger("axid.issuer.app")
_ROUTE: Final = "approvals"
_NO_STORE: Final = {"Cache-Control": "no-store"}

router = APIRouter()


def install(app: FastAPI) -> None:
    """Add the approvals routes to ``app``."""
    app.include_router(router)


def _new_desk(state: IssuerState) -> ApprovalDesk:
    settings: ApprovalSettings = state.components.approvals
    store = ApprovalStore(state.components.store.engine)
    store.create_schema()
    return ApprovalDesk(state.service, store, settings)


def desk_of(request: Request) -> ApprovalDesk:
    """The app's approvals desk (built, and its table created, on first use)."""
    desk: ApprovalDesk | None = getattr(request.app.state, "approval_desk", None)
    if desk is None:
        desk = request.app.state.approval_desk = _new_desk(state_of(request))
    return desk


async def sweep_forever(app: FastAPI, stop: asyncio.Event) -> None:
    """Expire due requests and record each expiry, every ``sweep_interval`` seconds,
    until ``stop`` is set (a sweep under way finishes first: an expiry it marked is
    also recorded). A failure (the database, the log) is logged and retried at the
    next tick: the sweep never ends the app. An expiry marked but not recorded (the
    log failed after the store) stays unrecorded."""
    state: IssuerState = app.state.issuer_state
    interval = state.components.approvals.sweep_interval
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        try:
            desk: ApprovalDesk | None = getattr(app.state, "approval_desk", None)
            if desk is None:  # built off the loop: the database may be slow or down
                built = await asyncio.to_thread(_new_desk, state)
                desk = getattr(app.state, "approval_desk", None) or built
                app.state.approval_desk = desk
            await desk.sweep()
        except Exception as exc:
            _log.warning("approvals expiry sweep failed (retrying): %s", type(exc).__name__)


def _id(approval_id: str) -> str:
    if APPROVAL_ID_RE.fullmatch(approval_id) is None:
        raise Refusal(404, "not_found", "no such approval request")
    return approval_id


async def _recorded(
    state: IssuerState, rec: DecisionDraft, body: dict[str, object], status: int
) -> Response:
    try:
        receipt = await state.service.record(rec, "allow", "ok")
    except Exception as exc:
        return state.audit_down(_ROUTE, exc)
    state.metrics.decisions.labels(_ROUTE, "allow", "ok").inc()
    return JSONResponse(body, status_code=status, headers=receipt_headers(receipt, _NO_STORE))


async def _refused(state: IssuerState, rec: DecisionDraft, exc: Exception) -> Response:
    if isinstance(exc, Refusal):
        return await state.refuse(rec, _ROUTE, exc)
    if isinstance(exc, SQLAlchemyError):
        _log.warning("approvals store failed: %s", type(exc).__name__)
        refusal = Refusal(503, "store_unavailable", "the issuer's database failed")
    else:
        _log.exception("approvals request failed unexpectedly")
        refusal = Refusal(500, "internal_error", "internal error")
    return await state.refuse(rec, _ROUTE, refusal)


@router.post("/v1/approvals")
async def post_approval(request: Request) -> Response:
    state = state_of(request)
    rec = DecisionDraft("POST", "/v1/approvals")
    try:
        peer = state.peer_of(request.scope)
        rec.set_peer(peer)
        desk = desk_of(request)
        await desk.sweep()
        record, new = await desk.file(rec, peer, await read_json(request))
    except Exception as exc:
        return await _refused(state, rec, exc)
    body = {"id": record.id, "status": record.status, "expires_at": record.expires_at}
    return await _recorded(state, rec, body, 201 if new else 200)


@router.get("/v1/approvals")
async def list_approvals(request: Request) -> Response:
    state = state_of(request)
    peer = state.peer_of(request.scope)
    statuses = request.query_params.getlist("status")
    if len(statuses) > 1 or set(request.query_params) - {"status"}:
        raise Refusal(400, "bad_request", "the only query parameter is one status")
    desk = desk_of(request)
    await desk.sweep()
    records = await desk.listing(peer, statuses[0] if statuses else None)
    return JSONResponse({"approvals": [r.to_json() for r in records]}, headers=_NO_STORE)


@router.get("/v1/approvals/{approval_id}")
async def get_approval(request: Request, approval_id: str) -> Response:
    state = state_of(request)
    peer = state.peer_of(request.scope)
    desk = desk_of(request)
    await desk.sweep()
    record = await desk.show(peer, _id(approval_id))
    doc = record.to_json(with_token=record.status == "approved")
    if "token" in doc:
        doc["token_type"] = APPROVAL_TOKEN_TYPE
    return JSONResponse(doc, headers=_NO_STORE)


@router.post("/v1/approvals/{approval_id}/decision")
async def post_decision(request: Request, approval_id: str) -> Response:
    state = state_of(request)
    approval_id = _id(approval_id)
    rec = DecisionDraft("POST", f"/v1/approvals/{approval_id}/decision")
    try:
        peer = state.peer_of(request.scope)
        rec.set_peer(peer)
        desk = desk_of(request)
        await desk.sweep()
        record = await desk.decide(rec, peer, approval_id, await read_json(request))
    except Exception as exc:
        return await _refused(state, rec, exc)
    return await _recorded(state, rec, record.to_json(), 200)
