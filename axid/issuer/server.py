"""``axid serve``: the issuer app under uvicorn, over mTLS with the issuer's SVID.

The TLS server context comes from :func:`mtls.uvicorn.uvicorn_config` (SVID
rotation followed without restart) with the protocol class that fills the ASGI TLS
extension, built by :func:`issuer_uvicorn_config`: a client certificate is asked for
but not required (``client_cert="optional"``), so that anyone can fetch the JWKS and
the log's checkpoints and proofs; one that is sent must chain to the bundles, and
every other route refuses a request without one (:mod:`axid.issuer.anonymous`).

The keyring is created on first start and re-read whenever ``keyring.json`` changes
(``axid keys rotate`` from another process): the JWKS and the signing key follow
without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal, cast

import uvicorn

from axid.issuer.app import IssuerComponents, create_app
from axid.issuer.config import IssuerConfig
from axid.issuer.errors import IssuerBaseError

# Shared with axid witness serve; it lives with the witness, which imports nothing of
# AXID outside its package but axid.audit's pure modules.
from axid.witness._serving import serve_until_exit, stop_signals
from mtls.sources import X509Source
from mtls.uvicorn import uvicorn_config

__all__ = ["IssuerStartupError", "issuer_uvicorn_config", "serve", "serve_async"]

_log = logging.getLogger(__name__)


class IssuerStartupError(IssuerBaseError, RuntimeError):
    """The server did not start (port in use, decision log unavailable, ...)."""


def issuer_uvicorn_config(
    app: Any,
    *,
    source: X509Source,
    host: str = "127.0.0.1",
    port: int = 0,
    http: Literal["h11", "httptools"] = "h11",
    **uvicorn_kwargs: Any,
) -> uvicorn.Config:
    """The issuer's ``uvicorn.Config``: :func:`mtls.uvicorn.uvicorn_config` with the
    client certificate optional (the issuer's public routes; see the module doc)."""
    return uvicorn_config(
        app,
        host=host,
        port=port,
        source=source,
        http=http,
        client_cert="optional",
        **uvicorn_kwargs,
    )


async def serve_async(
    config: IssuerConfig,
    *,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
    **uvicorn_kwargs: Any,
) -> None:
    """Run the issuer until the server is told to exit (SIGINT/SIGTERM).

    ``ready`` is called with the bound URL (``https://HOST:PORT``) once the server
    accepts connections.
    """
    components = IssuerComponents.from_config(config)
    try:
        app = create_app(components)
        uv = issuer_uvicorn_config(
            app,
            host=config.host,
            port=config.port,
            source=components.source,
            http=cast(Literal["h11", "httptools"], config.http),
            log_level=log_level,
            **uvicorn_kwargs,
        )
        server = uvicorn.Server(uv)
        failed = IssuerStartupError("the issuer did not start (see the log above)")
        with stop_signals(server):
            await serve_until_exit(server, scheme="https", ready=ready, not_started=failed)
    finally:
        components.close()


def serve(
    config: IssuerConfig,
    *,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
    **uvicorn_kwargs: Any,
) -> None:
    """Blocking :func:`serve_async`."""
    asyncio.run(serve_async(config, ready=ready, log_level=log_level, **uvicorn_kwargs))
