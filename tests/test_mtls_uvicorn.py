"""mTLS under a real uvicorn: the ASGI TLS extension, client-certificate enforcement and
SPIFFE server-ID checks, request-head limits and timeouts, for both uvicorn HTTP
protocol classes, sync and async httpx and raw sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from _tls_helpers import WAIT, echo_tls_app, handshake, run_server
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls.devpki import DevCA, init_dev_pki
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId, SpiffeIdPattern
from mtls.tlsconfig import client_context, peer_chain_pem, server_context
from mtls.uvicorn import (
    TRANSPORT_EXTENSION,
    H11TLSProtocol,
    HttpLimits,
    HttpToolsTLSProtocol,
    uvicorn_config,
)

pytestmark = pytest.mark.timeout(60)

PAYMENTS = SpiffeId.parse("spiffe://example.org/svc/payments")


def _der(pem: str | bytes) -> bytes:
    text = pem.decode() if isinstance(pem, bytes) else pem
    return ssl.PEM_cert_to_DER_cert(text)


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


@pytest.fixture(scope="module")
def planner_leaf_der(pki) -> bytes:
    return _der(pki.cert("planner").read_bytes())


@pytest.fixture(scope="module", params=["h11", "httptools"])
def server(request, server_source):
    config = uvicorn_config(
        echo_tls_app, source=server_source, http=request.param, log_level="warning"
    )
    with run_server(config) as st:
        yield st


@pytest.fixture(scope="module")
def rogue_files(tmp_path_factory: pytest.TempPathFactory):
    """An SVID with the planner's SPIFFE ID, but from another CA of the same trust domain."""
    d = tmp_path_factory.mktemp("rogue")
    rogue = DevCA.create("example.org").issue_svid("spiffe://example.org/agent/planner")
    return rogue.write(d / "planner")


def _plain_client_ctx(pki, cert: tuple[Path, Path] | None = None, **kw) -> ssl.SSLContext:
    """A stock client context trusting the dev bundle, optionally with a client cert."""
    ctx = ssl.create_default_context(cafile=str(pki.bundle))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


# -- (a) a valid SVID ---------------------------------------------------------------


def _check_echo(resp: httpx.Response, planner_leaf_der: bytes) -> None:
    assert resp.status_code == 200
    tls = resp.json()["tls"]
    assert tls is not None
    chain = tls["client_cert_chain"]
    assert chain, "client chain missing"
    assert _der(chain[0]) == planner_leaf_der
    assert tls["tls_version"] in (0x0303, 0x0304)
    assert isinstance(tls["cipher_suite"], int)
    assert 0 < tls["cipher_suite"] <= 0xFFFF
    assert tls["server_cert"] is None
    assert tls["client_cert_error"] is None


def test_valid_svid_sync(server, client_source, planner_leaf_der):
    ctx = client_context(client_source, server_id=PAYMENTS)
    with httpx.Client(verify=ctx, timeout=WAIT) as client:
        _check_echo(client.get(server.url), planner_leaf_der)
        # Keep-alive: a second request on the same connection carries the extension too.
        _check_echo(client.get(server.url), planner_leaf_der)


async def test_valid_svid_async(server, client_source, planner_leaf_der):
    ctx = client_context(client_source, server_id=PAYMENTS)
    async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
        _check_echo(await client.get(server.url), planner_leaf_der)


def test_tls12_reports_version_and_cipher(server, pki, planner_leaf_der):
    ctx = _plain_client_ctx(
        pki,
        (pki.cert("planner"), pki.key("planner")),
        maximum_version=ssl.TLSVersion.TLSv1_2,
    )
    resp = httpx.get(server.url, verify=ctx, timeout=WAIT)
    _check_echo(resp, planner_leaf_der)
    tls = resp.json()["tls"]
    assert tls["tls_version"] == 0x0303
    # ECDHE-ECDSA suites from RFC 8422 / RFC 5289 / RFC 7905 live in 0xC0xx / 0xCCxx.
    assert tls["cipher_suite"] >> 8 in (0xC0, 0xCC)


def test_sni_given_or_not_same_result(server, client_source):
    """The rotation hook is an sni_callback: the handshake works with and without SNI."""
    ctx = client_context(client_source, server_id=PAYMENTS)
    with handshake(server.port, ctx) as s:  # IP address: no SNI sent
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    with ctx.wrap_socket(raw, server_hostname="payments.internal") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        assert len(peer_chain_pem(s)) >= 1


# -- (b) no client certificate ------------------------------------------------------


def test_no_client_cert_refused_sync(server, pki):
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, verify=_plain_client_ctx(pki), timeout=WAIT)


async def test_no_client_cert_refused_async(server, pki):
    async with httpx.AsyncClient(verify=_plain_client_ctx(pki), timeout=WAIT) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(server.url)


def test_no_client_cert_refused_tls12_in_handshake(server, pki):
    ctx = _plain_client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, verify=ctx, timeout=WAIT)


# -- (c) a certificate from another CA ----------------------------------------------


def test_foreign_ca_client_refused_sync(server, pki, rogue_files):
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, verify=_plain_client_ctx(pki, rogue_files), timeout=WAIT)


async def test_foreign_ca_client_refused_async(server, pki, rogue_files):
    ctx = _plain_client_ctx(pki, rogue_files)
    async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(server.url)


# -- (d) the client checks the server's SPIFFE ID -----------------------------------


WRONG = SpiffeId.parse("spiffe://example.org/svc/ledger")


def test_wrong_server_id_refused_sync(server, client_source):
    ctx = client_context(client_source, server_id=WRONG)
    with pytest.raises(httpx.ConnectError, match="svc/payments is not the expected"):
        httpx.get(server.url, verify=ctx, timeout=WAIT)


async def test_wrong_server_id_refused_async(server, client_source):
    ctx = client_context(client_source, server_id=WRONG)
    async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
        with pytest.raises(httpx.ConnectError, match="svc/payments is not the expected"):
            await client.get(server.url)


def test_wrong_server_id_raw_socket_is_cert_verification_error(server, client_source):
    ctx = client_context(
        client_source, server_id=SpiffeIdPattern.parse("spiffe://example.org/agent/*")
    )
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(server.port, ctx)
    assert info.value.verify_code == 50


@pytest.mark.parametrize(
    "server_id",
    [
        PAYMENTS,
        SpiffeIdPattern.parse("spiffe://example.org/svc/*"),
        SpiffeIdPattern.parse("spiffe://example.org/**"),
    ],
    ids=["exact", "pattern", "td-wildcard"],
)
async def test_right_server_id_accepted(server, client_source, planner_leaf_der, server_id):
    ctx = client_context(client_source, server_id=server_id)
    async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
        _check_echo(await client.get(server.url), planner_leaf_der)
    with httpx.Client(verify=ctx, timeout=WAIT) as client:
        _check_echo(client.get(server.url), planner_leaf_der)


def test_predicate_server_id(server, client_source, planner_leaf_der):
    seen: list[SpiffeId] = []

    def only_payments(sid: SpiffeId) -> bool:
        seen.append(sid)
        return sid.path == "/svc/payments"

    ctx = client_context(client_source, server_id=only_payments)
    _check_echo(httpx.get(server.url, verify=ctx, timeout=WAIT), planner_leaf_der)
    assert seen == [PAYMENTS]

    def boom(sid: SpiffeId) -> bool:
        raise RuntimeError("broken matcher")

    with pytest.raises(httpx.ConnectError, match="server ID check raised"):
        httpx.get(server.url, verify=client_context(client_source, server_id=boom), timeout=WAIT)


def test_server_from_another_ca_refused_by_client(server, tmp_path):
    """A client whose bundle does not hold the server's CA refuses it (OpenSSL first)."""
    other = DevCA.create("example.org")
    cert, key = other.issue_svid("spiffe://example.org/agent/planner").write(tmp_path / "c")
    (tmp_path / "bundle.pem").write_bytes(other.cert_pem())
    with FileSource(cert, key, tmp_path / "bundle.pem") as src:
        ctx = client_context(src, server_id=PAYMENTS)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url, verify=ctx, timeout=WAIT)


def test_client_context_rejects_str_server_id(client_source):
    with pytest.raises(TypeError):
        client_context(client_source, server_id="spiffe://example.org/svc/payments")  # type: ignore[arg-type]


def test_server_context_settings(server_source):
    ctx = server_context(server_source)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.sni_callback is not None


# -- plain HTTP: no extension -------------------------------------------------------


@pytest.mark.parametrize("protocol", [H11TLSProtocol, HttpToolsTLSProtocol])
def test_plain_http_has_no_tls_extension(protocol):
    config = uvicorn.Config(
        echo_tls_app, host="127.0.0.1", port=0, http=protocol, log_level="warning"
    )
    with run_server(config) as st:
        resp = httpx.get(f"http://127.0.0.1:{st.port}/", timeout=WAIT)
    assert resp.status_code == 200
    assert resp.json() == {"tls": None}


# -- the transport extension: the socket's peer, whatever proxy headers say ------------


async def _echo_transport_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return
    extensions = scope.get("extensions", {})
    body = json.dumps(
        {
            "client": scope["client"],
            "scheme": scope["scheme"],
            "transport": extensions.get(TRANSPORT_EXTENSION),
            "tls": "tls" in extensions,
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


SPOOF = {"X-Forwarded-For": "10.0.0.7", "X-Forwarded-Proto": "https"}


@pytest.mark.parametrize("protocol", [H11TLSProtocol, HttpToolsTLSProtocol])
@pytest.mark.parametrize("proxy_headers", [True, False])
def test_plain_http_transport_extension_is_the_socket(protocol, proxy_headers):
    config = uvicorn.Config(
        _echo_transport_app,
        host="127.0.0.1",
        port=0,
        http=protocol,
        proxy_headers=proxy_headers,
        forwarded_allow_ips="*",
        lifespan="off",
        log_level="warning",
    )
    with run_server(config) as st, httpx.Client(timeout=WAIT) as client:
        for _ in range(2):  # keep-alive: every request of the connection gets it
            doc = client.get(f"http://127.0.0.1:{st.port}/", headers=SPOOF).json()
            port = doc["transport"]["peer"][1]
            assert doc["transport"] == {"peer": ["127.0.0.1", port], "tls": False}
            assert not doc["tls"]
            # What uvicorn's proxy headers do to the scope (the verifier ignores it).
            spoofed = (["10.0.0.7", 0], "https")
            assert ((doc["client"], doc["scheme"]) == spoofed) == proxy_headers


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_uvicorn_config_turns_proxy_headers_off(server_source, client_source, http):
    config = uvicorn_config(
        _echo_transport_app, source=server_source, http=http, log_level="warning"
    )
    assert config.proxy_headers is False
    ctx = client_context(client_source, server_id=PAYMENTS)
    with run_server(config) as st, httpx.Client(verify=ctx, timeout=WAIT) as client:
        doc = client.get(st.url, headers=SPOOF).json()
    port = doc["transport"]["peer"][1]
    assert doc["transport"] == {"peer": ["127.0.0.1", port], "tls": True} and doc["tls"]
    assert doc["client"] == ["127.0.0.1", port] and doc["scheme"] == "https"
    with pytest.raises(TypeError, match="proxy_headers"):
        uvicorn_config(_echo_transport_app, source=server_source, proxy_headers=True)
    assert not uvicorn_config(
        _echo_transport_app, source=server_source, proxy_headers=False
    ).proxy_headers


# -- the real uvicorn CLI -----------------------------------------------------------


def _read_lines(stream, out: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put("")


def test_uvicorn_cli_with_tls_protocol(pki, client_source, planner_leaf_der):
    tests_dir = Path(__file__).resolve().parent
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "_tls_helpers:echo_tls_app",
        "--app-dir",
        str(tests_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--lifespan",
        "off",
        "--http",
        "mtls.uvicorn:H11TLSProtocol",
        "--ssl-certfile",
        str(pki.cert("payments")),
        "--ssl-keyfile",
        str(pki.key("payments")),
        "--ssl-ca-certs",
        str(pki.bundle),
        "--ssl-cert-reqs",
        "2",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tests_dir.parent,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    try:
        port = None
        log = []
        while port is None:
            try:
                line = lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail("uvicorn did not report its port:\n" + "".join(log))
            if line == "":
                pytest.fail("uvicorn exited:\n" + "".join(log))
            log.append(line)
            m = re.search(r"Uvicorn running on https://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        ctx = client_context(client_source, server_id=PAYMENTS)
        resp = httpx.get(f"https://127.0.0.1:{port}/", verify=ctx, timeout=WAIT)
        _check_echo(resp, planner_leaf_der)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://127.0.0.1:{port}/", verify=_plain_client_ctx(pki), timeout=WAIT)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(timeout=WAIT)
        reader.join(WAIT)
        assert proc.stderr is not None
        proc.stderr.close()


def test_peer_chain_pem_leaf_first(server, client_source, pki):
    ctx = client_context(client_source, server_id=PAYMENTS)
    with handshake(server.port, ctx) as s:
        chain = peer_chain_pem(s)
    leaf = pki.cert("payments").read_bytes()
    assert _der(chain[0]) == _der(leaf)
    ca_der = pki.ca.cert.public_bytes(serialization.Encoding.DER)
    # Whatever else the peer sent (OpenSSL auto-chains the root), it is not the leaf.
    assert all(_der(c) in (ca_der,) for c in chain[1:])


# -- request-head limits and timeouts (mtls.uvicorn.HttpLimits) ------------------------

DEFAULTS = HttpLimits()
# Small limits, so that a property test can walk around every boundary cheaply, and
# short timeouts (the defaults are 10 s).
TIGHT = HttpLimits(
    max_head_bytes=2048,
    max_url_bytes=512,
    max_headers=10,
    head_timeout=0.5,
    handshake_timeout=0.5,
)


@pytest.fixture(scope="module", params=["h11", "httptools"])
def tight(request, server_source):
    config = uvicorn_config(
        echo_tls_app, source=server_source, http=request.param, limits=TIGHT, log_level="warning"
    )
    with run_server(config) as srv:
        yield srv


@dataclass
class Reply:
    status: int | None  # None: closed without an answer
    content_type: str = ""
    body: bytes = b""


class _KeepOpen:
    """A file whose close() does not close it (HTTPResponse closes its file when done)."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)

    def close(self) -> None:
        pass


class _Stream:
    """One buffered reader over a socket, for several responses in a row."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._fp = _KeepOpen(sock.makefile("rb"))

    def makefile(self, _mode: str = "rb") -> Any:
        return self._fp

    def reply(self) -> Reply:
        response = http.client.HTTPResponse(self)  # type: ignore[arg-type]
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, OSError):
            return Reply(None)
        return Reply(response.status, response.getheader("content-type") or "", body)


def _connect(srv, client_source) -> ssl.SSLSocket:
    return handshake(srv.port, client_context(client_source, server_id=PAYMENTS))


def _exchange(srv, client_source, parts: list[bytes], *, replies: int = 1) -> list[Reply]:
    """Send ``parts`` (a short pause between them, so the server tends to read them
    separately; the outcome must not depend on it) and read ``replies`` answers."""
    with _connect(srv, client_source) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before the end
            for n, part in enumerate(parts):
                if n:
                    time.sleep(0.005)
                sock.sendall(part)
        stream = _Stream(sock)
        return [stream.reply() for _ in range(replies)]


def _request(target: bytes = b"/", fields: list[bytes] | None = None, body: bytes = b"") -> bytes:
    fields = [b"Host: payments.test", *(fields or [])]
    if body:
        fields.append(b"Content-Length: %d" % len(body))
    method = b"POST" if body else b"GET"
    lines = [method + b" " + target + b" HTTP/1.1", *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _assert_refused(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.content_type == "application/problem+json", reply
    doc = json.loads(reply.body)
    assert doc == {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": doc["detail"],
        "reason": "bad_request",
    }
    assert isinstance(doc["detail"], str) and doc["detail"]
    return doc


def _assert_closed(sock: ssl.SSLSocket) -> None:
    """The server closed the connection (EOF or reset), within WAIT."""
    sock.settimeout(WAIT)
    try:
        data = sock.recv(1)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return
    assert data == b"", data


def test_http_limits_defaults_and_validation():
    assert HttpLimits(32 * 1024, 8 * 1024, 100, 10.0, 10.0) == DEFAULTS
    assert H11TLSProtocol.limits == HttpToolsTLSProtocol.limits == DEFAULTS
    for bad in (
        {"max_head_bytes": 0},
        {"max_url_bytes": -1},
        {"max_headers": 1.5},
        {"max_headers": True},
        {"head_timeout": 0},
        {"head_timeout": float("nan")},
        {"handshake_timeout": float("inf")},
        {"handshake_timeout": "10"},
    ):
        with pytest.raises(ValueError):
            HttpLimits(**bad)


def test_uvicorn_config_limits(server_source):
    config = uvicorn_config(echo_tls_app, source=server_source, limits=TIGHT)
    assert issubclass(config.http, H11TLSProtocol) and config.http.limits == TIGHT
    config = uvicorn_config(echo_tls_app, source=server_source, http="httptools")
    assert config.http is HttpToolsTLSProtocol
    with pytest.raises(TypeError):
        uvicorn_config(echo_tls_app, source=server_source, limits={"max_headers": 5})
    with pytest.raises(ValueError):
        server_context(server_source, handshake_timeout=0)


# -- default limits, real-size attacks


def test_100_kib_header_in_one_write(server, client_source):
    big = _request(fields=[b"X-Big: " + b"a" * 100 * 1024])
    with _connect(server, client_source) as sock:
        sock.sendall(big)
        _assert_refused(_Stream(sock).reply(), 431)
        _assert_closed(sock)


def test_100_kib_header_in_pieces(server, client_source):
    big = _request(fields=[b"X-Big: " + b"a" * 100 * 1024])
    pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
    (reply,) = _exchange(server, client_source, pieces)
    _assert_refused(reply, 431)


@pytest.mark.parametrize("split", [None, 20 * 1024])
def test_64_kib_query_string(server, client_source, split):
    raw = _request(target=b"/mint?" + b"q" * 64 * 1024)
    parts = [raw] if split is None else [raw[:split], raw[split:]]
    (reply,) = _exchange(server, client_source, parts)
    doc = _assert_refused(reply, 414)
    assert "request line" in doc["detail"]


def test_100000_headers(server, client_source):
    raw = _request(fields=[b"X-%d: v" % i for i in range(100_000)])
    with _connect(server, client_source) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw[: 64 * 1024])  # the answer comes before the rest is needed
        _assert_refused(_Stream(sock).reply(), 431)


def test_default_limits_boundaries(server, client_source):
    fields = [b"X-%02d: v" % i for i in range(98)]
    target = b"/" + b"t" * (DEFAULTS.max_url_bytes - 1)
    head = _request(target, fields)
    pad = DEFAULTS.max_head_bytes - len(head) - len(b"X-Pad: \r\n")
    head = _request(target, [*fields, b"X-Pad: " + b"p" * pad])
    assert len(head) == DEFAULTS.max_head_bytes and head.count(b"\r\n") - 2 == 100
    assert _exchange(server, client_source, [head])[0].status == 200
    over = head.replace(b"X-Pad: ", b"X-Pad: p")
    _assert_refused(_exchange(server, client_source, [over])[0], 431)
    more = head.replace(b"X-Pad: pppppppp", b"X-A: v\r\nX-Pad: ")  # same size, 101 fields
    assert len(more) == len(head)
    _assert_refused(_exchange(server, client_source, [more])[0], 431)
    longer = head.replace(b"X-Pad: p", b"X-Pad: ").replace(b" /", b" /t")  # 8 KiB + 1
    assert len(longer) == len(head)
    _assert_refused(_exchange(server, client_source, [longer])[0], 414)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1 junk\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02 not http\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
    ids=["request-line", "binary", "header"],
)
def test_malformed_request_is_problem_json(server, client_source, raw):
    (reply,) = _exchange(server, client_source, [raw])
    _assert_refused(reply, 400)


def test_refusal_after_keep_alive_request(server, client_source):
    with _connect(server, client_source) as sock:
        stream = _Stream(sock)
        sock.sendall(_request())
        assert stream.reply().status == 200
        sock.sendall(_request(fields=[b"X-Big: " + b"a" * 40 * 1024]))
        _assert_refused(stream.reply(), 431)


@pytest.mark.parametrize("body", [b"", b"{}"])
def test_pipelined_oversized_head_answered_after_first(server, client_source, body):
    """A head pipelined behind a request in the same write is not counted byte by byte;
    it is refused on its parsed size, after the response to the request before it."""
    first = _request(body=body)
    second = _request(fields=[b"X-Big: " + b"a" * 40 * 1024])
    ok, refused = _exchange(server, client_source, [first + second], replies=2)
    assert ok.status == 200
    _assert_refused(refused, 431)


def test_tls_extension_still_filled(server, client_source, planner_leaf_der):
    with _connect(server, client_source) as sock:
        sock.sendall(_request())
        reply = _Stream(sock).reply()
    _check_echo(httpx.Response(200, content=reply.body), planner_leaf_der)


# -- tight limits: segmentation never changes the outcome


def _expected(head: bytes, target_len: int, field_count: int, limits: HttpLimits) -> int:
    if len(head) > limits.max_head_bytes:
        return 414 if head.index(b"\n") + 1 > limits.max_head_bytes else 431
    if target_len > limits.max_url_bytes:
        return 414
    if field_count > limits.max_headers:
        return 431
    return 200


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, int, int, bytes, list[int]]:
    target = b"/" + b"u" * draw(st.integers(0, 2200))
    sizes = draw(st.lists(st.integers(0, 400), max_size=12))
    fields = [b"X-%d: %s" % (i, b"v" * n) for i, n in enumerate(sizes)]
    body = b"b" * draw(st.sampled_from([0, 0, 1, 3000]))  # never counted as head
    raw = _request(target, fields, body)
    head = raw[: len(raw) - len(body)]
    cuts = draw(st.lists(st.integers(1, len(raw) - 1), max_size=3, unique=True))
    return head, len(target), len(fields) + 1 + bool(body), raw, sorted(cuts)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(case=_requests())
def _check_segmentation(tight, client_source, case):
    head, target_len, field_count, raw, cuts = case
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    (reply,) = _exchange(tight, client_source, parts)
    want = _expected(head, target_len, field_count, TIGHT)
    if want == 200:
        assert reply.status == 200, (reply, len(head), target_len, field_count)
    else:
        _assert_refused(reply, want)


def test_limits_do_not_depend_on_segmentation(tight, client_source):
    _check_segmentation(tight, client_source)


def test_head_exactly_at_limit_split_on_its_blank_line(tight, client_source):
    """The blank line ending the head straddles two reads, the second of which
    crosses the limit with body bytes: still 200."""
    body = b"b" * 1000
    head = _request(b"/", [b"X-Pad: " + b"p" * 10], body)[: -len(body)]
    pad = TIGHT.max_head_bytes - len(head)
    raw = _request(b"/", [b"X-Pad: " + b"p" * (10 + pad)], body)
    assert raw.index(b"\r\n\r\n") + 4 == TIGHT.max_head_bytes
    for cut in (TIGHT.max_head_bytes - 3, TIGHT.max_head_bytes - 1):
        assert _exchange(tight, client_source, [raw[:cut], raw[cut:]])[0].status == 200


# -- timeouts


def test_idle_connection_closed_silently(tight, client_source):
    with _connect(tight, client_source) as sock:
        _assert_closed(sock)


def test_partial_head_gets_408(tight, client_source):
    with _connect(tight, client_source) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: payments.test\r\n")
        doc = _assert_refused(_Stream(sock).reply(), 408)
        assert "0.5 s" in doc["detail"]


def test_partial_head_after_keep_alive_gets_408(tight, client_source):
    with _connect(tight, client_source) as sock:
        stream = _Stream(sock)
        sock.sendall(_request())
        assert stream.reply().status == 200
        sock.sendall(b"GET / HT")
        _assert_refused(stream.reply(), 408)


def test_slow_body_is_not_timed(tight, client_source):
    raw = _request(body=b"{}")
    with _connect(tight, client_source) as sock:
        sock.sendall(raw[:-2])
        time.sleep(TIGHT.head_timeout * 2)
        sock.sendall(raw[-2:])
        assert _Stream(sock).reply().status == 200


def test_normal_clients_work_while_slow_ones_are_cut(tight, client_source, planner_leaf_der):
    idle: list[ssl.SSLSocket] = []
    partial: list[ssl.SSLSocket] = []
    try:
        for _ in range(5):
            idle.append(_connect(tight, client_source))
            partial.append(_connect(tight, client_source))
            partial[-1].sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        ctx = client_context(client_source, server_id=PAYMENTS)
        with httpx.Client(verify=ctx, timeout=WAIT) as client:
            for _ in range(5):
                _check_echo(client.get(tight.url), planner_leaf_der)
        for sock in idle:
            _assert_closed(sock)
        for sock in partial:
            _assert_refused(_Stream(sock).reply(), 408)
        with httpx.Client(verify=ctx, timeout=WAIT) as client:
            _check_echo(client.get(tight.url), planner_leaf_der)
    finally:
        for sock in idle + partial:
            sock.close()


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_trickled_handshake_cut_at_deadline(server_source, loop):
    """A handshake still running at its deadline fails on its next record. (A peer that
    sends nothing at all is left to the event loop's own 60 s handshake timeout.)"""
    config = uvicorn_config(
        echo_tls_app, source=server_source, limits=TIGHT, loop=loop, log_level="warning"
    )
    hello = _client_hello()
    with run_server(config) as srv:
        for late in (False, True):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:
                sock.sendall(hello[:10])
                if late:
                    time.sleep(TIGHT.handshake_timeout * 2)
                sock.sendall(hello[10:])
                try:
                    first = sock.recv(1)
                except ConnectionResetError:
                    first = b""
                # In time: the server's hello (a TLS handshake record); late: closed.
                assert first == (b"" if late else b"\x16"), (late, first)
