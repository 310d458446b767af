"""The verifier end to end, over real mTLS sockets, against the real issuer.

One world per database kind (SQLite; PostgreSQL when AXID_TEST_DATABASE_URL is
set): the dev PKI, the issuer (axid.issuer) under uvicorn, and a governed sample
"payments" FastAPI service under uvicorn, wrapped in AxidVerifier configured from
a YAML file (JWKS and revocations fetched from the issuer over mTLS), all on
127.0.0.1 port 0. Agents mint real tokens from the issuer with their own SVIDs.
Every case asserts the HTTP status, the reason code and the matching entry of
the decision log; the module ends by verifying every log it wrote, with the
library and with ``axid audit verify``.

A second "permissive" server runs the same service with a TLS context that asks
for (but does not require) a client certificate and trusts another trust domain
too: the strict server refuses such clients in the handshake, so this is how
the verifier's own ``no_peer_cert`` / ``peer_untrusted`` answers are reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from _tls_helpers import WAIT, ServerThread, wait_for
from _verifier_helpers import PG_URL, Pki, log_entries, make_pki, require_pg
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI, Request

from axid.audit.verify import DatabaseSource, verify_log
from axid.issuer.app import create_app
from axid.issuer.client import IssuerClient, MintResult
from axid.issuer.config import IssuerConfig
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId, SpiffeIdPattern
from mtls.tlsconfig import client_context
from mtls.uvicorn import H11TLSProtocol, uvicorn_config
from verifier.config import VerifierConfig
from verifier.middleware import AxidVerifier
from verifier.observability import VerifierMetrics

ISS = "https://issuer.axid.test"
AXID_BIN = str(Path(sys.executable).parent / "axid")
WORKER_SCRIPT = str(Path(__file__).parent / "_verifier_worker.py")
SCOPE_ALL = "payments:read payments:refund payments:delete"

pytestmark = pytest.mark.timeout(120)


class OffsetClock:
    """Real time plus an offset the tests move forward (issuer and verifier share it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class Env:
    kind: str
    tmp: Path
    pki: Pki
    clock: OffsetClock
    issuer_app: Any
    issuer: ServerThread
    log_url: str
    log_name: str
    config_path: Path
    verifier: AxidVerifier
    governed: ServerThread
    permissive_verifier: AxidVerifier
    permissive: ServerThread
    handled: list[tuple[str, str]]
    metrics: VerifierMetrics
    _clients: dict[str, httpx.Client] = field(default_factory=dict)
    _issuer_clients: dict[str, IssuerClient] = field(default_factory=dict)

    @property
    def issuer_url(self) -> str:
        return f"https://127.0.0.1:{self.issuer.port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.governed.port}"

    @property
    def permissive_url(self) -> str:
        return f"https://127.0.0.1:{self.permissive.port}"

    def source(self, name: str) -> FileSource:
        return FileSource(self.pki.cert(name), self.pki.key(name), self.pki.dev.bundle)

    def client(self, name: str) -> httpx.Client:
        """An mTLS client of the payments service presenting workload ``name``'s SVID."""
        c = self._clients.get(name)
        if c is None:
            ctx = client_context(self.source(name), server_id=self.pki.dev.spiffe_id("payments"))
            c = httpx.Client(verify=ctx, timeout=WAIT, trust_env=False)
            self._clients[name] = c
        return c

    def issuer_client(self, name: str) -> IssuerClient:
        c = self._issuer_clients.get(name)
        if c is None:
            c = IssuerClient(self.issuer_url, self.source(name))
            self._issuer_clients[name] = c
        return c

    def mint(self, name: str = "planner", **kw: Any) -> MintResult:
        kw.setdefault("agent", "globex" if name == "globex" else name.rstrip("2"))
        kw.setdefault("run", f"run-{uid()}")
        kw.setdefault("audience", "payments")
        kw.setdefault("scope", "payments:read")
        return self.issuer_client(name).mint(**kw)

    def call(
        self,
        name: str,
        method: str,
        path: str,
        token: str | None,
        *,
        base: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        h = dict(headers or {})
        if token is not None:
            h["X-Waxell-AXID"] = token
        return self.client(name).request(method, (base or self.url) + path, headers=h)

    def entry(self, path: str) -> dict[str, Any]:
        """The last decision-log entry for ``path``."""
        found = [e for e in log_entries(self.log_url, self.log_name) if e["path"] == path]
        assert found, f"no log entry for {path}"
        return found[-1]

    def wait_revocations(self, seq: int) -> None:
        for verifier in (self.verifier, self.permissive_verifier):
            source = verifier.revocations
            assert source is not None
            wait_for(lambda s=source: s.seq >= seq, what="revocation poll")

    def close_clients(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def close(self) -> None:
        self.close_clients()
        for ic in self._issuer_clients.values():
            ic.close()


def _registrations(td: str) -> str:
    return json.dumps(
        {
            "registrations": [
                {
                    "spiffe_id": f"spiffe://{td}/agent/planner",
                    "tenant": "acme",
                    "agents": ["planner"],
                    "audiences": ["payments", "billing"],
                    "scope": SCOPE_ALL,
                },
                {
                    "spiffe_id": f"spiffe://{td}/agent/worker",
                    "tenant": "acme",
                    "agents": ["worker"],
                    "audiences": ["payments"],
                    "scope": "payments:read payments:refund",
                    "spawn_from": [f"spiffe://{td}/agent/planner"],  # explicit delegation
                },
                {
                    "spiffe_id": f"spiffe://{td}/agent/globex",
                    "tenant": "globex",
                    "agents": ["globex"],
                    "audiences": ["payments"],
                    "scope": "payments:read",
                },
            ]
        }
    )


def _verifier_yaml(env_tmp: Path, pki: Pki, issuer_url: str, log_url: str, log: str) -> str:
    d = pki.dev.directory
    doc = {
        "service": "payments",
        "issuer": ISS,
        "tenants": ["acme"],
        "leeway": 5,
        "identity": {
            "bundle": str(pki.dev.bundle),
            "cert": str(d / "payments.pem"),
            "key": str(d / "payments.key"),
        },
        "issuer_id": f"spiffe://{pki.dev.trust_domain.name}/axid/issuer",
        "trusted_proxies": [f"spiffe://{pki.dev.trust_domain.name}/proxy/*"],
        "jwks": {
            "url": f"{issuer_url}/.well-known/jwks.json",
            "refetch_min_interval": 0,
        },
        "revocations": {"url": f"{issuer_url}/v1/revocations", "interval": 0.2, "max_stale": 30},
        "log": {
            "url": log_url,
            "name": log,
            "key": str(env_tmp / "payments-log.pem"),
            "lock_timeout": 0.5,
        },
        "rules": [
            {"path": "/healthz", "governed": False},
            {"path": "/metrics/**", "governed": False},
            {"methods": ["GET"], "path": "/payments/*", "scope": "payments:read"},
            {
                "methods": ["POST"],
                "path": "/payments/*/refund",
                "scope": "payments:refund",
                "single_use": True,
            },
            {"methods": ["DELETE"], "path": "/payments/*", "scope": "payments:delete"},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _payments_app(handled: list[tuple[str, str]]) -> FastAPI:
    app = FastAPI()

    def describe(request: Request) -> dict[str, Any]:
        a = request.state.axid
        return {"agent": a.agent, "run": a.run, "tenant": a.tenant, "chain": list(a.chain)}

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        handled.append(("GET", pid))
        return {"pid": pid, **describe(request)}

    @app.post("/payments/{pid}/refund")
    async def refund(pid: str, request: Request) -> dict[str, Any]:
        handled.append(("POST", pid))
        return {"pid": pid, "refunded": True, **describe(request)}

    @app.delete("/payments/{pid}")
    async def delete(pid: str, request: Request) -> dict[str, Any]:
        handled.append(("DELETE", pid))
        return {"pid": pid, "deleted": True}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _permissive_config(app: Any, pki: Pki) -> uvicorn.Config:
    """TLS asking for an optional client certificate, trusting example.org and other.org."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert("payments"), pki.key("payments"))
    ctx.load_verify_locations(cafile=str(pki.dev.bundle))
    ctx.load_verify_locations(cafile=str(pki.other.bundle))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=H11TLSProtocol,
        ssl_context_factory=lambda _config, _default: ctx,
        log_level="warning",
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    kind = request.param
    if kind == "postgresql":
        require_pg()
    tmp = tmp_path_factory.mktemp(f"e2e-{kind}")
    pki = make_pki(tmp)
    clock = OffsetClock()
    td = pki.dev.trust_domain.name
    registrations = tmp / "registrations.yaml"
    registrations.write_text(_registrations(td))
    issuer_config = IssuerConfig(
        registrations=registrations,
        issuer=ISS,
        port=0,
        cert=pki.cert("issuer"),
        key=pki.key("issuer"),
        bundle=pki.dev.bundle,
        keys_dir=tmp / "issuer-keys",
        database_url=f"sqlite:///{tmp}/issuer.db",
        admins=(SpiffeIdPattern.parse(f"spiffe://{td}/admin/*"),),
        log_key=tmp / "issuer-log.pem",
    )
    issuer_app = create_app(issuer_config, clock=clock)
    issuer = ServerThread(
        uvicorn_config(issuer_app, source=issuer_app.state.components.source, log_level="warning")
    ).start()
    servers = [issuer]
    try:
        issuer_url = f"https://127.0.0.1:{issuer.port}"
        log_url = f"sqlite:///{tmp}/verifier.db" if kind == "sqlite" else str(PG_URL)
        log_name = f"payments-{uid()}"
        config_path = tmp / "verifier.yaml"
        config_path.write_text(_verifier_yaml(tmp, pki, issuer_url, log_url, log_name))
        config = VerifierConfig.from_file(config_path)

        handled: list[tuple[str, str]] = []
        app = _payments_app(handled)
        metrics = VerifierMetrics()
        app.mount("/metrics", metrics.metrics_app)
        verifier = AxidVerifier(app, config, clock=clock, metrics=metrics)
        source = FileSource(pki.cert("payments"), pki.key("payments"), pki.dev.bundle)
        governed = ServerThread(
            uvicorn_config(verifier, source=source, log_level="warning", lifespan="on")
        ).start()
        servers.append(governed)
        permissive_verifier = AxidVerifier(app, config, clock=clock)
        permissive = ServerThread(_permissive_config(permissive_verifier, pki)).start()
        servers.append(permissive)
        e = Env(
            kind=kind,
            tmp=tmp,
            pki=pki,
            clock=clock,
            issuer_app=issuer_app,
            issuer=issuer,
            log_url=log_url,
            log_name=log_name,
            config_path=config_path,
            verifier=verifier,
            governed=governed,
            permissive_verifier=permissive_verifier,
            permissive=permissive,
            handled=handled,
            metrics=metrics,
        )
        try:
            yield e
        finally:
            e.close()
    finally:
        for server in reversed(servers):
            server.stop()


def assert_denied(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == f'AXID error="{reason}"'
    body = response.json()
    assert body["reason"] == reason and body["status"] == status
    return body


# --------------------------------------------------------------------------- the cases


def test_allowed_call(env: Env) -> None:
    minted = env.mint("planner", run=f"run-{uid()}")
    path = f"/payments/{uid()}"
    response = env.call("planner", "GET", path, minted.token)
    assert response.status_code == 200, response.text
    assert response.json()["agent"] == "planner" and response.json()["tenant"] == "acme"
    entry = env.entry(path)
    assert entry["decision"] == "allow" and entry["reason"] == "ok"
    assert entry["jti"] == minted.jti and entry["kid"] == minted.kid
    assert entry["peer"] == env.pki.spiffe_id("planner")
    assert entry["peer_cert"] == env.pki.cnf("planner")
    assert entry["iss"] == ISS and entry["service"] == "payments" and entry["method"] == "GET"


def test_ungoverned_and_metrics(env: Env) -> None:
    assert env.client("worker").get(env.url + "/healthz").status_code == 200
    text = env.client("worker").get(env.url + "/metrics/").text
    assert 'axid_verifier_decisions_total{decision="allow",reason="ok"}' in text
    assert "axid_verifier_decision_seconds_bucket" in text


def test_no_client_certificate(env: Env) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(env.pki.dev.bundle))
    token = env.mint("planner").token
    path = f"/payments/{uid()}"
    with httpx.Client(verify=ctx, timeout=WAIT, trust_env=False) as anonymous:
        # The strict mTLS server refuses the handshake itself: nothing reaches the app.
        with pytest.raises(httpx.TransportError):
            anonymous.get(env.url + path, headers={"X-Waxell-AXID": token})
        response = anonymous.get(env.permissive_url + path, headers={"X-Waxell-AXID": token})
    assert_denied(response, 401, "no_peer_cert")
    entry = env.entry(path)
    assert entry["decision"] == "deny" and entry["reason"] == "no_peer_cert"
    assert entry["peer"] is None and ("GET", path.rsplit("/", 1)[1]) not in env.handled


def test_certificate_from_another_trust_domain(env: Env) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(env.pki.dev.bundle))
    ctx.load_cert_chain(env.pki.other.cert("planner"), env.pki.other.key("planner"))
    token = env.mint("planner").token
    path = f"/payments/{uid()}"
    with httpx.Client(verify=ctx, timeout=WAIT, trust_env=False) as foreigner:
        with pytest.raises(httpx.TransportError):
            foreigner.get(env.url + path, headers={"X-Waxell-AXID": token})
        response = foreigner.get(env.permissive_url + path, headers={"X-Waxell-AXID": token})
    assert_denied(response, 401, "peer_untrusted")
    entry = env.entry(path)
    assert entry["reason"] == "peer_untrusted" and entry["peer"] is None
    assert "other.org" in entry["note"]


def test_no_token(env: Env) -> None:
    path = f"/payments/{uid()}"
    assert_denied(env.call("planner", "GET", path, None), 401, "token_missing")
    entry = env.entry(path)
    assert entry["reason"] == "token_missing" and entry["peer"] == env.pki.spiffe_id("planner")


def test_token_for_another_audience(env: Env) -> None:
    minted = env.mint("planner", audience="billing")
    path = f"/payments/{uid()}"
    assert_denied(env.call("planner", "GET", path, minted.token), 401, "token_wrong_audience")
    entry = env.entry(path)
    assert entry["reason"] == "token_wrong_audience" and entry["jti"] == minted.jti


def test_expired_token(env: Env) -> None:
    minted = env.mint("planner", ttl_seconds=30)
    ok = f"/payments/{uid()}"
    assert env.call("planner", "GET", ok, minted.token).status_code == 200
    env.clock.advance(40)  # past exp + leeway (5 s)
    path = f"/payments/{uid()}"
    assert_denied(env.call("planner", "GET", path, minted.token), 401, "token_expired")
    entry = env.entry(path)
    assert entry["reason"] == "token_expired" and entry["jti"] == minted.jti


def test_token_of_agent_a_presented_by_agent_b(env: Env) -> None:
    minted = env.mint("planner")
    path = f"/payments/{uid()}"
    # The worker, with its own valid SVID, presents the planner's token.
    assert_denied(env.call("worker", "GET", path, minted.token), 401, "subject_mismatch")
    entry = env.entry(path)
    assert entry["peer"] == env.pki.spiffe_id("worker") and entry["agent"] == "planner"
    assert entry["jti"] == minted.jti
    # Another SVID with the planner's very SPIFFE ID: not the certificate the token binds.
    path = f"/payments/{uid()}"
    assert_denied(env.call("planner2", "GET", path, minted.token), 401, "cert_binding_mismatch")
    entry = env.entry(path)
    assert entry["peer"] == env.pki.spiffe_id("planner")
    assert entry["peer_cert"] == env.pki.cnf("planner2") != env.pki.cnf("planner")


def test_scope_too_narrow(env: Env) -> None:
    minted = env.mint("worker", scope="payments:read payments:refund")
    path = f"/payments/{uid()}"
    assert_denied(env.call("worker", "DELETE", path, minted.token), 403, "scope_insufficient")
    entry = env.entry(path)
    assert entry["reason"] == "scope_insufficient" and entry["scope_required"] == "payments:delete"
    assert entry["rule"] == "DELETE /payments/*" and entry["note"] == "missing payments:delete"
    assert ("DELETE", path.rsplit("/", 1)[1]) not in env.handled


def test_other_tenant(env: Env) -> None:
    minted = env.mint("globex")
    path = f"/payments/{uid()}"
    assert_denied(env.call("globex", "GET", path, minted.token), 403, "tenant_not_allowed")
    entry = env.entry(path)
    assert entry["tenant"] == "globex" and entry["jti"] == minted.jti


def test_revoked_run_and_revoked_ancestor(env: Env) -> None:
    admin = env.issuer_client("admin")
    # A run, revoked.
    run = f"run-{uid()}"
    minted = env.mint("planner", run=run)
    assert env.call("planner", "GET", f"/payments/{uid()}", minted.token).status_code == 200
    revocation = admin.revoke("run", run, "test: compromised run")
    env.wait_revocations(revocation["seq"])
    path = f"/payments/{uid()}"
    assert_denied(env.call("planner", "GET", path, minted.token), 403, "revoked")
    entry = env.entry(path)
    assert entry["reason"] == "revoked" and entry["run"] == run and run in entry["note"]

    # A root run spawns a worker's run; revoking the root revokes the child (cascade).
    root = f"root-{uid()}"
    parent = env.mint("planner", run=root, scope="payments:read payments:refund")
    child_run = f"child-{uid()}"
    child = env.mint("worker", run=child_run, parent_token=parent.token, scope="payments:read")
    ok = f"/payments/{uid()}"
    response = env.call("worker", "GET", ok, child.token)
    assert response.status_code == 200 and response.json()["chain"] == [root]
    revocation = admin.revoke("run", root, "test: stop the whole tree")
    env.wait_revocations(max(revocation["seq"], *(c["seq"] for c in revocation["cascaded"])))
    path = f"/payments/{uid()}"
    assert_denied(env.call("worker", "GET", path, child.token), 403, "revoked")
    entry = env.entry(path)
    assert entry["run"] == child_run and entry["chain"] == [root]
    assert entry["note"] == f"ancestor run {root} is revoked"
    # A run spawned under the revoked root after the fact is refused by the issuer.
    from axid.issuer.client import IssuerError

    with pytest.raises(IssuerError) as info:
        env.mint("worker", run=f"late-{uid()}", parent_token=parent.token)
    assert info.value.reason == "revoked"


def test_single_use_replay_also_across_processes(env: Env) -> None:
    minted = env.mint("planner", scope="payments:refund")
    pid = uid()
    first = env.call("planner", "POST", f"/payments/{pid}/refund", minted.token)
    assert first.status_code == 200 and first.json()["refunded"]
    again = f"/payments/{pid}/refund"
    assert_denied(env.call("planner", "POST", again, minted.token), 403, "replayed")
    assert env.entry(again)["reason"] == "replayed"
    assert env.handled.count(("POST", pid)) == 1

    with _second_process(env) as base:
        # A fresh token used once here, then presented to the second process: replayed.
        token = env.mint("planner", scope="payments:refund payments:read")
        pid = uid()
        path = f"/payments/{pid}/refund"
        assert env.call("planner", "POST", path, token.token).status_code == 200
        response = env.call("planner", "POST", path, token.token, base=base)
        assert_denied(response, 403, "replayed")
        entries = [e for e in log_entries(env.log_url, env.log_name) if e["path"] == path]
        assert [e["reason"] for e in entries] == ["ok", "replayed"]
        assert entries[1]["jti"] == token.jti
        # And the other way round, the second process first.
        token = env.mint("planner", scope="payments:refund")
        path = f"/payments/{uid()}/refund"
        response = env.call("planner", "POST", path, token.token, base=base)
        assert response.status_code == 200 and response.json()["process"] == "second"
        assert_denied(env.call("planner", "POST", path, token.token), 403, "replayed")


@contextmanager
def _second_process(env: Env) -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            WORKER_SCRIPT,
            str(env.config_path),
            str(env.pki.cert("payments")),
            str(env.pki.key("payments")),
            str(env.pki.dev.bundle),
            str(env.clock.offset),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(env.tmp),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until "PORT n" or the process dies
        if not line.startswith("PORT "):
            _, err = proc.communicate(timeout=WAIT)
            raise AssertionError(f"second verifier did not start: {line!r} {err[-2000:]}")
        yield f"https://127.0.0.1:{int(line.split()[1])}"
    finally:
        # Idle keep-alive TLS connections would hold the child's graceful shutdown.
        env.close_clients()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung child
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _xfcc(env: Env, name: str, *, cert: bool = True) -> str:
    leaf = env.pki.leaf(name)
    der = leaf.public_bytes(Encoding.DER)
    parts = [
        f"By={env.pki.spiffe_id('envoy')}",
        f"Hash={hashlib.sha256(der).hexdigest()}",
    ]
    if cert:
        parts.append(
            "Cert=" + urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe="")
        )
    parts.append(f"URI={env.pki.spiffe_id(name)}")
    return ";".join(parts)


def test_xfcc_from_trusted_proxy_honoured(env: Env) -> None:
    minted = env.mint("planner")
    path = f"/payments/{uid()}"
    xfcc = {"X-Forwarded-Client-Cert": _xfcc(env, "planner")}
    response = env.call("envoy", "GET", path, minted.token, headers=xfcc)
    assert response.status_code == 200, response.text
    entry = env.entry(path)
    assert entry["decision"] == "allow" and entry["peer"] == env.pki.spiffe_id("planner")
    assert entry["peer_cert"] == env.pki.cnf("planner")
    assert entry["note"] == f"via trusted proxy {env.pki.spiffe_id('envoy')}"
    # A trusted proxy forwarding only a URI, no certificate: not an identity.
    path = f"/payments/{uid()}"
    uri_only = {"X-Forwarded-Client-Cert": _xfcc(env, "planner", cert=False)}
    assert_denied(
        env.call("envoy", "GET", path, minted.token, headers=uri_only), 401, "peer_not_svid"
    )
    assert env.entry(path)["reason"] == "peer_not_svid"


def test_xfcc_from_untrusted_peer_ignored(env: Env) -> None:
    planner_token = env.mint("planner").token
    xfcc = {"X-Forwarded-Client-Cert": _xfcc(env, "planner")}
    # The worker claims, by header, to forward the planner: ignored, so the token is stolen.
    path = f"/payments/{uid()}"
    response = env.call("worker", "GET", path, planner_token, headers=xfcc)
    assert_denied(response, 401, "subject_mismatch")
    entry = env.entry(path)
    assert entry["peer"] == env.pki.spiffe_id("worker") and "ignored" in entry["note"]
    # With its own token it is served as itself, and the ignored header is recorded.
    own = env.mint("worker").token
    path = f"/payments/{uid()}"
    assert env.call("worker", "GET", path, own, headers=xfcc).status_code == 200
    entry = env.entry(path)
    assert entry["decision"] == "allow" and entry["peer"] == env.pki.spiffe_id("worker")
    assert "x-forwarded-client-cert ignored" in entry["note"]


def test_jwks_rotation_while_serving(env: Env) -> None:
    old = env.mint("planner", ttl_seconds=300)
    assert env.call("planner", "GET", f"/payments/{uid()}", old.token).status_code == 200
    jwks = env.verifier.jwks
    assert jwks is not None
    kids_before = set(jwks.key_set().kids)  # type: ignore[union-attr]
    keyring = env.issuer_app.state.components.keyring
    new_kid = keyring.rotate(env.clock(), publish_lead=10)
    assert new_kid not in kids_before
    env.clock.advance(11)  # the new key signs from now on; the old one is retired
    new = env.mint("planner", ttl_seconds=300)
    assert new.kid == new_kid != old.kid
    path_new, path_old = f"/payments/{uid()}", f"/payments/{uid()}"
    # The verifier has never seen the new kid: it refetches the JWKS and accepts it.
    assert env.call("planner", "GET", path_new, new.token).status_code == 200
    # During the overlap the old key is still published: its tokens still pass.
    assert env.call("planner", "GET", path_old, old.token).status_code == 200
    assert env.entry(path_new)["kid"] == new_kid and env.entry(path_old)["kid"] == old.kid
    assert {old.kid, new_kid} <= set(jwks.key_set().kids)  # type: ignore[union-attr]


def test_audit_unavailable_mid_test(env: Env) -> None:
    minted = env.mint("planner")
    assert env.call("planner", "GET", f"/payments/{uid()}", minted.token).status_code == 200
    pid = uid()
    with _log_locked(env):
        response = env.call("planner", "GET", f"/payments/{pid}", minted.token)
        assert_denied(response, 503, "audit_unavailable")
    assert ("GET", pid) not in env.handled  # the app never ran
    assert not [
        e for e in log_entries(env.log_url, env.log_name) if e["path"] == f"/payments/{pid}"
    ]
    path = f"/payments/{uid()}"
    assert env.call("planner", "GET", path, minted.token).status_code == 200
    assert env.entry(path)["decision"] == "allow"
    assert env.metrics.count("deny", "audit_unavailable") >= 1


@contextmanager
def _log_locked(env: Env) -> Iterator[None]:
    """Hold the decision log's write lock from another connection (tests run as root,
    so chmod cannot make the database unwritable)."""
    if env.kind == "sqlite":
        db = env.log_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(db, timeout=WAIT, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg

    with psycopg.connect(str(env.log_url)) as conn, conn.transaction():
        conn.execute("SELECT name FROM axid_audit_log WHERE name = %s FOR UPDATE", (env.log_name,))
        yield


def test_every_log_verifies(env: Env) -> None:
    """Last: the decision logs written during the suite verify, by library and CLI."""
    report = verify_log(DatabaseSource(env.log_url, env.log_name))
    assert report.ok, report.first_bad
    assert report.entries >= 30
    reasons = {e["reason"] for e in log_entries(env.log_url, env.log_name)}
    assert {
        "ok",
        "no_peer_cert",
        "peer_untrusted",
        "peer_not_svid",
        "token_missing",
        "token_wrong_audience",
        "token_expired",
        "subject_mismatch",
        "cert_binding_mismatch",
        "scope_insufficient",
        "tenant_not_allowed",
        "revoked",
        "replayed",
    } <= reasons
    cli = subprocess.run(
        [
            AXID_BIN,
            "audit",
            "verify",
            "--trust-log-key",
            "--db",
            env.log_url,
            "--log",
            env.log_name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    issuer_report = verify_log(DatabaseSource(f"sqlite:///{env.tmp}/issuer.db", "issuer"))
    assert issuer_report.ok, issuer_report.first_bad


def test_spiffe_id_helper_sanity(env: Env) -> None:
    assert SpiffeId.parse(env.pki.spiffe_id("planner2")) == env.pki.dev.spiffe_id("planner")
