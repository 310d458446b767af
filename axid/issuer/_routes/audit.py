"""``GET /v1/audit/{checkpoint,proof,consistency}``: the issuer's own decision log, read
through :mod:`verifier.logroutes` (the same texts and 400/404 rules as every verifier)."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from axid.issuer._state import state_of
from axid.issuer.problems import Refusal
from verifier.logroutes import LogReadError, LogRoute, read_log

__all__ = ["AUDIT_READS", "install", "read_audit"]

AUDIT_READS: tuple[LogRoute, ...] = ("checkpoint", "proof", "consistency")


async def read_audit(request: Request, route: LogRoute) -> Response:
    """One read of the log: 503 ``audit_unavailable`` while it is not open."""
    log = state_of(request).service.log
    if log is None:
        raise Refusal(503, "audit_unavailable", "the decision log is not open")
    try:
        text = await read_log(log.store, route, request.scope.get("query_string", b""))
    except LogReadError as exc:
        raise Refusal(exc.status, exc.reason, exc.detail) from None
    return PlainTextResponse(text, headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    # Plain Starlette routes (GET, and HEAD with it), as they have always been; a
    # partial of a function is still called as a request handler, not as an ASGI app.
    for name in AUDIT_READS:
        app.add_route(f"/v1/audit/{name}", partial(read_audit, route=name), methods=["GET"])
