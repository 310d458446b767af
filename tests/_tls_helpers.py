"""Helpers for mTLS tests: a real uvicorn server on a background thread, an echo app,
and small TLS client probes. Every wait is bounded."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from cryptography import x509

WAIT = 10.0  # upper bound for any wait in these tests


async def echo_tls_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app answering every HTTP request with its TLS extension as JSON."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    body = json.dumps({"tls": scope.get("extensions", {}).get("tls")}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ServerThread:
    """A uvicorn.Server running on a daemon thread."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="uvicorn-test")

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # surfaced by start()
            self._error = e

    def start(self, timeout: float = WAIT) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn exited before starting: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("uvicorn did not start in time")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def stop(self, timeout: float = WAIT) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - a hung server
            self.server.force_exit = True
            self._thread.join(timeout)
        assert not self._thread.is_alive(), "uvicorn did not stop"


@contextmanager
def run_server(config: uvicorn.Config) -> Iterator[ServerThread]:
    """Run ``config`` on a background thread for the duration of the block."""
    st = ServerThread(config).start()
    try:
        yield st
    finally:
        st.stop()


def handshake(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> ssl.SSLSocket:
    """A completed blocking TLS connection to ``host:port`` (caller closes it)."""
    raw = socket.create_connection((host, port), timeout=WAIT)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


def server_leaf(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate the server presented on a new connection."""
    with handshake(port, ctx) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
