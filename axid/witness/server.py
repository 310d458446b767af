"""Run a witness: its config, keys and state database under uvicorn (HTTP/1.1
keep-alive; HTTPS when the config has ``tls``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from axid.witness._serving import bind_socket, serve_until_exit, stop_signals
from axid.witness.app import WitnessApp
from axid.witness.config import WitnessConfig
from axid.witness.errors import WitnessError
from axid.witness.keys import load_signers
from axid.witness.store import WitnessStore

__all__ = ["WitnessStartupError", "serve", "witness_socket", "witness_uvicorn_config"]

KEEP_ALIVE = 30  # seconds an idle keep-alive connection stays open


class WitnessStartupError(WitnessError, RuntimeError):
    """The server did not start (port in use, ...)."""


def witness_uvicorn_config(
    app: Any, config: WitnessConfig, *, log_level: str = "info"
) -> uvicorn.Config:
    """The ``uvicorn.Config`` :func:`serve` runs ``app`` with for ``config``."""
    tls = config.tls
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=KEEP_ALIVE,
        server_header=False,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )


def witness_socket(config: WitnessConfig) -> socket.socket:
    """The listening socket :func:`serve` serves on (``TCP_NODELAY`` on it); a port
    that cannot be bound raises :class:`OSError`."""
    return bind_socket(config.host, config.port)


def serve(config: WitnessConfig, *, ready: Callable[[str], None], log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; ``ready`` gets ``http(s)://HOST:PORT`` once listening.

    Keys are loaded and the state database opened (tables created) before the
    port is bound: any failure there raises before anything is served; a port that
    cannot be bound raises :class:`OSError`."""
    signers = load_signers(config.keys)
    store = WitnessStore.open(config.database)
    app = WitnessApp(config.logs, signers, store)
    server = uvicorn.Server(witness_uvicorn_config(app, config, log_level=log_level))
    failed = WitnessStartupError("the witness did not start (see the log above)")
    scheme = "https" if config.tls else "http"
    try:
        with witness_socket(config) as sock, stop_signals(server):
            asyncio.run(
                serve_until_exit(
                    server, scheme=scheme, ready=ready, not_started=failed, sockets=[sock]
                )
            )
    finally:
        app.close()
        store.close()
