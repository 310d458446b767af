"""``GET /.well-known/jwks.json``, ``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from axid.issuer._state import state_of

__all__ = ["keys", "service"]

keys = APIRouter()  # the key set: first in the route table
service = APIRouter()  # liveness and metrics: last


@keys.get("/.well-known/jwks.json")
async def get_jwks(request: Request) -> Response:
    return JSONResponse(state_of(request).service.jwks(), headers={"Cache-Control": "no-cache"})


@service.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


@service.get("/metrics")
async def get_metrics(request: Request) -> Response:
    registry = state_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
