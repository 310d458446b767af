"""What ``axid witness serve`` and ``axid serve`` share around uvicorn: the stop
signals, the wait for the server to start, the URL it is bound to, and the
listening socket bound before it starts.

It lives in :mod:`axid.witness` because the witness imports nothing of AXID beyond
its own package and :mod:`axid.audit`'s pure modules (DESIGN.md layout); the
issuer's server imports it from here."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

__all__ = ["bind_socket", "bound_url", "serve_until_exit", "stop_signals"]


def bound_url(server: uvicorn.Server, scheme: str) -> str:
    """``scheme://HOST:PORT`` of the started server's first socket."""
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a failure is an OSError (uvicorn would
    call sys.exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # asyncio sets TCP_NODELAY only on sockets created with IPPROTO_TCP; Linux passes
    # a listening socket's option on to its connections. Without it every answer
    # (head and body written apart) waits ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextlib.contextmanager
def stop_signals(server: uvicorn.Server) -> Iterator[None]:
    """uvicorn handles SIGINT/SIGTERM itself while it serves (graceful shutdown), then
    re-raises the signal under the handlers it found. The handlers found are these:
    they ask the server to exit (a signal before uvicorn's own handlers are in place
    is not lost) and otherwise return, so a stop by signal ends the process normally
    (exit 0) instead of killing it. Outside the main thread: nothing to install."""
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


async def serve_until_exit(
    server: uvicorn.Server,
    *,
    scheme: str,
    ready: Callable[[str], None] | None,
    not_started: Exception,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until told to exit; ``ready`` gets :func:`bound_url` once the server
    accepts connections; ``not_started`` is raised when it stopped before that."""
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if not server.started:
        await task
        raise not_started
    if ready is not None:
        ready(bound_url(server, scheme))
    await task
