"""``POST /v1/tokens``: mint an action token for the mTLS peer (recorded either way)."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from axid.issuer._http import read_json, receipt_headers
from axid.issuer._state import state_of
from axid.issuer.problems import Refusal
from axid.issuer.schemas import MintRequest, validate_body
from axid.issuer.service import DecisionDraft

__all__ = ["install", "post_token"]

_log = logging.getLogger("axid.issuer.app")  # the app's logger, as before the split
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def post_token(request: Request) -> Response:
    """Mint, record, answer: a token is never sent unless its decision is committed."""
    started = time.perf_counter()
    state = state_of(request)
    rec = DecisionDraft("POST", "/v1/tokens")
    try:
        peer = state.peer_of(request.scope)
        rec.set_peer(peer)
        req = validate_body(MintRequest, await read_json(request))
        minted = await state.service.mint(rec, peer, req)
    except Refusal as refusal:
        return await state.refuse(rec, "tokens", refusal)
    except Exception:
        _log.exception("mint failed unexpectedly")
        return await state.refuse(rec, "tokens", Refusal(500, "internal_error", "internal error"))
    try:
        receipt = await state.service.record(rec, "allow", "ok")
    except Exception as exc:
        return state.audit_down("tokens", exc)  # the token is dropped: never issued unrecorded
    state.metrics.decisions.labels("tokens", "allow", "ok").inc()
    state.metrics.mint_seconds.observe(time.perf_counter() - started)
    return JSONResponse(
        minted.to_json(), status_code=201, headers=receipt_headers(receipt, _NO_STORE)
    )


def install(app: FastAPI) -> None:
    # A plain Starlette route: the handler reads and checks its own body, so FastAPI's
    # dependency solving would only add CPU to the hottest route (same errors: 405
    # and the exception handlers work alike for both kinds of route).
    app.add_route("/v1/tokens", post_token, methods=["POST"])
