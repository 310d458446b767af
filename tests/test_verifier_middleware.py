"""AxidVerifier in-process: every reason code, the log entry of every decision, the
answer's shape, caches, lifespan, custom checks, metrics and tracing.

Requests are ASGI scopes shaped exactly like mtls.uvicorn's (the TLS extension's
PEM chain); the decision log, the single-use store and the revocation table are
real SQLite files. The end-to-end suite (test_verifier_e2e.py) repeats the
important cases over real mTLS sockets with the real issuer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from _verifier_helpers import (
    ISSUER,
    Answer,
    FakeClock,
    Pki,
    call,
    http_scope,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI, Request

from axid.audit.draft import DecisionDraft
from axid.audit.verify import DatabaseSource, verify_log
from axid.keys import KeySet, SigningKey
from verifier import observability
from verifier.budget import BudgetLedger
from verifier.checks import CheckResult, RequestInfo
from verifier.config import IdentityConfig, LogConfig, VerifierConfig
from verifier.decision import REASONS, STATUS, Decision, VerifiedAction
from verifier.jwks import FileJwks, HttpJwks
from verifier.middleware import AxidVerifier
from verifier.observability import VerifierMetrics, annotate_span
from verifier.revocation import DatabaseRevocationSource, StaticRevocations
from verifier.rules import RouteRule

NOW = 1_800_000_000.0
RULES = [
    RouteRule("/healthz", governed=False),
    RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
    RouteRule("/payments/*/refund", methods=["POST"], scope="payments:refund", single_use=True),
    RouteRule("/payments/*", methods=["DELETE"], scope="payments:delete", agents=["planner"]),
    RouteRule("/budget/*", scope="payments:read", name="budgeted", cost=15),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("mw"))


@dataclass
class Calls:
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        action: VerifiedAction | None = scope.get("state", {}).get("axid")
        self.seen.append({"path": scope["path"], "action": action})
        body = json.dumps({"agent": action.agent if action else None}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


@dataclass
class World:
    pki: Pki
    key: SigningKey
    clock: FakeClock
    revocations: StaticRevocations
    config: VerifierConfig
    verifier: AxidVerifier
    calls: Calls
    url: str
    db: Path

    def token(self, name: str = "planner", **kw: Any) -> str:
        kw.setdefault("scope", "payments:read payments:refund payments:delete")
        return token_for(self.pki, name, self.key, now=self.clock(), **kw)

    async def get(
        self, path: str, *, who: str | None = "planner", token: str | None = None, **kw: Any
    ) -> Answer:
        chain = self.pki.chain_pem(who) if who else []
        return await call(self.verifier, http_scope(path, chain=chain, token=token, **kw))

    def entries(self) -> list[dict[str, Any]]:
        return log_entries(self.url, self.config.log_name)

    def last(self) -> dict[str, Any]:
        return self.entries()[-1]


def make_world(pki: Pki, tmp_path: Path, **overrides: Any) -> World:
    key = new_signing_key()
    clock = FakeClock(NOW)
    revocations = StaticRevocations()
    db = tmp_path / "axid.db"
    url = f"sqlite:///{db}"
    kwargs: dict[str, Any] = {
        "service": "payments",
        "issuer": ISSUER,
        "tenants": ["acme"],
        "identity": IdentityConfig(bundle=pki.dev.bundle),
        "jwks": key_set(key),
        "revocations": revocations,
        "log": LogConfig(url=url, key=tmp_path / "log.pem", max_delay=0, lock_timeout=0.3),
        "rules": RULES,
        "trusted_proxies": ["spiffe://example.org/proxy/*", "127.0.0.1/32"],
        "clock": clock,
    }
    kwargs.update(overrides)
    config = VerifierConfig(**kwargs)
    calls = Calls()
    verifier = AxidVerifier(calls.app, config)
    return World(pki, key, clock, revocations, config, verifier, calls, url, db)


@pytest.fixture
async def world(pki: Pki, tmp_path: Path) -> AsyncIterator[World]:
    w = make_world(pki, tmp_path)
    await w.verifier.startup()
    yield w
    await w.verifier.shutdown()
    report = verify_log(DatabaseSource(w.url, w.config.log_name))
    assert report.ok, report.first_bad


def assert_denied(answer: Answer, reason: str) -> None:
    assert answer.status == STATUS[reason], (answer.status, answer.body)
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"] == f'AXID error="{reason}"'
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json
    assert body["reason"] == reason and body["status"] == answer.status
    assert set(body) == {"type", "title", "status", "detail", "reason"}


# --------------------------------------------------------------------------- allow


async def test_allowed_request(world: World) -> None:
    token = world.token(run="run-a")
    answer = await world.get("/payments/p1", token=token)
    assert answer.status == 200 and answer.json == {"agent": "planner"}
    action = world.calls.seen[-1]["action"]
    assert isinstance(action, VerifiedAction)
    assert action.spiffe_id == world.pki.spiffe_id("planner")
    assert (action.tenant, action.agent, action.run) == ("acme", "planner", "run-a")
    assert action.spawn_parent is None and action.chain == ()
    assert "payments:read" in action.scope
    entry = world.last()
    assert action.log_seq == entry["seq"]
    assert entry["decision"] == "allow" and entry["reason"] == "ok"
    assert entry["jti"] == action.jti and entry["run"] == "run-a"
    assert entry["peer"] == action.spiffe_id and entry["peer_cert"] == world.pki.cnf("planner")
    assert entry["kid"] == world.key.kid and entry["iss"] == ISSUER
    assert entry["method"] == "GET" and entry["path"] == "/payments/p1"
    assert entry["service"] == "payments"
    assert entry["rule"] == "GET /payments/*" and entry["scope_required"] == "payments:read"
    assert token not in json.dumps(world.entries())


async def test_child_run_chain_is_recorded(world: World) -> None:
    token = world.token("worker", run="child", chain=["root", "mid"], scope="payments:read")
    answer = await world.get("/payments/p1", who="worker", token=token)
    assert answer.status == 200
    action = world.calls.seen[-1]["action"]
    assert action.chain == ("root", "mid") and action.spawn_parent == "mid"
    assert action.root_run == "root"
    entry = world.last()
    assert entry["chain"] == ["root", "mid"] and entry["spawn_parent"] == "mid"


# --------------------------------------------------------------------------- denials


async def test_identity_denials(world: World, pki: Pki) -> None:
    token = world.token()
    assert_denied(await world.get("/payments/1", who=None, token=token), "no_peer_cert")
    assert world.last()["reason"] == "no_peer_cert" and world.last()["peer"] is None
    other = [pki.other.cert("planner").read_text()]
    answer = await call(world.verifier, http_scope("/payments/1", chain=other, token=token))
    assert_denied(answer, "peer_untrusted")
    entry = world.last()
    assert entry["decision"] == "deny" and entry["peer"] is None
    assert entry["peer_cert"] is not None and "other.org" in (entry["note"] or "")
    # Plain HTTP without the TLS extension and not from a trusted proxy.
    answer = await call(
        world.verifier, http_scope("/payments/1", tls=False, token=token, client=("10.9.9.9", 1))
    )
    assert_denied(answer, "no_peer_cert")
    # https without the TLS extension: the certificate is unknown, so there is none.
    scope = http_scope("/payments/1", token=token)
    del scope["extensions"]
    assert_denied(await call(world.verifier, scope), "no_peer_cert")
    assert world.calls.seen == []


async def test_token_denials(world: World) -> None:
    assert_denied(await world.get("/payments/1"), "token_missing")
    assert_denied(await world.get("/payments/1", token="not.a.token!"), "token_malformed")
    assert_denied(await world.get("/payments/1", token="a" * 9000), "token_too_large")
    stranger = new_signing_key()
    foreign = token_for(world.pki, "planner", stranger, now=world.clock())
    assert_denied(await world.get("/payments/1", token=foreign), "token_unknown_kid")
    wrong_aud = world.token(aud="billing")
    assert_denied(await world.get("/payments/1", token=wrong_aud), "token_wrong_audience")
    entry = world.last()
    # Signed by our issuer but refused: its claims are authentic and recorded.
    assert entry["reason"] == "token_wrong_audience" and entry["jti"] and entry["run"]
    wrong_iss = world.token(iss="https://evil.example.org")
    assert_denied(await world.get("/payments/1", token=wrong_iss), "token_wrong_issuer")
    # Two token headers are ambiguous.
    t = world.token()
    answer = await world.get("/payments/1", token=t, headers=[("X-Waxell-AXID", t)])
    assert_denied(answer, "token_malformed")
    assert world.calls.seen == []


async def test_expiry_with_fake_clock_and_token_cache(world: World) -> None:
    token = world.token(ttl=60)
    assert (await world.get("/payments/1", token=token)).status == 200
    assert (await world.get("/payments/2", token=token)).status == 200
    pipeline = world.verifier.pipeline
    assert pipeline is not None and pipeline.token_cache.hits == 1
    world.clock.advance(64)  # within leeway (5 s) of exp
    assert (await world.get("/payments/3", token=token)).status == 200
    world.clock.advance(2)  # now >= exp + leeway: the cached token is re-checked for time
    assert_denied(await world.get("/payments/4", token=token), "token_expired")
    assert world.last()["jti"] is not None
    future = token_for(world.pki, "planner", world.key, now=world.clock() + 100)
    assert_denied(await world.get("/payments/5", token=future), "token_not_yet_valid")


async def test_binding_denials(world: World) -> None:
    stolen = world.token("planner")
    # The worker presents the planner's token with its own valid SVID.
    assert_denied(await world.get("/payments/1", who="worker", token=stolen), "subject_mismatch")
    entry = world.last()
    assert entry["peer"] == world.pki.spiffe_id("worker") and entry["agent"] == "planner"
    # Another certificate of the planner's own SPIFFE ID: not the one the token is bound to.
    answer = await world.get("/payments/1", who="planner2", token=stolen)
    assert_denied(answer, "cert_binding_mismatch")
    assert world.last()["peer_cert"] == world.pki.cnf("planner2")


async def test_authorization_denials(world: World) -> None:
    globex = world.token("globex", tenant="globex", agent="globex")
    assert_denied(await world.get("/payments/1", who="globex", token=globex), "tenant_not_allowed")
    narrow = world.token("worker", scope="payments:read")
    answer = await world.get("/payments/1", who="worker", token=narrow, method="DELETE")
    assert_denied(answer, "agent_not_allowed")
    answer = await world.get(
        "/payments/1", token=world.token(scope="payments:read"), method="DELETE"
    )
    assert_denied(answer, "scope_insufficient")
    assert world.last()["note"] == "missing payments:delete"
    assert world.last()["scope_required"] == "payments:delete"
    # No rule covers the route: nothing is authorized by omission.
    assert_denied(await world.get("/nowhere", token=world.token()), "scope_insufficient")
    assert world.last()["rule"] is None
    assert world.calls.seen == []


async def test_revocations(world: World) -> None:
    for kind, value, kw in [
        ("run", "r-1", {"run": "r-1"}),
        ("run", "root-2", {"run": "leaf-2", "chain": ["root-2", "mid-2"]}),
        ("agent", "worker", {}),
        ("tenant", "acme", {}),
    ]:
        name = "worker" if kind == "agent" else "planner"
        token = world.token(name, **kw)
        world.revocations.revoke(kind, value)
        assert_denied(await world.get("/payments/1", who=name, token=token), "revoked")
        assert value in world.last()["note"]
    jti_token = world.token("planner")
    first = await world.get("/payments/1", token=jti_token)
    assert first.status == 403  # tenant acme is revoked now


async def test_jti_revocation(world: World) -> None:
    token = world.token()
    assert (await world.get("/payments/1", token=token)).status == 200
    world.revocations.revoke("jti", world.last()["jti"])
    assert_denied(await world.get("/payments/1", token=token), "revoked")


async def test_single_use(world: World) -> None:
    token = world.token()
    assert (await world.get("/payments/1/refund", token=token, method="POST")).status == 200
    assert_denied(await world.get("/payments/1/refund", token=token, method="POST"), "replayed")
    # Reuse on a route that is not single use is fine.
    assert (await world.get("/payments/1", token=token)).status == 200
    assert [e["reason"] for e in world.entries()] == ["ok", "replayed", "ok"]


async def test_ungoverned_route_is_not_checked_or_logged(world: World) -> None:
    answer = await world.get("/healthz", who=None)
    assert answer.status == 200 and world.calls.seen[-1]["action"] is None
    assert world.entries() == []


async def test_xfcc_paths(world: World, pki: Pki) -> None:
    leaf = pki.leaf("planner")
    der = leaf.public_bytes(Encoding.DER)
    xfcc = (
        f"Hash={hashlib.sha256(der).hexdigest()};"
        f"Cert={urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe='')};"
        f"URI={pki.spiffe_id('planner')}"
    )
    token = world.token("planner")
    # A trusted proxy over mTLS.
    answer = await world.get("/payments/1", who="envoy", token=token, headers=[("XFCC", "")])
    assert_denied(answer, "subject_mismatch")  # no XFCC header at all: the proxy is the peer
    answer = await world.get(
        "/payments/1", who="envoy", token=token, headers=[("X-Forwarded-Client-Cert", xfcc)]
    )
    assert answer.status == 200
    assert "via trusted proxy spiffe://example.org/proxy/envoy" in world.last()["note"]
    # A plain-TCP sidecar on a trusted address.
    scope = http_scope(
        "/payments/1", tls=False, token=token, headers=[("X-Forwarded-Client-Cert", xfcc)]
    )
    assert (await call(world.verifier, scope)).status == 200
    # An untrusted peer's XFCC is ignored, and that is recorded.
    answer = await world.get(
        "/payments/1", who="worker", token=token, headers=[("X-Forwarded-Client-Cert", xfcc)]
    )
    assert_denied(answer, "subject_mismatch")
    assert "ignored" in world.last()["note"]


async def test_audit_unavailable_when_the_log_is_locked(world: World) -> None:
    token = world.token()
    assert (await world.get("/payments/1", token=token)).status == 200
    blocker = sqlite3.connect(world.db, timeout=5, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock past the log's lock_timeout
        before = len(world.calls.seen)
        answer = await world.get("/payments/2", token=token)
        assert_denied(answer, "audit_unavailable")
        assert len(world.calls.seen) == before  # the app never ran
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await world.get("/payments/3", token=token)).status == 200
    assert [e["path"] for e in world.entries()] == ["/payments/1", "/payments/3"]
    assert world.verifier.metrics.count("deny", "audit_unavailable") == 1


# --------------------------------------------------------------------------- sources


async def test_revocation_unavailable_fails_closed(pki: Pki, tmp_path: Path) -> None:
    stale = DatabaseRevocationSource(f"sqlite:///{tmp_path}/none.db", interval=30, max_stale=60)
    w = make_world(pki, tmp_path, revocations=stale)
    await w.verifier.startup()
    try:
        assert_denied(await w.get("/payments/1", token=w.token()), "revocation_unavailable")
        assert w.last()["reason"] == "revocation_unavailable"
    finally:
        await w.verifier.shutdown()


async def test_jwks_unavailable_and_unknown_kid_refetch(pki: Pki, tmp_path: Path) -> None:
    key = new_signing_key()
    served: list[KeySet | None] = [None]
    fetches: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(1)
        keys = served[0]
        if keys is None:
            return httpx.Response(503)
        return httpx.Response(200, content=json.dumps(keys.to_jwks()).encode())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    jwks = HttpJwks("https://i/jwks", client, refetch_min_interval=0.0, cache_ttl=300)
    w = make_world(pki, tmp_path, jwks=jwks)
    await w.verifier.startup()
    try:
        token = token_for(pki, "planner", key, now=w.clock())
        assert_denied(await w.get("/payments/1", token=token), "jwks_unavailable")
        served[0] = KeySet.of(key.public_key)
        await jwks.refresh()
        assert (await w.get("/payments/1", token=token)).status == 200
        # Rotation: a new kid appears; the unknown kid triggers one refetch.
        new = new_signing_key()
        served[0] = KeySet.of(key.public_key, new.public_key)
        count = len(fetches)
        fresh = token_for(pki, "planner", new, now=w.clock())
        assert (await w.get("/payments/2", token=fresh)).status == 200
        assert len(fetches) == count + 1
        assert (await w.get("/payments/3", token=token)).status == 200  # old kid still fine
    finally:
        await w.verifier.shutdown()
        await client.aclose()


async def test_unknown_kid_refetch_is_rate_limited(pki: Pki, tmp_path: Path) -> None:
    key = new_signing_key()
    fetches: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(1)
        return httpx.Response(200, content=json.dumps(KeySet.of(key.public_key).to_jwks()).encode())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    mono = FakeClock(100.0)
    jwks = HttpJwks("https://i/jwks", client, refetch_min_interval=60.0, monotonic=mono)
    w = make_world(pki, tmp_path, jwks=jwks)
    await w.verifier.startup()
    try:
        assert len(fetches) == 1  # the first fetch, at startup
        for _ in range(3):  # random kids within a minute of it: no refetch at all
            junk = token_for(pki, "planner", new_signing_key(), now=w.clock())
            assert_denied(await w.get("/payments/1", token=junk), "token_unknown_kid")
        assert len(fetches) == 1
        mono.advance(61)
        for _ in range(5):  # then one refetch, and none for the next minute
            junk = token_for(pki, "planner", new_signing_key(), now=w.clock())
            assert_denied(await w.get("/payments/1", token=junk), "token_unknown_kid")
        assert len(fetches) == 2
    finally:
        await w.verifier.shutdown()
        await client.aclose()


async def test_cached_token_invalidated_when_its_kid_leaves(pki: Pki, tmp_path: Path) -> None:
    old, new = new_signing_key(), new_signing_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KeySet.of(old.public_key, new.public_key).to_jwks()))
    jwks = FileJwks(path, check_interval=0, refetch_min_interval=0)
    w = make_world(pki, tmp_path, jwks=jwks)
    await w.verifier.startup()
    try:
        token = token_for(pki, "planner", old, now=w.clock())
        assert (await w.get("/payments/1", token=token)).status == 200
        assert (await w.get("/payments/1", token=token)).status == 200
        path.write_text(json.dumps(KeySet.of(new.public_key).to_jwks()) + " ")
        assert_denied(await w.get("/payments/1", token=token), "token_unknown_kid")
    finally:
        await w.verifier.shutdown()


# --------------------------------------------------------------------------- custom checks


async def test_budget_ledger(pki: Pki, tmp_path: Path) -> None:
    # The shared ledger itself (SQLite and PostgreSQL, two replicas): test_budget.py.
    ledger = BudgetLedger(f"sqlite:///{tmp_path}/budget.db", per_tree=30)
    w = make_world(pki, tmp_path, checks=[ledger])
    await w.verifier.startup()
    try:
        root = w.token(run="tree-root", scope="payments:read")
        child = w.token("worker", run="tree-child", chain=["tree-root"], scope="payments:read")
        assert (await w.get("/budget/1", token=root)).status == 200
        assert "budget: tree tree-root: 15/30" in w.last()["note"]
        assert (await w.get("/budget/2", who="worker", token=child)).status == 200
        answer = await w.get("/budget/3", token=root)
        assert_denied(answer, "budget_exceeded")
        entry = w.last()
        assert entry["rule"] == "budgeted"
        assert entry["note"] == "budget: tree tree-root: 30/30, cost 15"
        assert (await w.get("/payments/1", token=root)).status == 200  # cost 0: not counted
        other = w.token(run="another-root", scope="payments:read")
        assert (await w.get("/budget/4", token=other)).status == 200
    finally:
        await w.verifier.shutdown()
        ledger.close()


async def test_failing_checks_deny(pki: Pki, tmp_path: Path) -> None:
    seen: list[RequestInfo] = []

    async def inspect(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        seen.append(request)
        return CheckResult(True, "looked")

    async def broken(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        raise RuntimeError("boom")

    async def sloppy(action: VerifiedAction, request: RequestInfo) -> Any:
        return True

    async def slow(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        await asyncio.sleep(10)
        return CheckResult(True)

    for check, note in [
        (broken, "broken: failed (RuntimeError)"),
        (sloppy, "sloppy: returned no CheckResult"),
        (slow, "slow: failed (TimeoutError)"),
    ]:
        w = make_world(pki, tmp_path, checks=[inspect, check], check_timeout=0.2)
        await w.verifier.startup()
        try:
            token = w.token()
            answer = await w.get("/payments/1", token=token, headers=[("X-Cost", "7")])
            assert_denied(answer, "custom_check_denied")
            assert w.last()["note"] == f"inspect: looked; {note}"
        finally:
            await w.verifier.shutdown()
    assert seen[0].header("x-cost") == "7"
    assert seen[0].header("x-waxell-axid") is None  # checks never see the token


# --------------------------------------------------------------------------- lifespan


async def test_lifespan_runs_ours_then_the_apps(pki: Pki, tmp_path: Path) -> None:
    events: list[str] = []
    holder: dict[str, AxidVerifier] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"app startup, verifier started={holder['v'].started}")
        yield
        events.append("app shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        return {"pid": pid, "run": request.state.axid.run}

    w = make_world(pki, tmp_path)
    metrics = VerifierMetrics()
    app.add_middleware(AxidVerifier, config=w.config, metrics=metrics)
    app.mount("/metrics", metrics.metrics_app)
    built = app.build_middleware_stack()  # as Starlette does on its first call
    app.middleware_stack = built

    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []
    gate = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if len(messages) == 1:
            await gate.wait()
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    # Find our instance inside Starlette's stack to observe it.
    layer: Any = built
    while not isinstance(layer, AxidVerifier):
        layer = layer.app
    holder["v"] = layer
    task = asyncio.create_task(app({"type": "lifespan", "state": {}}, receive, send))
    while "lifespan.startup.complete" not in sent:
        await asyncio.sleep(0.01)
    assert events == ["app startup, verifier started=True"]

    token = w.token(run="via-fastapi")
    answer = await call(app, http_scope("/payments/9", chain=pki.chain_pem("planner"), token=token))
    assert answer.status == 200 and answer.json == {"pid": "9", "run": "via-fastapi"}
    answer = await call(app, http_scope("/payments/9", chain=pki.chain_pem("planner")))
    assert_denied(answer, "token_missing")

    gate.set()
    await task
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events[-1] == "app shutdown" and not layer.started
    assert metrics.count("allow", "ok") == 1 and metrics.count("deny", "token_missing") == 1


async def test_lazy_start_without_lifespan(pki: Pki, tmp_path: Path) -> None:
    w = make_world(pki, tmp_path)
    assert not w.verifier.started
    token = w.token()
    answers = await asyncio.gather(*(w.get(f"/payments/{i}", token=token) for i in range(8)))
    assert [a.status for a in answers] == [200] * 8
    assert w.verifier.started and len(w.entries()) == 8
    await w.verifier.shutdown()


async def test_lazy_start_failure_is_audit_unavailable(pki: Pki, tmp_path: Path) -> None:
    bad = LogConfig(url=f"sqlite:///{tmp_path}/x.db", key=tmp_path / "nokey.pem", create_key=False)
    w = make_world(pki, tmp_path, log=bad)
    answer = await w.get("/payments/1", token=w.token())
    assert_denied(answer, "audit_unavailable")
    assert not w.verifier.started and w.calls.seen == []


async def test_websocket_is_governed(world: World) -> None:
    sent: list[dict[str, Any]] = []
    scope = http_scope("/payments/ws", chain=world.pki.chain_pem("planner"))
    scope["type"] = "websocket"
    scope.pop("method")

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await world.verifier(scope, receive, send)
    # A governed path is HTTP only: refused as such (a close without the
    # websocket.http.response extension), recorded.
    sent_close = {"type": "websocket.close", "code": 1008, "reason": "unsupported_protocol"}
    assert sent == [sent_close]
    assert world.last()["reason"] == "unsupported_protocol"


# --------------------------------------------------------------------------- observability


async def test_metrics_app(world: World) -> None:
    await world.get("/payments/1", token=world.token())
    await world.get("/payments/1")
    answer = await call(world.verifier.metrics_app, http_scope("/", tls=False))
    assert answer.status == 200
    text = answer.body.decode()
    assert 'axid_verifier_decisions_total{decision="allow",reason="ok"} 1.0' in text
    assert 'axid_verifier_decisions_total{decision="deny",reason="token_missing"} 1.0' in text
    assert "axid_verifier_decision_seconds_count 2.0" in text
    post = await call(world.verifier.metrics_app, http_scope("/", tls=False, method="POST"))
    assert post.status == 405


class _FakeSpan:
    def __init__(self, recording: bool = True) -> None:
        self.attributes: dict[str, Any] = {}
        self.recording = recording

    def is_recording(self) -> bool:
        return self.recording

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value


def test_annotate_span_with_a_fake_span() -> None:
    draft = DecisionDraft("GET", "/payments/1", "payments")
    draft.tenant, draft.agent, draft.run = "acme", "planner", "r1"
    deny = Decision.of(draft, "revoked", "the action is revoked")
    assert deny.record is not None and deny.record.decision == "deny"
    span = _FakeSpan()
    assert annotate_span(deny, span)
    assert span.attributes == {
        "axid.decision": "deny",
        "axid.reason": "revoked",
        "axid.tenant": "acme",
        "axid.agent": "planner",
        "axid.run": "r1",
    }
    no_token = Decision(False, "token_missing")
    span = _FakeSpan()
    annotate_span(no_token, span)
    assert span.attributes == {"axid.decision": "deny", "axid.reason": "token_missing"}
    assert not annotate_span(no_token, _FakeSpan(recording=False))


async def test_current_otel_span_is_annotated(world: World) -> None:
    # opentelemetry-api is a dev dependency, so this path always runs in the suite.
    trace = observability.otel_trace()
    assert trace is not None, "opentelemetry-api (a dev dependency) is not importable"

    class RecordingSpan(trace.NonRecordingSpan):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__(trace.INVALID_SPAN_CONTEXT)
            self.attributes: dict[str, Any] = {}

        def is_recording(self) -> bool:
            return True

        def set_attribute(self, key: str, value: Any) -> None:
            self.attributes[key] = value

    span = RecordingSpan()
    with trace.use_span(span):
        await world.get("/payments/1", token=world.token(run="traced"))
    assert span.attributes["axid.decision"] == "allow"
    assert span.attributes["axid.run"] == "traced"


def test_otel_import_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now raises ImportError
    assert observability._import_trace() is None
    monkeypatch.setattr(observability, "_TRACE", None)
    assert not annotate_span(Decision(False, "token_missing"))


async def test_decision_log_lines_never_hold_tokens(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    token = world.token()
    with caplog.at_level("DEBUG", logger="verifier"):
        await world.get("/payments/1", token=token)
        await world.get("/payments/1", who="worker", token=token)
    lines = [r for r in caplog.records if r.name == "verifier.decisions"]
    assert [r.axid["reason"] for r in lines] == ["ok", "subject_mismatch"]  # type: ignore[attr-defined]
    assert all(token not in r.getMessage() for r in caplog.records)


def test_reason_table() -> None:
    assert STATUS["ok"] == 200
    assert {r for r, s in STATUS.items() if s == 503} == {
        "audit_unavailable",
        "revocation_unavailable",
        "jwks_unavailable",
        "approval_unavailable",
    }
    for reason in ("subject_mismatch", "cert_binding_mismatch", "no_peer_cert", "token_expired"):
        assert STATUS[reason] == 401
    for reason in ("revoked", "replayed", "scope_insufficient", "custom_check_denied"):
        assert STATUS[reason] == 403
    design = {
        "ok", "no_peer_cert", "peer_untrusted", "peer_not_svid", "token_missing",
        "token_malformed", "token_too_large", "token_bad_alg", "token_bad_type",
        "token_unknown_kid", "token_bad_signature", "token_expired", "token_not_yet_valid",
        "token_ttl_too_long", "token_wrong_issuer", "token_wrong_audience",
        "token_missing_claim", "subject_mismatch", "cert_binding_mismatch",
        "tenant_not_allowed", "agent_not_allowed", "scope_insufficient", "revoked",
        "replayed", "custom_check_denied", "audit_unavailable", "unsupported_protocol",
        "budget_exceeded", "approval_required", "approval_invalid", "approval_expired",
        "approval_unavailable",
    }  # fmt: skip
    assert design | {"revocation_unavailable", "jwks_unavailable"} == REASONS
    with pytest.raises(ValueError):
        Decision(True, "revoked")


# --------------------------------------------------------------------------- other sources


async def test_workload_api_identity_file_jwks_and_database_revocations(
    pki: Pki, tmp_path: Path
) -> None:
    """The YAML-level sources: identity from the (dev) Workload API over real gRPC,
    keys from a JWKS file, revocations read from the issuer's table."""
    from axid.issuer.store import IssuerStore
    from mtls.workloadapi import DevWorkloadApiServer
    from mtls.x509bundle import BundleSet
    from verifier.config import JwksConfig, RevocationConfig

    key = new_signing_key()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(KeySet.of(key.public_key).to_jwks()))
    issuer_db = f"sqlite:///{tmp_path}/issuer.db"
    store = IssuerStore.open(issuer_db)
    svid = pki.dev.ca.issue_svid(pki.spiffe_id("payments"))
    bundle = BundleSet.from_file(pki.dev.bundle)
    try:
        with DevWorkloadApiServer(tmp_path / "w.sock", svid, bundle) as api:
            w = make_world(
                pki,
                tmp_path,
                identity=IdentityConfig(workload_api=api.endpoint),
                jwks=JwksConfig(file=jwks_file),
                revocations=RevocationConfig(database_url=issuer_db, interval=0.05, max_stale=5),
            )
            await w.verifier.startup()
            try:
                token = token_for(pki, "planner", key, now=w.clock(), run="db-revoked")
                assert (await w.get("/payments/1", token=token)).status == 200
                revocation, _ = store.revoke(
                    "run",
                    "db-revoked",
                    "test",
                    created_by="spiffe://example.org/admin/ops",
                    now_ms=1,
                )
                source = w.verifier.revocations
                assert source is not None
                for _ in range(200):
                    if source.seq >= revocation.seq:
                        break
                    await asyncio.sleep(0.02)
                assert_denied(await w.get("/payments/1", token=token), "revoked")
                assert w.last()["note"] == "run db-revoked is revoked"
            finally:
                await w.verifier.shutdown()
    finally:
        store.close()


# --------------------------------------------------------------------------- review fixes


def _planner_xfcc(pki: Pki) -> str:
    leaf = pki.leaf("planner")
    der = leaf.public_bytes(Encoding.DER)
    return (
        f"Hash={hashlib.sha256(der).hexdigest()};"
        f"Cert={urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe='')};"
        f"URI={pki.spiffe_id('planner')}"
    )


async def test_ip_proxies_only_from_the_transport_extension(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """scope["client"] and scope["scheme"] are what X-Forwarded-For/-Proto make them:
    only mtls.uvicorn's axid.transport extension names a trusted sidecar."""
    w = make_world(pki, tmp_path)  # trusts 127.0.0.1/32
    with caplog.at_level("WARNING", logger="verifier"):
        await w.verifier.startup()
    assert any("trusted_proxies names IP networks" in r.getMessage() for r in caplog.records)
    try:
        token = w.token("planner")
        xfcc = [("X-Forwarded-Client-Cert", _planner_xfcc(pki))]
        # Another server (no extension): the IP network is never matched, fail closed.
        scope = http_scope("/payments/1", tls=False, token=token, headers=xfcc, transport=False)
        with caplog.at_level("WARNING", logger="verifier"):
            assert_denied(await call(w.verifier, scope), "no_peer_cert")
        assert "ignored" in w.last()["note"]
        assert any("no axid.transport scope extension" in r.getMessage() for r in caplog.records)
        # The socket peer says 127.0.0.1: honoured, whatever the scheme claims.
        scope = http_scope("/payments/1", tls=False, token=token, headers=xfcc)
        scope["scheme"] = "https"  # X-Forwarded-Proto: https
        assert (await call(w.verifier, scope)).status == 200
        # scope["client"] rewritten to a trusted address, the socket peer is not trusted.
        scope = http_scope(
            "/payments/1", tls=False, token=token, headers=xfcc, client=("10.0.0.7", 1)
        )
        scope["client"] = ("127.0.0.1", 1)
        assert_denied(await call(w.verifier, scope), "no_peer_cert")
        # A TLS extension on a connection the socket says is plain: believe neither.
        scope = http_scope("/payments/1", chain=pki.chain_pem("planner"), token=token)
        scope["extensions"]["axid.transport"]["tls"] = False
        assert_denied(await call(w.verifier, scope), "no_peer_cert")
    finally:
        await w.verifier.shutdown()


async def test_several_xfcc_lines_from_a_trusted_proxy_are_refused(world: World) -> None:
    xfcc = ("X-Forwarded-Client-Cert", _planner_xfcc(world.pki))
    token = world.token("planner")
    answer = await world.get("/payments/1", who="envoy", token=token, headers=[xfcc, xfcc])
    assert_denied(answer, "peer_not_svid")
    entry = world.last()
    assert entry["reason"] == "peer_not_svid" and "2 header lines" in entry["note"]
    # From a peer that is not a proxy they are ignored, as one line would be.
    answer = await world.get("/payments/1", who="worker", token=token, headers=[xfcc, xfcc])
    assert_denied(answer, "subject_mismatch")
    assert "ignored" in world.last()["note"]
    assert world.calls.seen == []


@pytest.mark.parametrize("method", ["A" * 9000, "GE T", "GET\u00e9", ""])
async def test_bad_methods_are_denied_and_recorded(world: World, method: str) -> None:
    answer = await world.get("/payments/1", token=world.token(), method=method)
    assert_denied(answer, "scope_insufficient")
    entry = world.last()
    assert entry["method"] == (method if len(method) <= 32 else "A" * 32 + "...")
    assert entry["rule"] is None and "method is not an HTTP method token" in entry["note"]
    assert world.calls.seen == []


@pytest.mark.parametrize(
    ("path", "raw", "why"),
    [
        ("/public/../payments/p-1", None, "'.' or '..' segment"),
        ("/payments/./p-1", None, "'.' or '..' segment"),
        ("/payments/p-1/..", None, "'.' or '..' segment"),
        ("/public//payments", None, "empty segment"),
        ("/payments/p-1", b"/payments/p%2D1%2e", "percent-encoded"),
        ("/public/a/b", b"/public/a%2Fb", "percent-encoded"),
        ("payments/p-1", None, "does not start with '/'"),
    ],
)
async def test_paths_not_in_normal_form_match_no_rule(
    pki: Pki, tmp_path: Path, path: str, raw: bytes | None, why: str
) -> None:
    w = make_world(pki, tmp_path, rules=[RouteRule("/public/**", governed=False), *RULES])
    await w.verifier.startup()
    try:

        def scope(**kw: Any) -> dict[str, Any]:
            built = http_scope(path, **kw)
            if raw is not None:
                built["raw_path"] = raw
            return built

        answer = await call(w.verifier, scope(chain=pki.chain_pem("planner"), token=w.token()))
        assert_denied(answer, "scope_insufficient")
        entry = w.last()
        assert entry["path"] == path and entry["rule"] is None and why in entry["note"]
        # Without credentials the first failing step answers; still recorded.
        assert_denied(await call(w.verifier, scope(tls=False)), "no_peer_cert")
        assert why in w.last()["note"]
        assert w.calls.seen == []
        # The root and a trailing slash are normal form.
        assert (await w.get("/public/", who=None)).status == 200
        assert_denied(await w.get("/", token=w.token()), "scope_insufficient")
        assert w.last()["note"] is None  # just no rule for "/"
    finally:
        await w.verifier.shutdown()


class _BrokenRevocations(StaticRevocations):
    """A revocation source given in code that fails (as a buggy embedder's might)."""

    def current(self) -> Any:
        raise RuntimeError("broken source")


async def test_a_failure_while_deciding_is_a_recorded_deny(pki: Pki, tmp_path: Path) -> None:
    w = make_world(pki, tmp_path, revocations=_BrokenRevocations())
    await w.verifier.startup()
    try:
        answer = await w.get("/payments/1", token=w.token(run="r-broken"))
        assert_denied(answer, "audit_unavailable")
        entry = w.last()
        assert entry["decision"] == "deny" and entry["reason"] == "audit_unavailable"
        assert entry["note"] == "internal error: RuntimeError"
        assert entry["rule"] == "GET /payments/*" and entry["run"] is None
        assert w.calls.seen == []
    finally:
        await w.verifier.shutdown()


async def test_cancelled_request_is_neither_recorded_nor_allowed(pki: Pki, tmp_path: Path) -> None:
    entered, never = asyncio.Event(), asyncio.Event()

    async def waits(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        entered.set()
        await never.wait()
        return CheckResult(True)

    w = make_world(pki, tmp_path, checks=[waits], check_timeout=30)
    await w.verifier.startup()
    try:
        task = asyncio.create_task(w.get("/payments/1", token=w.token()))
        await entered.wait()
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert w.entries() == [] and w.calls.seen == []
    finally:
        await w.verifier.shutdown()


async def test_a_stray_cancelled_error_from_a_check_denies(pki: Pki, tmp_path: Path) -> None:
    async def stray(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        raise asyncio.CancelledError  # the request task itself is not being cancelled

    w = make_world(pki, tmp_path, checks=[stray])
    await w.verifier.startup()
    try:
        assert_denied(await w.get("/payments/1", token=w.token()), "custom_check_denied")
        assert w.last()["note"] == "stray: failed (CancelledError)"
    finally:
        await w.verifier.shutdown()


class _Switchable(StaticRevocations):
    """Static revocations that can be made stale (as a poller past max_stale is)."""

    fresh = True

    def current(self) -> Any:
        return super().current() if self.fresh else None


async def test_single_use_is_claimed_only_by_an_allow(pki: Pki, tmp_path: Path) -> None:
    revocations = _Switchable()
    verdicts = [CheckResult(False, "not yet"), CheckResult(True)]

    async def once_no(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        return verdicts.pop(0) if verdicts else CheckResult(True)

    w = make_world(pki, tmp_path, revocations=revocations, checks=[once_no])
    await w.verifier.startup()
    try:
        token = w.token()
        refund = {"token": token, "method": "POST"}
        revocations.fresh = False
        assert_denied(await w.get("/payments/1/refund", **refund), "revocation_unavailable")
        revocations.fresh = True
        assert_denied(await w.get("/payments/1/refund", **refund), "custom_check_denied")
        assert (await w.get("/payments/1/refund", **refund)).status == 200
        assert_denied(await w.get("/payments/1/refund", **refund), "replayed")
        assert w.last()["note"] == "first used by service payments"
        # DESIGN's order: a used token is "replayed" (step 5) before "revoked" (step 6).
        revocations.revoke("jti", w.last()["jti"])
        assert_denied(await w.get("/payments/1/refund", **refund), "replayed")
        assert [e["reason"] for e in w.entries()] == [
            "revocation_unavailable",
            "custom_check_denied",
            "ok",
            "replayed",
            "replayed",
        ]
    finally:
        await w.verifier.shutdown()


async def test_single_use_race_has_one_winner(world: World) -> None:
    token = world.token()
    answers = await asyncio.gather(
        *(world.get("/payments/1/refund", token=token, method="POST") for _ in range(6))
    )
    assert sorted(a.status for a in answers) == [200] + [403] * 5
    assert sorted(e["reason"] for e in world.entries()) == ["ok"] + ["replayed"] * 5


async def test_lazy_start_backs_off_during_an_outage(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from axid.audit.store import generate_log_key

    key = tmp_path / "later.pem"
    bad = LogConfig(url=f"sqlite:///{tmp_path}/x.db", key=key, create_key=False, max_delay=0)
    w = make_world(pki, tmp_path, log=bad)
    with caplog.at_level("WARNING", logger="verifier"):
        for _ in range(5):
            assert_denied(await w.get("/payments/1", token=w.token()), "audit_unavailable")
    attempts = [r for r in caplog.records if "start" in r.getMessage()]
    assert len(attempts) == 1 and attempts[0].exc_info is not None  # one try, one traceback
    assert not w.verifier.started and w.calls.seen == []
    generate_log_key(key)  # the outage ends
    await asyncio.sleep(1.1)  # past the first backoff (1 s)
    caplog.clear()
    with caplog.at_level("WARNING", logger="verifier"):
        assert (await w.get("/payments/1", token=w.token())).status == 200
    assert any("started after 1 failed attempt" in r.getMessage() for r in caplog.records)
    await w.verifier.shutdown()


async def test_issuer_client_trusts_every_bundle_file(pki: Pki, tmp_path: Path) -> None:
    """identity.bundle lists several files; the mTLS client to the issuer uses them all
    (the issuer's trust domain is in the second one here)."""
    from _tls_helpers import ServerThread

    from mtls.sources import FileSource
    from mtls.uvicorn import uvicorn_config
    from verifier.config import JwksConfig

    key = new_signing_key()
    jwks = json.dumps(KeySet.of(key.public_key).to_jwks()).encode()

    async def issuer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": jwks})

    source = FileSource(pki.cert("issuer"), pki.key("issuer"), pki.dev.bundle)
    server = ServerThread(
        uvicorn_config(issuer, source=source, lifespan="off", log_level="warning")
    ).start()
    try:
        identity = IdentityConfig(
            bundle=(pki.other.bundle, pki.dev.bundle),
            cert=pki.cert("payments"),
            key=pki.key("payments"),
        )
        w = make_world(
            pki,
            tmp_path,
            identity=identity,
            jwks=JwksConfig(url=f"https://127.0.0.1:{server.port}/jwks"),
        )
        await w.verifier.startup()
        try:
            token = token_for(pki, "planner", key, now=w.clock())
            assert (await w.get("/payments/1", token=token)).status == 200
        finally:
            await w.verifier.shutdown()
    finally:
        server.stop()
        source.close()
