"""``POST /v1/revocations`` (admins, recorded) and ``GET /v1/revocations`` (the feed
for verifiers of the issuer's own trust domain)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from axid.issuer._http import query_int, read_json, receipt_headers
from axid.issuer._state import state_of
from axid.issuer.problems import Refusal
from axid.issuer.schemas import RevocationRequest, validate_body
from axid.issuer.service import DecisionDraft
from axid.issuer.store import MAX_REVOCATIONS_PAGE

__all__ = ["router"]

_log = logging.getLogger("axid.issuer.app")  # the app's logger, as before the split

router = APIRouter()


@router.post("/v1/revocations")
async def post_revocation(request: Request) -> Response:
    state = state_of(request)
    rec = DecisionDraft("POST", "/v1/revocations")
    try:
        peer = state.peer_of(request.scope)
        rec.set_peer(peer)
        if not state.service.is_admin(peer):
            raise Refusal(403, "forbidden", "only admin SPIFFE IDs may revoke")
        req = validate_body(RevocationRequest, await read_json(request))
        revocation, cascaded = await state.service.revoke(rec, peer, req)
    except Refusal as refusal:
        return await state.refuse(rec, "revocations", refusal)
    except Exception:
        _log.exception("revocation failed unexpectedly")
        return await state.refuse(
            rec, "revocations", Refusal(500, "internal_error", "internal error")
        )
    try:
        receipt = await state.service.record(rec, "allow", "ok")
    except Exception as exc:
        return state.audit_down("revocations", exc)
    state.metrics.decisions.labels("revocations", "allow", "ok").inc()
    body = revocation.to_json()
    body["cascaded"] = [r.to_json() for r in cascaded]
    headers = receipt_headers(receipt, {"Cache-Control": "no-store"})
    return JSONResponse(body, status_code=201, headers=headers)


@router.get("/v1/revocations")
async def get_revocations(request: Request) -> Response:
    state = state_of(request)
    peer = state.peer_of(request.scope)
    own_td = state.components.source.svid().spiffe_id.trust_domain
    if peer.spiffe_id.trust_domain != own_td:
        raise Refusal(403, "forbidden", "revocations are served to this trust domain only")
    since = query_int(request, "since", 0, 2**53 - 1)
    limit = query_int(request, "limit", MAX_REVOCATIONS_PAGE, MAX_REVOCATIONS_PAGE, lo=1)
    rows = await state.service.revocations(since, limit)
    return JSONResponse(
        {"revocations": [r.to_json() for r in rows], "next": rows[-1].seq if rows else since},
        headers={"Cache-Control": "no-store"},
    )
