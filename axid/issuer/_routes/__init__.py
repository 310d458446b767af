"""The issuer's routes, one module per concern (see :mod:`axid.issuer.app`)."""

from __future__ import annotations

from fastapi import FastAPI

from axid.issuer._routes import approvals, audit, public, revocations, tokens

__all__ = ["install_routes"]


def install_routes(app: FastAPI) -> None:
    """Add every route, in the order the route table lists them."""
    tokens.install(app)
    app.include_router(public.keys)
    app.include_router(revocations.router)
    audit.install(app)
    approvals.install(app)
    app.include_router(public.service)
