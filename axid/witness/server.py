"""Run a witness: its config, keys and state database under uvicorn (HTTP/1.1
keep-alive; HTTPS when the config has ``tls``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from axid.witness.app import WitnessApp
from axid.witness.config import WitnessConfig
from axid.witness.keys import load_signers
from axid.witness.store import WitnessStore

__all__ = ["WitnessStartupError", "serve"]

KEEP_ALIVE = 30  # seconds an idle keep-alive connection stays open


class WitnessStartupError(RuntimeError):
    """The server did not start (port in use, ...)."""


def _bound_url(server: uvicorn.Server, scheme: str) -> str:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


@contextlib.contextmanager
def _stop_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGINT/SIGTERM ask the server to exit (a signal before uvicorn's own
    handlers are installed is not lost); a stop by signal exits 0."""
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


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a failure is an OSError (uvicorn would
    call sys.exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # asyncio sets TCP_NODELAY only on sockets created with IPPROTO_TCP; Linux passes
    # a listening socket's option on to its connections. Without it every answer
    # (head and body written apart) waits ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _run(
    server: uvicorn.Server, sock: socket.socket, ready: Callable[[str], None], scheme: str
) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if not server.started:
        await task
        raise WitnessStartupError("the witness did not start (see the log above)")
    ready(_bound_url(server, scheme))
    await task


def serve(config: WitnessConfig, *, ready: Callable[[str], None], log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; ``ready`` gets ``http(s)://HOST:PORT`` once listening.

    Keys are loaded and the state database opened (tables created) before the
    port is bound: any failure there raises before anything is served; a port that
    cannot be bound raises :class:`OSError`."""
    signers = load_signers(config.keys)
    store = WitnessStore.open(config.database)
    app = WitnessApp(config.logs, signers, store)
    tls = config.tls
    uv = uvicorn.Config(
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
    server = uvicorn.Server(uv)
    try:
        with _bind(config.host, config.port) as sock, _stop_signals(server):
            asyncio.run(_run(server, sock, ready, "https" if tls else "http"))
    finally:
        app.close()
        store.close()
