"""HTTP edges tried as an attacker would, against a real uvicorn over mTLS with
mtls.uvicorn's protocol classes (both h11 and httptools), from raw TLS sockets.

- A request with both ``Content-Length`` and ``Transfer-Encoding`` (the request
  smuggling shape) is refused 400 problem+json, never reaches the app, and its
  connection is closed (RFC 9112 section 6.1: the server MUST close it).
- WebSocket upgrades get the same TLS and ``axid.transport`` extensions as HTTP
  requests, and on a governed path the verifier denies them with their true reason,
  403 ``unsupported_protocol``, recorded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import time
from typing import Any

import pytest
from _tls_helpers import WAIT, handshake, run_server
from _verifier_helpers import (
    ISSUER,
    Pki,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from axid.audit.receipt import Receipt
from mtls.devpki import init_dev_pki
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from mtls.uvicorn import TRANSPORT_EXTENSION, uvicorn_config
from verifier.config import IdentityConfig, LogConfig, VerifierConfig
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

pytestmark = pytest.mark.timeout(60)

PAYMENTS = SpiffeId.parse("spiffe://example.org/svc/payments")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return init_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_source(pki):
    with FileSource(pki.cert("payments"), pki.key("payments"), pki.bundle) as src:
        yield src


@pytest.fixture(scope="module")
def client_source(pki):
    with FileSource(pki.cert("planner"), pki.key("planner"), pki.bundle) as src:
        yield src


class Recorder:
    """An ASGI app that records every request it is given (its method, path and body)
    and every WebSocket it is offered (accepting it and sending its extensions)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.seen.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ran"})

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen.append(("WEBSOCKET", scope["path"], b""))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        extensions = scope.get("extensions", {})
        tls = extensions.get("tls")
        await send(
            {
                "type": "websocket.send",
                "text": json.dumps(
                    {
                        "chain": len(tls["client_cert_chain"]) if tls else None,
                        "transport": extensions.get(TRANSPORT_EXTENSION),
                    }
                ),
            }
        )
        await send({"type": "websocket.close", "code": 1000})


@pytest.fixture(scope="module", params=["h11", "httptools"])
def served(request, server_source):
    app = Recorder()
    config = uvicorn_config(app, source=server_source, http=request.param, log_level="warning")
    with run_server(config) as server:
        yield server, app


def _connect(port: int, client_source) -> ssl.SSLSocket:
    """A raw TLS socket presenting the planner's dev SVID."""
    return handshake(port, client_context(client_source, server_id=PAYMENTS))


class _Reader:
    """One buffered reader over the socket (http.client reads a response from it)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._fp = sock.makefile("rb")

    def makefile(self, _mode: str = "rb") -> Any:
        return self._fp


def _reply(sock: ssl.SSLSocket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(_Reader(sock))  # type: ignore[arg-type]
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


def _rest(sock: ssl.SSLSocket) -> bytes:
    """Everything the server still sends until it closes (a reset counts as closed)."""
    sock.settimeout(WAIT)
    data = b""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


# -- Content-Length and Transfer-Encoding together --------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: payments.test\r\n\r\n"


def _cl_te(order: str) -> bytes:
    """A POST whose body is one empty chunk by Transfer-Encoding, and a smuggled second
    request too by Content-Length (or the other way round)."""
    chunked = b"0\r\n\r\n"
    cl = b"Content-Length: %d" % len(chunked + SMUGGLED)
    te = b"Transfer-Encoding: chunked"
    fields = [cl, te] if order == "cl-te" else [te, cl]
    head = b"\r\n".join([b"POST /payments/p-1 HTTP/1.1", b"Host: payments.test", *fields])
    return head + b"\r\n\r\n" + chunked + SMUGGLED


@pytest.mark.parametrize("order", ["cl-te", "te-cl"])
def test_content_length_with_transfer_encoding_refused_and_closed(
    served, client_source, order: str
) -> None:
    server, app = served
    before = list(app.seen)
    with _connect(server.port, client_source) as sock:
        sock.sendall(_cl_te(order))
        reply = _reply(sock)
        assert reply.status == 400
        assert reply.getheader("content-type") == "application/problem+json"
        assert reply.getheader("connection") == "close"
        doc = json.loads(reply.body)  # type: ignore[attr-defined]
        assert doc["status"] == 400 and doc["reason"] == "bad_request"
        assert doc["title"] == "Bad Request" and doc["detail"]
        # A second request on the connection gets nothing: it is closed, not reused.
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /second HTTP/1.1\r\nHost: payments.test\r\n\r\n")
        assert _rest(sock) == b""
    assert app.seen == before, "the refused request (or the smuggled one) reached the app"


def test_content_length_with_transfer_encoding_closed_without_more_input(
    served, client_source
) -> None:
    """Nothing more is sent: the server still closes the connection on its own."""
    server, app = served
    before = list(app.seen)
    head = b"POST /payments/p-1 HTTP/1.1\r\nHost: payments.test\r\n"
    head += b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    with _connect(server.port, client_source) as sock:
        sock.sendall(head)
        assert _reply(sock).status == 400
        assert _rest(sock) == b""
    assert app.seen == before


@pytest.mark.parametrize(
    "fields",
    [[b"Content-Length: 5"], [b"Transfer-Encoding: chunked"]],
    ids=["content-length", "chunked"],
)
def test_either_framing_alone_still_served(served, client_source, fields) -> None:
    server, app = served
    body = b"5\r\nhello\r\n0\r\n\r\n" if b"chunked" in fields[0] else b"hello"
    head = b"\r\n".join([b"POST /echo HTTP/1.1", b"Host: payments.test", *fields])
    with _connect(server.port, client_source) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        reply = _reply(sock)
        assert reply.status == 200 and reply.body == b"ran"  # type: ignore[attr-defined]
        # Kept alive: a second request on the same connection is served too.
        sock.sendall(b"GET /again HTTP/1.1\r\nHost: payments.test\r\n\r\n")
        assert _reply(sock).status == 200
    assert app.seen[-2:] == [("POST", "/echo", b"hello"), ("GET", "/again", b"")]


# -- WebSocket upgrades get the extensions ----------------------------------------------


def _ws_client_context(client_source) -> ssl.SSLContext:
    return client_context(client_source, server_id=PAYMENTS)


# uvicorn's legacy "websockets" implementation warns that it is deprecated; still served.
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")
@pytest.mark.filterwarnings("ignore:remove second argument of ws_handler")
@pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated")
@pytest.mark.parametrize("ws", ["websockets-sansio", "websockets"])
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_websocket_scope_has_tls_and_transport_extensions(
    server_source, client_source, http: str, ws: str
) -> None:
    """A real WebSocket client over mTLS: the app's websocket scope carries the peer's
    chain and the socket facts, as an HTTP request's scope does."""
    app = Recorder()
    config = uvicorn_config(app, source=server_source, http=http, ws=ws, log_level="warning")
    with run_server(config) as server:
        uri = f"wss://127.0.0.1:{server.port}/feed"
        ctx = _ws_client_context(client_source)
        with connect(uri, ssl=ctx, proxy=None, open_timeout=WAIT) as conn:
            got = json.loads(conn.recv(timeout=WAIT))
    assert app.seen == [("WEBSOCKET", "/feed", b"")]
    assert got["chain"] >= 1
    port = got["transport"]["peer"][1]
    assert got["transport"] == {"peer": ["127.0.0.1", port], "tls": True}


# -- the verifier: a WebSocket on a governed path is denied for what it is ------------

RULES = [
    RouteRule("/public/**", governed=False),
    RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
]


@pytest.fixture(scope="module")
def vpki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("verifier"))


@pytest.fixture(scope="module", params=["h11", "httptools"])
def governed(request, vpki: Pki, tmp_path_factory: pytest.TempPathFactory):
    """AxidVerifier in front of a Recorder, under uvicorn over mTLS (mtls.uvicorn)."""
    tmp = tmp_path_factory.mktemp("governed")
    key = new_signing_key()
    url = f"sqlite:///{tmp}/axid.db"
    config = VerifierConfig(
        service="payments",
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(bundle=vpki.dev.bundle),
        jwks=key_set(key),
        revocations=StaticRevocations(),
        log=LogConfig(url=url, key=tmp / "log.pem", max_delay=0),
        rules=RULES,
    )
    app = Recorder()
    source = FileSource(vpki.cert("payments"), vpki.key("payments"), vpki.dev.bundle)
    uv = uvicorn_config(
        AxidVerifier(app, config),
        source=source,
        http=request.param,
        lifespan="on",
        log_level="warning",
    )
    try:
        with run_server(uv) as server:
            yield server, app, key, lambda: log_entries(url, config.log_name)
    finally:
        source.close()


def _planner(vpki: Pki) -> FileSource:
    return FileSource(vpki.cert("planner"), vpki.key("planner"), vpki.dev.bundle)


@pytest.mark.parametrize("path", ["/payments/p-1", "/nowhere"], ids=["rule", "no-rule"])
def test_websocket_on_governed_path_denied_unsupported_protocol(
    governed, vpki: Pki, path: str
) -> None:
    """A real WebSocket handshake over mTLS with the planner's SVID and a valid token
    for the route (or a path no rule matches): 403 unsupported_protocol, recorded;
    the app never runs."""
    server, app, key, entries = governed
    before, seen = len(entries()), list(app.seen)
    token = token_for(vpki, "planner", key, now=time.time())
    uri = f"wss://127.0.0.1:{server.port}{path}"
    with _planner(vpki) as source:
        ctx = client_context(source, server_id=vpki.dev.spiffe_id("payments"))
        with pytest.raises(InvalidStatus) as refused:
            connect(
                uri,
                ssl=ctx,
                proxy=None,
                open_timeout=WAIT,
                additional_headers={"X-Waxell-AXID": token},
            )
    response = refused.value.response
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == 'AXID error="unsupported_protocol"'
    doc = json.loads(response.body)
    assert doc["status"] == 403 and doc["reason"] == "unsupported_protocol"
    assert app.seen == seen
    log = entries()
    assert len(log) == before + 1
    entry = log[-1]
    assert entry["decision"] == "deny" and entry["reason"] == "unsupported_protocol"
    assert entry["path"] == path and entry["note"] == "websocket upgrade"
    assert entry["rule"] == (None if path == "/nowhere" else "GET /payments/*")
    # The response names the entry it recorded.
    assert Receipt.from_header(response.headers["axid-receipt"]).seq == entry["seq"]


def test_websocket_on_ungoverned_path_reaches_the_app(governed, vpki: Pki) -> None:
    """An ungoverned route is the app's, WebSockets included (unrecorded), and the
    app sees the connection's extensions."""
    server, app, _key, entries = governed
    before = len(entries())
    with _planner(vpki) as source:
        ctx = client_context(source, server_id=vpki.dev.spiffe_id("payments"))
        uri = f"wss://127.0.0.1:{server.port}/public/feed"
        with connect(uri, ssl=ctx, proxy=None, open_timeout=WAIT) as conn:
            got = json.loads(conn.recv(timeout=WAIT))
    assert got["chain"] >= 1 and got["transport"]["tls"] is True
    assert app.seen[-1] == ("WEBSOCKET", "/public/feed", b"")
    assert len(entries()) == before
