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
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Literal, cast

import uvicorn

from axid.issuer.app import IssuerComponents, create_app
from axid.issuer.config import IssuerConfig
from mtls.sources import X509Source
from mtls.uvicorn import uvicorn_config

__all__ = ["IssuerStartupError", "issuer_uvicorn_config", "serve", "serve_async"]

_log = logging.getLogger(__name__)


class IssuerStartupError(RuntimeError):
    """The server did not start (port in use, decision log unavailable, ...)."""


def _bound_url(server: uvicorn.Server) -> str:
    sock = server.servers[0].sockets[0]
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}"


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
        with _stop_signals(server):
            await _run(server, ready)
    finally:
        components.close()


@contextlib.contextmanager
def _stop_signals(server: uvicorn.Server) -> Iterator[None]:
    """uvicorn handles SIGINT/SIGTERM itself while it serves (graceful shutdown), then
    re-raises the signal under the handlers it found. The handlers found are these:
    they ask the server to exit (a signal before uvicorn's own handlers are in place
    is not lost) and otherwise return, so a stop by signal ends the process normally
    (exit 0) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_sig: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _run(server: uvicorn.Server, ready: Callable[[str], None] | None) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if not server.started:
        await task
        raise IssuerStartupError("the issuer did not start (see the log above)")
    if ready is not None:
        ready(_bound_url(server))
    await task


def serve(
    config: IssuerConfig,
    *,
    ready: Callable[[str], None] | None = None,
    log_level: str = "info",
    **uvicorn_kwargs: Any,
) -> None:
    """Blocking :func:`serve_async`."""
    asyncio.run(serve_async(config, ready=ready, log_level=log_level, **uvicorn_kwargs))
