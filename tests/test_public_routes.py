"""The public read routes, over real TLS against real servers (DESIGN.md, "Evidence":
public read routes; "Issuer service": "Anyone" means anyone).

The issuer runs as a real ``axid serve`` process: its TLS asks for a client
certificate without requiring one, so curl and httpx without a certificate read
its JWKS and its log's checkpoint, inclusion and consistency proofs, and get 401
``no_peer_cert`` (unrecorded, counted) anywhere else. A governed "payments"
service (AxidVerifier under uvicorn, mTLS required) serves its own log under
``/.well-known/axid/log/``. Proofs are checked with ``_spec_rfc9162`` (RFC 9162
2.1.3.2 and 2.1.4.2 from the RFC's pseudo-code, not ``axid.audit.merkle``), and
checkpoints with a signed-note check from the C2SP spec (``_evidence_helpers``).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _evidence_helpers import (
    Service,
    anonymous_client,
    open_checkpoint,
    payments_service,
    vkey_of,
    with_local_names,
)
from _issuer_helpers import ISS, World, make_world, registrations_yaml, uid
from _pg import unavailable
from _spec_rfc9162 import HASH, leaf_hash, verify_consistency, verify_inclusion
from _tls_helpers import WAIT, echo_tls_app

from axid.audit.receipt import RECEIPT_HEADER, Receipt
from axid.audit.store import LogStore, make_engine
from axid.issuer.client import IssuerClient
from mtls.devpki import init_dev_pki
from mtls.tlsconfig import client_context, server_context
from mtls.uvicorn import uvicorn_config

pytestmark = pytest.mark.timeout(120)

AXID_BIN = str(Path(sys.executable).parent / "axid")


# --------------------------------------------------------------------------- proof texts


def parse_proof(text: str) -> tuple[int, list[bytes], bytes]:
    """(index, hashes, signed note) of a C2SP tlog-proof."""
    head, note = text.split("\n\n", 1)
    lines = head.split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    match = re.fullmatch(r"index (0|[1-9][0-9]*)", lines[1])
    assert match is not None, lines[1]
    return (
        int(match.group(1)),
        [base64.b64decode(h, validate=True) for h in lines[2:]],
        note.encode(),
    )


def parse_consistency(text: str) -> tuple[int, list[bytes], bytes]:
    """(old, hashes, signed note) of a tlog-witness add-checkpoint request body."""
    head, note = text.split("\n\n", 1)
    lines = head.split("\n")
    match = re.fullmatch(r"old (0|[1-9][0-9]*)", lines[0])
    assert match is not None, lines[0]
    return (
        int(match.group(1)),
        [base64.b64decode(h, validate=True) for h in lines[1:]],
        note.encode(),
    )


def assert_problem(r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["reason"] == reason and body["status"] == status, body
    assert set(body) == {"type", "title", "status", "detail", "reason"}
    return body


# --------------------------------------------------------------------------- the issuer


@dataclass
class Issuer:
    """A real ``axid serve`` process (client certificate optional)."""

    w: World
    url: str
    db_url: str
    log_key: Path

    @property
    def vkey(self) -> str:
        return vkey_of(f"axid/{self.w.log_name}", self.log_key)

    def log_size(self) -> int:
        engine = make_engine(self.db_url)
        try:
            return LogStore(engine, self.w.log_name).size()
        finally:
            engine.dispose()

    def mtls(self, name: str) -> httpx.Client:
        ctx = client_context(self.w.source(name), server_id=self.w.pki.spiffe_id("issuer"))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=WAIT, trust_env=False)

    def mint(self, name: str = "planner") -> Receipt:
        with IssuerClient(self.url, self.w.source(name)) as c:
            out = c.mint(
                agent=self.w.planner, run=self.w.run(), audience="payments", scope="payments:read"
            )
        assert out.receipt is not None
        return out.receipt


def _read_lines(stream: Any, q: queue.Queue[str]) -> None:
    for line in stream:
        q.put(line)


def _serve_config(w: World, tmp: Path) -> Path:
    cert, key = with_local_names(w, "issuer", tmp / "issuer-local.pem")
    (tmp / "registrations.yaml").write_text(registrations_yaml(w))
    doc = {
        "issuer": ISS,
        "host": "127.0.0.1",
        "port": 0,
        "svid": {"cert": str(cert), "key": str(key), "bundle": str(w.pki.bundle)},
        "keys_dir": str(tmp / "keys"),
        "registrations": str(tmp / "registrations.yaml"),
        "admins": [f"spiffe://{w.pki.trust_domain.name}/admin/*"],
        "audit": {"log": w.log_name, "key": str(tmp / "keys" / "log.pem")},
    }
    (tmp / "axid.yaml").write_text(json.dumps(doc))  # JSON is YAML
    return tmp / "axid.yaml"


def _wait_ready(proc: subprocess.Popen[str]) -> str:
    q: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, q), daemon=True).start()
    lines: list[str] = []
    deadline = time.monotonic() + WAIT
    while "ready\n" not in lines:
        try:
            lines.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"axid serve did not get ready: {lines} {proc.poll()}")
    return lines[0].removeprefix("issuer: ").strip()


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    tmp = tmp_path_factory.mktemp("public")
    w = make_world(tmp, "sqlite")
    db_url = f"sqlite:///{tmp}/issuer.db"
    env = {k: v for k, v in os.environ.items() if k != "AXID_DATABASE_URL"}
    proc = subprocess.Popen(
        [
            AXID_BIN,
            "serve",
            "--config",
            str(_serve_config(w, tmp)),
            "--db",
            db_url,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield Issuer(w, _wait_ready(proc), db_url, tmp / "keys" / "log.pem")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=WAIT) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def service(issuer: Issuer) -> Iterator[Service]:
    with payments_service(issuer.w, issuer.url) as s:
        yield s


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    if curl is None:
        unavailable("the curl binary is not installed (apt-get install curl)")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [curl, "--silent", "--show-error", "--noproxy", "*", "--max-time", str(WAIT), *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        env=env,
    )


# --------------------------------------------------------------------------- anyone


def test_curl_without_a_client_certificate_reads_the_jwks(issuer: Issuer) -> None:
    bundle = str(issuer.w.pki.bundle)
    done = _curl("--fail", "--cacert", bundle, f"{issuer.url}/.well-known/jwks.json")
    assert done.returncode == 0, done.stderr
    with IssuerClient(issuer.url, issuer.w.source("planner")) as c:
        assert json.loads(done.stdout) == c.jwks()
    assert json.loads(done.stdout)["keys"]

    issuer.mint()
    done = _curl("--fail", "--cacert", bundle, f"{issuer.url}/v1/audit/checkpoint")
    assert done.returncode == 0, done.stderr
    assert open_checkpoint(done.stdout.encode(), issuer.vkey).size >= 1

    before = issuer.log_size()
    done = _curl(
        "--cacert", bundle, "--include", "-X", "POST", "-H", "content-type: application/json",
        "--data", json.dumps(issuer.w.root_body()), f"{issuer.url}/v1/tokens",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    head, body = done.stdout.split("\n\n", 1)  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 401 ")
    assert re.search(r'(?im)^www-authenticate: AXID error="no_peer_cert"$', head), head
    assert RECEIPT_HEADER.lower() not in head.lower()
    assert json.loads(body)["reason"] == "no_peer_cert"
    assert issuer.log_size() == before


def test_curl_refuses_the_issuer_without_the_bundle(issuer: Issuer, tmp_path: Path) -> None:
    """The anonymous client still authenticates the server: another CA, no connection."""
    other = init_dev_pki(tmp_path / "other", "other.org")
    done = _curl("--cacert", str(other.bundle), f"{issuer.url}/.well-known/jwks.json")
    assert done.returncode == 60, (done.returncode, done.stderr)  # peer certificate unverified


def _anonymous_refusals(issuer: Issuer) -> float:
    with issuer.mtls("payments") as c:
        text = c.get("/metrics").text
    match = re.search(r"^axid_issuer_anonymous_refusals_total (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def test_httpx_without_a_client_certificate(issuer: Issuer) -> None:
    issuer.mint()
    before, refused = issuer.log_size(), _anonymous_refusals(issuer)
    with anonymous_client(issuer.w, issuer.url) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/.well-known/jwks.json").json()["keys"]
        note = c.get("/v1/audit/checkpoint")
        assert note.status_code == 200 and note.headers["content-type"].startswith("text/plain")
        size = open_checkpoint(note.content, issuer.vkey).size
        assert c.get("/v1/audit/proof", params={"seq": 0}).status_code == 200
        assert c.get("/v1/audit/consistency", params={"old": 1, "size": size}).status_code == 200
        refusals = [
            c.post("/v1/tokens", json=issuer.w.root_body()),
            c.post("/v1/revocations", json={"kind": "run", "value": "r", "reason": "x"}),
            c.get("/v1/revocations"),
            c.get("/metrics"),
            c.head("/healthz"),  # GET only, as DESIGN.md lists them
            c.get("/no/such/route"),
        ]
    for r in refusals:
        assert r.status_code == 401 and RECEIPT_HEADER not in r.headers
        assert r.headers["www-authenticate"] == 'AXID error="no_peer_cert"'
        if r.request.method != "HEAD":  # a HEAD answer has no body
            assert_problem(r, 401, "no_peer_cert")
    assert issuer.log_size() == before  # nothing recorded
    assert _anonymous_refusals(issuer) == refused + len(refusals)


def test_a_client_certificate_is_still_verified(issuer: Issuer, tmp_path: Path) -> None:
    other = init_dev_pki(tmp_path / "other", "other.org")
    ctx = ssl.create_default_context(cafile=str(issuer.w.pki.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(other.cert("planner"), other.key("planner"))
    before = issuer.log_size()
    with (
        httpx.Client(base_url=issuer.url, verify=ctx, timeout=WAIT, trust_env=False) as c,
        pytest.raises(httpx.TransportError),
    ):
        c.get("/.well-known/jwks.json")  # refused in the handshake, public route or not
    assert issuer.log_size() == before
    receipt = issuer.mint("planner")  # a trusted certificate: identified and recorded
    entry = json.loads(receipt.entry)
    assert entry["peer"] == issuer.w.spiffe_id("planner") and entry["decision"] == "allow"


# --------------------------------------------------------------------------- proofs


def test_issuer_consistency_proofs_verify_independently(issuer: Issuer) -> None:
    receipts = [issuer.mint() for _ in range(5)]
    views = [open_checkpoint(r.checkpoint, issuer.vkey) for r in receipts]
    assert all(v.size == r.checkpoint_size for v, r in zip(views, receipts, strict=True))
    latest = views[-1]
    with anonymous_client(issuer.w, issuer.url) as c:
        for old in views[:-1]:
            r = c.get(f"/v1/audit/consistency?old={old.size}&size={latest.size}")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            got_old, proof, note = parse_consistency(r.text)
            assert got_old == old.size and open_checkpoint(note, issuer.vkey) == latest
            assert verify_consistency(old.size, latest.size, old.root, latest.root, proof)
            assert not verify_consistency(old.size, latest.size, latest.root, latest.root, proof)
        for old_size, old_root in ((0, HASH(b"")), (latest.size, latest.root)):
            r = c.get(f"/v1/audit/consistency?old={old_size}&size={latest.size}")
            got_old, proof, note = parse_consistency(r.text)  # trivially consistent: empty
            assert (got_old, proof) == (old_size, [])
            assert open_checkpoint(note, issuer.vkey) == latest
            assert verify_consistency(old_size, latest.size, old_root, latest.root, proof)
        # Without size: the latest checkpoint.
        _, proof, note = parse_consistency(c.get(f"/v1/audit/consistency?old={views[0].size}").text)
        now = open_checkpoint(note, issuer.vkey)
        assert now.size >= latest.size
        assert verify_consistency(views[0].size, now.size, views[0].root, now.root, proof)
        # And an inclusion proof of each mint, at its receipt's checkpoint.
        for receipt, view in zip(receipts, views, strict=True):
            r = c.get(f"/v1/audit/proof?seq={receipt.seq}&size={view.size}")
            index, proof, note = parse_proof(r.text)
            assert index == receipt.seq and open_checkpoint(note, issuer.vkey) == view
            leaf = leaf_hash(receipt.entry)
            assert verify_inclusion(receipt.seq, view.size, leaf, proof, view.root)


def _governed_get(service: Service, issuer: Issuer) -> Receipt:
    with IssuerClient(issuer.url, issuer.w.source("planner")) as c:
        token = c.mint(
            agent=issuer.w.planner, run=issuer.w.run(), audience="payments", scope="payments:read"
        ).token
    r = service.client("planner").get(f"/payments/{uid()}", headers={"X-Waxell-AXID": token})
    assert r.status_code == 200, r.text
    return Receipt.from_header(r.headers[RECEIPT_HEADER])


def test_verifier_inclusion_proofs_verify_independently(issuer: Issuer, service: Service) -> None:
    receipts = [_governed_get(service, issuer) for _ in range(6)]
    before, seen = service.log_size(), len(service.seen)
    reader = service.client("worker")  # any peer that passed the service's TLS
    latest = open_checkpoint(reader.get("/.well-known/axid/log/checkpoint").content, service.vkey())
    assert latest.origin == service.origin and latest.size >= 6
    for receipt in receipts:
        view = open_checkpoint(receipt.checkpoint, service.vkey())
        leaf = leaf_hash(receipt.entry)
        assert leaf == receipt.leaf_hash
        for query, want in (
            (f"seq={receipt.seq}", latest),
            (f"seq={receipt.seq}&size={view.size}", view),
        ):
            r = reader.get(f"/.well-known/axid/log/proof?{query}")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert r.headers["cache-control"] == "no-cache"
            index, proof, note = parse_proof(r.text)
            assert index == receipt.seq and open_checkpoint(note, service.vkey()) == want
            assert verify_inclusion(receipt.seq, want.size, leaf, proof, want.root)
            assert not verify_inclusion(receipt.seq, want.size, leaf_hash(b"x"), proof, want.root)
        r = reader.get(f"/.well-known/axid/log/consistency?old={view.size}&size={latest.size}")
        old, proof, note = parse_consistency(r.text)
        assert old == view.size and open_checkpoint(note, service.vkey()) == latest
        assert verify_consistency(view.size, latest.size, view.root, latest.root, proof)
    # Read routes are ungoverned and unrecorded, and the app never sees them.
    assert service.log_size() == before and len(service.seen) == seen


def test_verifier_read_routes_methods(service: Service, issuer: Issuer) -> None:
    _governed_get(service, issuer)
    before = service.log_size()
    c = service.client("worker")
    for method in ("HEAD", "POST", "DELETE"):
        r = c.request(method, "/.well-known/axid/log/checkpoint")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        if method != "HEAD":
            assert_problem(r, 405, "method_not_allowed")
    assert service.log_size() == before
    assert ("shadow", None) not in service.seen


def test_verifier_read_routes_need_the_services_tls(service: Service) -> None:
    """'Any peer that passed its TLS': the service still requires a client certificate."""
    with anonymous_client(service.w, service.url) as c, pytest.raises(httpx.TransportError):
        c.get("/.well-known/axid/log/checkpoint")


# --------------------------------------------------------------------------- bad queries


BAD_QUERIES: list[tuple[str, str, int, str]] = [
    # (route, query, status, reason); {n} is the latest checkpoint's size.
    ("proof", "", 400, "bad_request"),
    ("proof", "seq=", 400, "bad_request"),
    ("proof", "seq=-1", 400, "bad_request"),
    ("proof", "seq=+1", 400, "bad_request"),
    ("proof", "seq=01", 400, "bad_request"),
    ("proof", "seq=1.0", 400, "bad_request"),
    ("proof", "seq=0x1", 400, "bad_request"),
    ("proof", "seq=%31", 400, "bad_request"),
    ("proof", "seq=1%20", 400, "bad_request"),
    ("proof", "seq=99999999999999999999", 400, "bad_request"),
    ("proof", "seq=0&seq=0", 400, "bad_request"),
    ("proof", "seq=0&other=1", 400, "bad_request"),
    ("proof", "seq=0&", 400, "bad_request"),
    ("proof", "seq", 400, "bad_request"),
    ("proof", "seq={n}", 400, "bad_request"),  # seq < size
    ("proof", "seq=0&size={n}0", 404, "not_found"),  # no checkpoint of that size
    ("proof", "seq=0&size=0", 404, "not_found"),
    ("consistency", "", 400, "bad_request"),
    ("consistency", "old=1&size=", 400, "bad_request"),
    ("consistency", "old={n}1", 400, "bad_request"),  # old <= size
    ("consistency", "old=0&size=01", 400, "bad_request"),
    ("consistency", "old=0&size={n}0", 404, "not_found"),
    ("checkpoint", "size=1", 400, "bad_request"),
]


def _latest_size(c: httpx.Client, path: str, vkey: str) -> int:
    return open_checkpoint(c.get(path).content, vkey).size


@pytest.mark.parametrize(("route", "query", "status", "reason"), BAD_QUERIES)
def test_bad_queries_issuer(
    issuer: Issuer, route: str, query: str, status: int, reason: str
) -> None:
    issuer.mint()
    with anonymous_client(issuer.w, issuer.url) as c:
        n = _latest_size(c, "/v1/audit/checkpoint", issuer.vkey)
        r = c.get(f"/v1/audit/{route}" + ("?" + query.format(n=n) if query else ""))
    assert_problem(r, status, reason)
    assert RECEIPT_HEADER not in r.headers


@pytest.mark.parametrize(("route", "query", "status", "reason"), BAD_QUERIES)
def test_bad_queries_verifier(
    issuer: Issuer, service: Service, route: str, query: str, status: int, reason: str
) -> None:
    if service.log_size() == 0:
        _governed_get(service, issuer)
    c = service.client("worker")
    n = _latest_size(c, "/.well-known/axid/log/checkpoint", service.vkey())
    before = service.log_size()
    r = c.get(f"/.well-known/axid/log/{route}" + ("?" + query.format(n=n) if query else ""))
    assert_problem(r, status, reason)
    assert r.headers["cache-control"] == "no-store"
    assert RECEIPT_HEADER not in r.headers
    assert service.log_size() == before


def test_empty_log_has_no_checkpoint(issuer: Issuer) -> None:
    """A service that has recorded nothing yet has signed nothing: 404 not_found."""
    with payments_service(issuer.w, issuer.url) as fresh:
        c = fresh.client("worker")
        assert fresh.log_size() == 0
        assert_problem(c.get("/.well-known/axid/log/checkpoint"), 404, "not_found")
        assert_problem(c.get("/.well-known/axid/log/proof?seq=0"), 404, "not_found")
        assert_problem(c.get("/.well-known/axid/log/consistency?old=0"), 404, "not_found")
        assert_problem(c.get("/.well-known/axid/log/proof?seq=x"), 400, "bad_request")


def test_client_cert_mode_is_checked(issuer: Issuer) -> None:
    """Only "required" (the default: every verifier) and "optional" (the issuer) exist."""
    source = issuer.w.source("payments")
    try:
        for bad in ("maybe", "", None, True):
            with pytest.raises(ValueError, match="client_cert"):
                server_context(source, client_cert=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="client_cert"):
                uvicorn_config(echo_tls_app, source=source, client_cert=bad)  # type: ignore[arg-type]
        assert server_context(source).verify_mode == ssl.CERT_REQUIRED
        assert server_context(source, client_cert="optional").verify_mode == ssl.CERT_OPTIONAL
    finally:
        source.close()
