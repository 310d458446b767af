"""SVID sources: PEM files reloaded without restart, and the SPIFFE Workload API against
the dev Workload API server (real gRPC on a unix socket), both under a real uvicorn."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from _tls_helpers import WAIT, echo_tls_app, run_server, server_leaf, wait_for
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from mtls.devpki import DevCA, IssuedSvid
from mtls.sources import (
    FileSource,
    SourceError,
    SvidMaterial,
    WorkloadApiSource,
    X509Source,
    _endpoint,
    svid_material_from_pem,
)
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from mtls.workloadapi import DevWorkloadApiServer, WorkloadApiServerError
from mtls.x509bundle import BundleSet

pytestmark = pytest.mark.timeout(60)

PAYMENTS = SpiffeId.parse("spiffe://example.org/svc/payments")
PLANNER = SpiffeId.parse("spiffe://example.org/agent/planner")


def _serial(cert) -> int:
    return cert.serial_number


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create("example.org")


@pytest.fixture(scope="module")
def bundle(ca) -> BundleSet:
    return BundleSet.from_pem(ca.cert_pem())


@pytest.fixture
def files(tmp_path, ca):
    """A directory with bundle.pem and the payments SVID A as svc.pem / svc.key."""
    (tmp_path / "bundle.pem").write_bytes(ca.cert_pem())
    a = ca.issue_svid(PAYMENTS)
    a.write(tmp_path / "svc")
    return tmp_path, a


def _install(
    d: Path, svid: IssuedSvid | None = None, *, cert: bytes | None = None, key: bytes | None = None
) -> None:
    """Atomically replace d/svc.key then d/svc.pem (os.replace), as a rotator would."""
    if svid is not None:
        cert = svid.cert_pem() if cert is None else cert
        key = svid.key_pem() if key is None else key
    for name, data in (("svc.key", key), ("svc.pem", cert)):
        if data is None:
            continue
        tmp = d / (name + ".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, d / name)


def _file_source(d: Path, **kw) -> FileSource:
    kw.setdefault("min_check_interval", 0.0)
    return FileSource(d / "svc.pem", d / "svc.key", d / "bundle.pem", **kw)


@pytest.fixture(scope="module")
def client_source(tmp_path_factory, ca):
    d = tmp_path_factory.mktemp("client")
    (d / "bundle.pem").write_bytes(ca.cert_pem())
    cert, key = ca.issue_svid(PLANNER).write(d / "planner")
    with FileSource(cert, key, d / "bundle.pem") as src:
        yield src


# -- FileSource ---------------------------------------------------------------------


def test_file_source_loads(files):
    d, a = files
    with _file_source(d) as src:
        assert isinstance(src, X509Source)
        m = src.svid()
        assert m.spiffe_id == PAYMENTS
        assert _serial(m.leaf) == _serial(a.cert)
        assert src.bundles().trust_domains == frozenset({PAYMENTS.trust_domain})
        assert "PRIVATE" not in repr(m)
        assert src.generation == 0


def test_file_source_first_load_must_succeed(tmp_path, ca):
    (tmp_path / "bundle.pem").write_bytes(ca.cert_pem())
    with pytest.raises(SourceError):  # missing files
        _file_source(tmp_path)
    a, b = ca.issue_svid(PAYMENTS), ca.issue_svid(PAYMENTS)
    _install(tmp_path, a, key=b.key_pem())
    with pytest.raises(SourceError, match="does not match"):
        _file_source(tmp_path)
    foreign = DevCA.create("example.org").issue_svid(PAYMENTS)
    _install(tmp_path, foreign)
    with pytest.raises(SourceError, match=r"not a valid X\.509-SVID"):
        _file_source(tmp_path)
    _install(tmp_path, a, key=b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SourceError, match="not an unencrypted PEM private key") as info:
        _file_source(tmp_path)
    assert "nope" not in str(info.value)


def test_file_source_ignores_invalid_replacements(files, ca, caplog):
    d, _ = files
    b = ca.issue_svid(PAYMENTS)
    with _file_source(d) as src:
        _install(d, b)
        assert _serial(src.svid().leaf) == _serial(b.cert)
        assert src.generation == 1

        bad_sets = [
            {"cert": b"garbage, not PEM"},  # half-written cert
            {"key": ca.issue_svid(PAYMENTS).key_pem()},  # key of another SVID
            {"svid": DevCA.create("example.org").issue_svid(PAYMENTS)},  # untrusted CA
        ]
        for bad in bad_sets:
            svid = bad.pop("svid", None)
            _install(d, svid, **bad)
            assert _serial(src.svid().leaf) == _serial(b.cert)
            assert src.generation == 1
            # Put b back so each bad set is tested alone.
            _install(d, b)
        assert "not valid; keeping previous" in caplog.text
        # Never a key in the logs.
        assert "PRIVATE KEY" not in caplog.text

        c = ca.issue_svid(PAYMENTS)
        _install(d, c)
        assert _serial(src.svid().leaf) == _serial(c.cert)
        assert src.generation == 2


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_file_source_refuses_a_key_others_can_access(files, mode):
    d, _ = files
    os.chmod(d / "svc.key", mode)
    with pytest.raises(SourceError, match=f"accessible by group/others \\(mode 0{mode:o}\\)"):
        _file_source(d)
    os.chmod(d / "svc.key", 0o400)  # read-only for the owner is fine too
    with _file_source(d) as src:
        assert src.svid().spiffe_id == PAYMENTS


def test_file_source_keeps_serving_when_a_rotated_key_is_not_private(files, ca, caplog):
    d, a = files
    b = ca.issue_svid(PAYMENTS)
    with _file_source(d) as src:
        _install(d, b)
        os.chmod(d / "svc.key", 0o644)  # a rotator that forgot the mode
        os.utime(d / "svc.key", ns=(1, 1))  # a new stamp even within the same mtime tick
        assert _serial(src.svid().leaf) == _serial(a.cert)
        assert "accessible by group/others" in caplog.text
        os.chmod(d / "svc.key", 0o600)
        os.utime(d / "svc.key", ns=(2, 2))
        assert _serial(src.svid().leaf) == _serial(b.cert)


def test_file_source_merges_several_bundle_files(files, tmp_path_factory):
    d, a = files
    other = tmp_path_factory.mktemp("other") / "bundle.pem"
    other.write_bytes(DevCA.create("other.org").cert_pem())
    # The SVID's own trust domain is in the second file only.
    with FileSource(d / "svc.pem", d / "svc.key", [other, d / "bundle.pem"]) as src:
        assert {td.name for td in src.bundles()} == {"other.org", "example.org"}
        assert _serial(src.svid().leaf) == _serial(a.cert)
        assert str(other) in repr(src)
    with pytest.raises(SourceError, match="not a valid X"):
        FileSource(d / "svc.pem", d / "svc.key", other)  # the first file alone
    with pytest.raises(ValueError):
        FileSource(d / "svc.pem", d / "svc.key", [])


def test_file_source_respects_check_interval(files, ca):
    d, a = files
    with _file_source(d, min_check_interval=3600) as src:
        _install(d, ca.issue_svid(PAYMENTS))
        # Not re-checked within the interval: still A (no restart needed later, see below).
        assert _serial(src.svid().leaf) == _serial(a.cert)


def test_file_source_same_content_is_not_a_rotation(files):
    d, a = files
    with _file_source(d) as src:
        _install(d, a)  # new inodes, same bytes
        assert _serial(src.svid().leaf) == _serial(a.cert)
        assert src.generation == 0


def test_closed_source_refuses_new_handshakes(files, client_source):
    d, _ = files
    src = _file_source(d)
    config = uvicorn_config(echo_tls_app, source=src, log_level="critical")
    ctx = client_context(client_source, server_id=PAYMENTS)
    with run_server(config) as server:
        assert httpx.get(server.url, verify=ctx, timeout=WAIT).status_code == 200
        src.close()
        # Fail closed: no SVID to vouch for, so no handshake (never stale material).
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url, verify=ctx, timeout=WAIT)


def test_file_source_closed(files):
    d, _ = files
    src = _file_source(d)
    src.close()
    with pytest.raises(SourceError):
        src.svid()


def test_file_source_server_rotation_without_restart(files, ca, client_source):
    d, a = files
    b = ca.issue_svid(PAYMENTS)
    with _file_source(d) as src:
        config = uvicorn_config(echo_tls_app, source=src, log_level="warning")
        ctx = client_context(client_source, server_id=PAYMENTS)
        with run_server(config) as server, httpx.Client(verify=ctx, timeout=WAIT) as client:
            assert _serial(server_leaf(server.port, ctx)) == _serial(a.cert)
            assert client.get(server.url).status_code == 200

            _install(d, b)
            assert _serial(server_leaf(server.port, ctx)) == _serial(b.cert)

            # Garbage on disk: new connections still get B.
            _install(d, cert=b"-----BEGIN CERTIFICATE-----\ntruncat")
            assert _serial(server_leaf(server.port, ctx)) == _serial(b.cert)
            _install(d, DevCA.create("example.org").issue_svid(PAYMENTS))
            assert _serial(server_leaf(server.port, ctx)) == _serial(b.cert)

            # And requests keep working on a fresh connection.
            with httpx.Client(verify=ctx, timeout=WAIT) as fresh:
                assert fresh.get(server.url).status_code == 200


async def test_client_rotation_without_new_client(tmp_path, ca):
    """A long-lived client context follows its FileSource: the server sees the new cert,
    for blocking sockets (httpx.Client) and memory BIOs (httpx.AsyncClient) alike."""
    (tmp_path / "bundle.pem").write_bytes(ca.cert_pem())
    p1 = ca.issue_svid(PLANNER)
    p1.write(tmp_path / "svc")
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    (srv_dir / "bundle.pem").write_bytes(ca.cert_pem())
    ca.issue_svid(PAYMENTS).write(srv_dir / "svc")

    def client_leaf(resp: httpx.Response) -> str:
        return resp.json()["tls"]["client_cert_chain"][0]

    with _file_source(tmp_path) as csrc, _file_source(srv_dir) as ssrc:
        ctx = client_context(csrc, server_id=PAYMENTS)
        config = uvicorn_config(echo_tls_app, source=ssrc, log_level="warning")
        with run_server(config) as server:
            async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
                assert client_leaf(await client.get(server.url)) == p1.cert_pem().decode()
            p2 = ca.issue_svid(PLANNER)
            _install(tmp_path, p2)
            with httpx.Client(verify=ctx, timeout=WAIT) as client:
                assert client_leaf(client.get(server.url)) == p2.cert_pem().decode()
            p3 = ca.issue_svid(PLANNER)
            _install(tmp_path, p3)
            async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
                assert client_leaf(await client.get(server.url)) == p3.cert_pem().decode()


def test_svid_material_from_pem(ca, bundle):
    a = ca.issue_svid(PAYMENTS)
    m = svid_material_from_pem(a.cert_pem(), a.key_pem(), bundle)
    assert isinstance(m, SvidMaterial)
    assert m.spiffe_id == PAYMENTS
    assert m.chain[0] == a.cert


# -- Workload API -------------------------------------------------------------------


@pytest.fixture
def api(tmp_path, ca, bundle):
    a = ca.issue_svid(PAYMENTS)
    with DevWorkloadApiServer(tmp_path / "api.sock", a, bundle) as server:
        yield server, a


def _watch_updates(src: WorkloadApiSource) -> threading.Semaphore:
    """Released once per update py-spiffe delivered, after the source handled it.

    py-spiffe calls subscribers in order; the source subscribed first.
    """
    sem = threading.Semaphore(0)
    src._source.subscribe_for_updates(sem.release)
    return sem


def test_workload_api_source_fetch_and_rotate(api, ca, tmp_path):
    server, a = api
    assert server.endpoint == "unix://" + str(tmp_path / "api.sock")
    assert (os.stat(tmp_path / "api.sock").st_mode & 0o777) == 0o600
    # A plain path works as well as the unix:// URI.
    with WorkloadApiSource(str(tmp_path / "api.sock"), timeout=WAIT) as src:
        assert isinstance(src, X509Source)
        assert src.svid().spiffe_id == PAYMENTS
        assert _serial(src.svid().leaf) == _serial(a.cert)
        assert src.bundles().get(PAYMENTS.trust_domain) == (ca.cert,)
        gen = src.generation
        b = ca.issue_svid(PAYMENTS)
        server.rotate(b)
        wait_for(lambda: _serial(src.svid().leaf) == _serial(b.cert), what="rotation")
        assert src.generation > gen
    with pytest.raises(SourceError):
        src.svid()


def test_workload_api_source_from_env(api, monkeypatch):
    server, a = api
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", server.endpoint)
    with WorkloadApiSource(timeout=WAIT) as src:
        assert _serial(src.svid().leaf) == _serial(a.cert)


def test_workload_api_source_ignores_invalid_update(api, ca):
    server, a = api
    with WorkloadApiSource(server.endpoint, timeout=WAIT) as src:
        updates = _watch_updates(src)
        gen = src.generation
        server.rotate(DevCA.create("example.org").issue_svid(PAYMENTS))  # untrusted
        assert updates.acquire(timeout=WAIT)
        assert _serial(src.svid().leaf) == _serial(a.cert)
        assert src.generation == gen
        c = ca.issue_svid(PAYMENTS)
        server.rotate(c)
        assert updates.acquire(timeout=WAIT)
        assert _serial(src.svid().leaf) == _serial(c.cert)
        assert src.generation == gen + 1


def test_workload_api_federated_bundles(tmp_path, ca, bundle):
    other = DevCA.create("other.example")
    both = BundleSet.from_pem(ca.cert_pem() + other.cert_pem())
    svid = ca.issue_svid(PAYMENTS)
    with (
        DevWorkloadApiServer(tmp_path / "fed.sock", svid, both) as server,
        WorkloadApiSource(server.endpoint, timeout=WAIT) as src,
    ):
        assert src.bundles() == both
        with WorkloadApiClient(server.endpoint) as client:
            assert BundleSet.from_py_spiffe(client.fetch_x509_bundles(timeout=WAIT)) == both


def test_workload_api_errors(tmp_path, monkeypatch):
    with pytest.raises(SourceError):
        WorkloadApiSource(str(tmp_path / "missing.sock"), timeout=1)
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(SourceError, match="SPIFFE_ENDPOINT_SOCKET"):
        WorkloadApiSource(timeout=1)
    with pytest.raises(SourceError, match="only unix"):
        WorkloadApiSource("tcp://127.0.0.1:8081", timeout=1)
    with pytest.raises(SourceError, match="authority"):
        WorkloadApiSource("unix://host/tmp/x.sock", timeout=1)


@given(st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True), min_size=1, max_size=5))
def test_endpoint_normalisation(parts):
    path = "/" + "/".join(parts)
    assert _endpoint(path) == "unix://" + os.path.abspath(path)
    assert _endpoint("unix://" + path) == "unix://" + path
    assert _endpoint("unix:" + path) == "unix://" + path


def test_uvicorn_on_workload_api_rotates(api, ca, client_source):
    server, a = api
    with WorkloadApiSource(server.endpoint, timeout=WAIT) as src:
        config = uvicorn_config(echo_tls_app, source=src, http="httptools", log_level="warning")
        ctx = client_context(client_source, server_id=PAYMENTS)
        with run_server(config) as web:
            assert _serial(server_leaf(web.port, ctx)) == _serial(a.cert)
            resp = httpx.get(web.url, verify=ctx, timeout=WAIT)
            assert resp.status_code == 200
            b = ca.issue_svid(PAYMENTS)
            server.rotate(b)
            wait_for(lambda: _serial(src.svid().leaf) == _serial(b.cert), what="rotation")
            assert _serial(server_leaf(web.port, ctx)) == _serial(b.cert)
            assert httpx.get(web.url, verify=ctx, timeout=WAIT).status_code == 200


def _raw_stub(server: DevWorkloadApiServer):
    channel = grpc.insecure_channel(f"unix:{server.socket_path}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_workload_api_requires_security_header(api):
    server, _ = api
    channel, stub = _raw_stub(server)
    with channel:
        for call, req in (
            (stub.FetchX509SVID, workload_pb2.X509SVIDRequest()),
            (stub.FetchX509Bundles, workload_pb2.X509BundlesRequest()),
        ):
            with pytest.raises(grpc.RpcError) as info:
                next(iter(call(req, timeout=WAIT)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            next(
                iter(
                    stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(),
                        timeout=WAIT,
                        metadata=(("workload.spiffe.io", "false"),),
                    )
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_workload_api_wire_format_and_jwt_unimplemented(api, ca):
    server, a = api
    channel, stub = _raw_stub(server)
    header = (("workload.spiffe.io", "true"),)
    with channel:
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=WAIT, metadata=header)
        resp = next(iter(stream))
        stream.cancel()
        (svid,) = resp.svids
        assert svid.spiffe_id == str(PAYMENTS)
        assert svid.x509_svid == a.cert.public_bytes(serialization.Encoding.DER)
        assert svid.bundle == ca.cert.public_bytes(serialization.Encoding.DER)
        key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
        assert key.public_key() == a.cert.public_key()
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["x"]), timeout=WAIT, metadata=header
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_dev_server_refuses_bad_setup(tmp_path, ca, bundle):
    other = BundleSet.from_pem(DevCA.create("other.example").cert_pem())
    with pytest.raises(WorkloadApiServerError, match="no CA for trust domain"):
        DevWorkloadApiServer(tmp_path / "x.sock", ca.issue_svid(PAYMENTS), other)
    (tmp_path / "file").write_text("not a socket")
    server = DevWorkloadApiServer(tmp_path / "file", ca.issue_svid(PAYMENTS), bundle)
    with pytest.raises(WorkloadApiServerError, match="not a socket"):
        server.start()
    with pytest.raises(WorkloadApiServerError, match="too long"):
        DevWorkloadApiServer("/" + "x" * 200, ca.issue_svid(PAYMENTS), bundle)
