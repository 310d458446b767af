"""mTLS under a real uvicorn: the ASGI TLS extension, client-certificate enforcement and
SPIFFE server-ID checks, for both uvicorn HTTP protocol classes, sync and async httpx."""

from __future__ import annotations

import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from _tls_helpers import WAIT, echo_tls_app, handshake, run_server
from cryptography.hazmat.primitives import serialization

from mtls.devpki import DevCA, init_dev_pki
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId, SpiffeIdPattern
from mtls.tlsconfig import client_context, peer_chain_pem, server_context
from mtls.uvicorn import H11TLSProtocol, HttpToolsTLSProtocol, uvicorn_config

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
