"""The issuer service over real mTLS: a uvicorn server with dev certificates, httpx
clients presenting SVIDs, SQLite files and (with AXID_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from _issuer_helpers import (
    ISS,
    World,
    make_world,
    registrations_yaml,
    running,
    uid,
    world_config,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from axid.cli._app import app as cli_app
from axid.issuer.app import create_app
from axid.keys import Keyring, SigningKey
from axid.tokens import mint as mint_token
from mtls.devpki import DevCA
from mtls.tlsconfig import client_context


@pytest.fixture(params=["sqlite", "pg"])
def world(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    w = make_world(tmp_path, request.param)
    with running(w):
        yield w


def problem(r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["reason"] == reason, body
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    assert "token" not in body
    return body


def x5t(w: World, name: str) -> str:
    cert = x509.load_pem_x509_certificate(w.cert(name)[0].read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def minted(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    return r.json()


def root(w: World, **changes: Any) -> dict[str, Any]:
    """A planner root token (response body + the body that was sent as "req")."""
    body = w.root_body(**changes)
    out = minted(w.mint("planner", **body))
    out["req"] = body
    return out


def child(w: World, parent: dict[str, Any], name: str = "worker", **changes: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "agent": w.worker if name == "worker" else w.planner,
        "run": w.run(),
        "audience": "payments",
        "scope": "payments:read",
        "parent_token": parent["token"],
    }
    body.update(changes)
    return w.mint(name, **body)


def revoke(w: World, kind: str, value: str, who: str = "admin") -> httpx.Response:
    return w.client(who).post(
        "/v1/revocations", json={"kind": kind, "value": value, "reason": "test"}
    )


# --------------------------------------------------------------------------- minting


def test_mint_happy_path(world: World) -> None:
    body = world.root_body(scope="payments:refund payments:read")
    r = world.mint("planner", **body)
    out = minted(r)
    assert set(out) == {"token", "jti", "kid", "expires_at"}
    assert r.headers["cache-control"] == "no-store"
    claims = world.verify(out["token"])
    assert claims.sub == world.spiffe_id("planner")
    assert claims.cnf_x5t_s256 == x5t(world, "planner")
    assert claims.iss == ISS
    assert claims.jti == out["jti"] and claims.kid == out["kid"]
    assert claims.exp == out["expires_at"] and claims.exp - claims.iat == 120
    assert (claims.tenant, claims.agent, claims.run) == (world.tenant, world.planner, body["run"])
    assert claims.spawn_parent is None and claims.chain == ()
    assert claims.scope_str == "payments:read payments:refund"
    assert claims.aud == ("payments",)

    [entry] = world.entries()
    assert entry["decision"] == "allow" and entry["reason"] == "ok"
    assert entry["jti"] == out["jti"] and entry["kid"] == out["kid"]
    assert entry["peer"] == world.spiffe_id("planner")
    assert entry["peer_cert"] == x5t(world, "planner")
    assert entry["service"] == "axid-issuer" and entry["iss"] == ISS
    assert (entry["method"], entry["path"]) == ("POST", "/v1/tokens")
    assert entry["rule"] == world.spiffe_id("planner")
    assert entry["scope_required"] == body["scope"]
    assert out["token"] not in json.dumps(entry)


def test_mint_several_audiences_and_ttl(world: World) -> None:
    out = minted(
        world.mint("planner", **world.root_body(audience=["payments", "ledger"], ttl_seconds=30))
    )
    claims = world.verify(out["token"], audience="ledger")
    assert claims.aud == ("payments", "ledger")
    assert claims.exp - claims.iat == 30


def test_jwks_route(world: World) -> None:
    r = world.client("payments").get("/.well-known/jwks.json")
    assert r.status_code == 200
    doc = r.json()
    [jwk] = doc["keys"]
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert jwk["kid"] == minted(world.mint("planner", **world.root_body()))["kid"]


def test_no_client_cert_public_routes_only(world: World) -> None:
    """The issuer's TLS asks for a client certificate without requiring one: an
    anonymous client completes the handshake, reads the public routes, and gets 401
    no_peer_cert (unrecorded) anywhere else. (More in test_public_routes.py.)"""
    ctx = ssl.create_default_context(cafile=str(world.pki.bundle))
    ctx.check_hostname = False
    with httpx.Client(base_url=world.url, verify=ctx, trust_env=False) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/.well-known/jwks.json").json()["keys"]
        r = c.post("/v1/tokens", json=world.root_body())
        problem(r, 401, "no_peer_cert")
        assert r.headers["www-authenticate"] == 'AXID error="no_peer_cert"'
        problem(c.get("/v1/revocations"), 401, "no_peer_cert")
        problem(c.get("/metrics"), 401, "no_peer_cert")
    assert world.entries() == []


@pytest.mark.parametrize("name", ["stranger", "payments"])
def test_unregistered_peer(world: World, name: str) -> None:
    problem(world.mint(name, **world.root_body()), 403, "agent_not_allowed")
    [entry] = world.entries()
    assert (entry["decision"], entry["reason"]) == ("deny", "agent_not_allowed")
    assert entry["peer"] == world.spiffe_id(name) and entry["rule"] is None


def test_unknown_agent(world: World) -> None:
    problem(world.mint("planner", **world.root_body(agent=world.worker)), 403, "agent_not_allowed")
    problem(world.mint("planner", **world.root_body(agent="nobody")), 403, "agent_not_allowed")


def test_audience_not_allowed(world: World) -> None:
    r = world.mint("planner", **world.root_body(audience="billing"))
    problem(r, 403, "audience_not_allowed")
    r = world.mint("planner", **world.root_body(audience=["payments", "billing"]))
    problem(r, 403, "audience_not_allowed")


def test_scope_wider_than_registered(world: World) -> None:
    body = world.root_body(agent=world.worker, scope="payments:read payments:delete")
    problem(world.mint("worker", **body), 403, "scope_insufficient")
    entry = world.entries()[-1]
    assert entry["reason"] == "scope_insufficient"
    assert entry["scope_required"] == "payments:read payments:delete"


def test_tenant_assertion(world: World) -> None:
    problem(
        world.mint("planner", **world.root_body(tenant=world.other_tenant)),
        403,
        "tenant_not_allowed",
    )
    minted(world.mint("planner", **world.root_body(tenant=world.tenant)))


BAD_BODIES: list[tuple[str, Any]] = [
    ("agent not a string", {"agent": 5}),
    ("ttl as string", {"ttl_seconds": "60"}),
    ("ttl as bool", {"ttl_seconds": True}),
    ("ttl as float", {"ttl_seconds": 60.0}),
    ("ttl zero", {"ttl_seconds": 0}),
    ("ttl negative", {"ttl_seconds": -5}),
    ("ttl over max", {"ttl_seconds": 301}),
    ("ttl huge", {"ttl_seconds": 10**40}),
    ("extra member", {"admin": True}),
    ("sub in body", {"sub": "spiffe://example.org/agent/worker"}),
    ("missing run", {"run": None}),
    ("agent uppercase", {"agent": "Planner"}),
    ("run with slash", {"run": "a/b"}),
    ("run too long", {"run": "r" * 200}),
    ("empty scope", {"scope": ""}),
    ("scope double space", {"scope": "payments:read  payments:refund"}),
    ("scope duplicate", {"scope": "payments:read payments:read"}),
    ("scope as list", {"scope": ["payments:read"]}),
    ("empty audience list", {"audience": []}),
    ("duplicate audience", {"audience": ["payments", "payments"]}),
    ("audience object", {"audience": {"a": 1}}),
    ("parent token not string", {"parent_token": 7}),
]


def test_bad_json_bodies(world: World) -> None:
    for label, changes in BAD_BODIES:
        body = world.root_body()
        for k, v in changes.items():
            if v is None:
                del body[k]
            else:
                body[k] = v
        r = world.mint("planner", **body)
        assert r.status_code == 400, label
        problem(r, 400, "bad_request")
    entries = world.entries()
    assert len(entries) == len(BAD_BODIES)
    assert {(e["decision"], e["reason"]) for e in entries} == {("deny", "bad_request")}


RAW_BODIES: list[tuple[str, bytes, str, int]] = [
    ("not json", b"agent=planner", "application/json", 400),
    ("json array", b"[1, 2]", "application/json", 400),
    ("json string", b'"x"', "application/json", 400),
    ("empty", b"", "application/json", 400),
    ("not utf-8", b'{"agent": "\xff"}', "application/json", 400),
    ("NaN", b'{"ttl_seconds": NaN}', "application/json", 400),
    ("duplicate member", b'{"agent": "a", "agent": "b"}', "application/json", 400),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "application/json", 413),
    ("deep but small", b"[" * 20_000 + b"]" * 20_000, "application/json", 400),
    ("form", b"agent=planner", "application/x-www-form-urlencoded", 415),
    ("no content type", b"{}", "", 415),
    ("too large", b'{"agent": "' + b"a" * 70_000 + b'"}', "application/json", 413),
]


def test_bad_raw_bodies(world: World) -> None:
    for label, raw, ctype, status in RAW_BODIES:
        headers = {"content-type": ctype} if ctype else {}
        r = world.client("planner").post("/v1/tokens", content=raw, headers=headers)
        assert r.status_code == status, label
        problem(r, status, "bad_request")
    assert len(world.entries()) == len(RAW_BODIES)


def test_unknown_member_names_are_tamed(world: World) -> None:
    # Unknown member names are echoed only in a tamed form.
    r = world.mint("planner", **world.root_body(**{"<script>": 1}))
    body = problem(r, 400, "bad_request")
    assert "<script>" not in body["detail"]


def test_not_found_and_method_not_allowed(world: World) -> None:
    problem(world.client("planner").get("/nope"), 404, "not_found")
    problem(world.client("planner").get("/v1/tokens"), 405, "method_not_allowed")
    problem(world.client("planner").get("/docs"), 404, "not_found")


# --------------------------------------------------------------------------- spawning


def test_spawn_child(world: World) -> None:
    parent = root(world, ttl_seconds=60)
    r = child(world, parent, ttl_seconds=300, scope="payments:read payments:refund")
    out = minted(r)
    claims = world.verify(out["token"])
    pclaims = world.verify(parent["token"])
    assert claims.sub == world.spiffe_id("worker")
    assert claims.cnf_x5t_s256 == x5t(world, "worker")
    assert claims.spawn_parent == parent["req"]["run"]
    assert claims.chain == (parent["req"]["run"],)
    assert claims.tenant == world.tenant and claims.agent == world.worker
    assert claims.exp <= pclaims.exp
    assert claims.exp == pclaims.exp  # capped: asked 300 s, the parent has ~60 left
    entry = world.entries()[-1]
    assert entry["decision"] == "allow"
    assert entry["spawn_parent"] == parent["req"]["run"]
    assert entry["chain"] == [parent["req"]["run"]]
    assert entry["note"] == (
        f"parent jti {parent['jti']} run {parent['req']['run']} sub {world.spiffe_id('planner')}"
    )

    # The grandchild: chain grows from the root down.
    grand = minted(child(world, out, agent=world.worker))
    gclaims = world.verify(grand["token"])
    assert gclaims.chain == (parent["req"]["run"], claims.run)
    assert gclaims.spawn_parent == claims.run


def test_child_cannot_widen_scope(world: World) -> None:
    parent = root(world, scope="payments:read")
    problem(child(world, parent, scope="payments:read payments:refund"), 403, "scope_insufficient")
    problem(child(world, parent, audience="ledger"), 403, "audience_not_allowed")
    minted(child(world, parent, scope="payments:read"))


def test_other_tenants_token_is_no_parent(world: World) -> None:
    bot = minted(
        world.mint(
            "bot", agent=world.bot, run=world.run(), audience="payments", scope="payments:read"
        )
    )
    problem(child(world, bot), 403, "tenant_not_allowed")
    entry = world.entries()[-1]
    assert entry["reason"] == "tenant_not_allowed"
    # Attribution: whose token it was, not only who presented it.
    assert entry["peer"] == world.spiffe_id("worker")
    assert f"jti {bot['jti']}" in entry["note"]
    assert entry["note"].endswith(f"sub {world.spiffe_id('bot')}")


def test_parent_is_attributed_in_every_child_refusal(world: World) -> None:
    parent = root(world, scope="payments:read")
    attribution = f"parent jti {parent['jti']} run {parent['req']['run']} sub "
    attribution += world.spiffe_id("planner")
    # An unregistered workload holding the planner's token (refused at step 1) ...
    problem(child(world, parent, name="stranger"), 403, "agent_not_allowed")
    # ... a worker asking for more than the parent has ...
    problem(child(world, parent, scope="payments:refund"), 403, "scope_insufficient")
    # ... or reusing the parent's run.
    problem(child(world, parent, run=parent["req"]["run"]), 409, "run_conflict")
    denies = world.entries()[1:]
    assert [e["reason"] for e in denies] == [
        "agent_not_allowed",
        "scope_insufficient",
        "run_conflict",
    ]
    assert [e["peer"] for e in denies] == [
        world.spiffe_id("stranger"),
        world.spiffe_id("worker"),
        world.spiffe_id("worker"),
    ]
    assert all(e["note"] == attribution for e in denies)


def test_spawn_from_restricts_whose_token_may_parent(tmp_path: Any) -> None:
    # Registry logic only: SQLite is enough (the store is not involved).
    w = make_world(tmp_path, "sqlite")
    td = w.pki.trust_domain.name
    doc = json.loads(registrations_yaml(w))
    planner, worker, _bot = doc["registrations"]
    planner["spawn_from"] = []  # root tokens only
    worker["spawn_from"] = [f"spiffe://{td}/agent/planner", f"spiffe://{td}/admin/*"]
    helper = f"helper-{uid()}"
    doc["registrations"].append(  # no spawn_from: spawns from nobody
        {
            "spiffe_id": f"spiffe://{td}/agent/stranger",
            "tenant": w.tenant,
            "agents": [helper],
            "audiences": ["payments"],
            "scope": "payments:read",
        }
    )
    (w.tmp / "registrations.yaml").write_text(json.dumps(doc))
    refused = "parent token's workload may not spawn this workload"
    with running(w):
        p = root(w, scope="payments:read")
        # The planner's own token may not parent a planner run (spawn_from: []).
        body = problem(child(w, p, name="planner"), 403, "spawn_not_allowed")
        assert body["detail"] == refused
        # The worker may be spawned from the planner's token ...
        w1 = minted(child(w, p))
        assert w.verify(w1["token"]).spawn_parent == p["req"]["run"]
        # ... but not from another worker's token.
        body = problem(child(w, w1), 403, "spawn_not_allowed")
        assert body["detail"] == refused
        entry = w.entries()[-1]
        assert entry["peer"] == w.spiffe_id("worker")
        assert entry["note"].endswith(f"sub {w.spiffe_id('worker')}")
        assert f"jti {w1['jti']}" in entry["note"]
        # Without spawn_from: neither the worker's token nor the planner's parents
        # the helper (same tenant, holding both) ...
        problem(child(w, w1, name="stranger", agent=helper), 403, "spawn_not_allowed")
        problem(child(w, p, name="stranger", agent=helper), 403, "spawn_not_allowed")
        # ... and the helper's own root token does not parent the worker.
        h1 = minted(w.mint("stranger", **w.root_body(agent=helper, scope="payments:read")))
        problem(child(w, h1), 403, "spawn_not_allowed")
        reasons = [e["reason"] for e in w.entries()]
        assert reasons == ["ok", "spawn_not_allowed", "ok"] + ["spawn_not_allowed"] * 3 + [
            "ok",
            "spawn_not_allowed",
        ]


def test_worker_cannot_mint_for_parents_run(world: World) -> None:
    parent = root(world)
    run = parent["req"]["run"]
    problem(child(world, parent, run=run), 409, "run_conflict")
    # Not as a root either: the run is bound to the planner.
    body = world.root_body(agent=world.worker, run=run, scope="payments:read")
    problem(world.mint("worker", **body), 409, "run_conflict")
    # Nor a run of the parent's chain.
    kid = minted(child(world, parent))
    problem(child(world, kid, run=run, agent=world.worker), 409, "run_conflict")


def test_run_keeps_its_first_parent(world: World) -> None:
    p1, p2 = root(world), root(world)
    run = world.run()
    minted(child(world, p1, run=run))
    minted(child(world, p1, run=run))  # the same binding again is fine
    body = problem(child(world, p2, run=run), 409, "run_conflict")
    assert body["detail"] == "the run is already bound with another parent"
    body = problem(
        world.mint("worker", **world.root_body(agent=world.worker, run=run, scope="payments:read")),
        409,
        "run_conflict",
    )
    assert body["detail"] == "the run is already bound with another parent"
    # Another workload cannot take over a bound root run either.
    r = world.mint("planner", **world.root_body(run=p1["req"]["run"]))
    minted(r)  # same workload, same binding
    body = problem(
        world.mint(
            "bot", agent=world.bot, run=p1["req"]["run"], audience="payments", scope="payments:read"
        ),
        409,
        "run_conflict",
    )
    # Another tenant learns nothing about the run (not even that it exists elsewhere),
    # but the issuer's own log keeps the cause.
    assert body["detail"] == "run id is not available"
    entry = world.entries()[-1]
    assert entry["reason"] == "run_conflict" and entry["tenant"] == world.other_tenant
    assert entry["note"] == "run id is bound in another tenant"


def test_spawn_depth_limit(world: World) -> None:
    token = root(world)
    for depth in range(1, 9):
        token = minted(child(world, token))
        assert len(world.verify(token["token"]).chain) == depth
    body = problem(child(world, token), 403, "spawn_too_deep")
    assert "8" in body["detail"]


def test_bad_parent_tokens(world: World) -> None:
    parent = root(world)
    problem(child(world, {"token": "not-a-token"}), 401, "token_malformed")
    problem(child(world, {"token": parent["token"][:-4] + "AAAA"}), 401, "token_bad_signature")
    foreign = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    forged = mint_token(
        key=foreign,
        iss=ISS,
        sub=world.spiffe_id("planner"),
        aud="payments",
        tenant=world.tenant,
        agent=world.planner,
        run=world.run(),
        spawn_parent=None,
        chain=[],
        scope="payments:read",
        cnf_x5t_s256=x5t(world, "planner"),
        now=int(world.clock()),
    )
    problem(child(world, {"token": forged}), 401, "token_unknown_kid")
    problem(child(world, {"token": "a" * 9000}), 401, "token_too_large")
    world.clock.advance(400)
    problem(child(world, parent), 401, "token_expired")
    reasons = [e["reason"] for e in world.entries()[1:]]
    assert reasons == [
        "token_malformed",
        "token_bad_signature",
        "token_unknown_kid",
        "token_too_large",
        "token_expired",
    ]
    # An unverified parent's claims are never trusted for attribution: reason only.
    notes = [e["note"] for e in world.entries()[1:]]
    assert notes == [f"parent_token did not verify: {r}" for r in reasons]
    assert all(parent["token"] not in json.dumps(e) for e in world.entries())


# --------------------------------------------------------------------------- revocation


def test_revocation_needs_an_admin(world: World) -> None:
    parent = root(world)
    problem(revoke(world, "jti", parent["jti"], who="planner"), 403, "forbidden")
    entry = world.entries()[-1]
    assert (entry["decision"], entry["reason"]) == ("deny", "forbidden")
    assert entry["path"] == "/v1/revocations"
    r = world.client("admin").post("/v1/revocations", json={"kind": "jti", "value": "x"})
    problem(r, 400, "bad_request")
    problem(revoke(world, "everything", "x"), 400, "bad_request")
    problem(revoke(world, "jti", "not a jti"), 400, "bad_request")
    problem(revoke(world, "tenant", "UPPER"), 400, "bad_request")


def test_revoke_jti(world: World) -> None:
    parent = root(world)
    r = revoke(world, "jti", parent["jti"])
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["kind"], out["value"], out["reason"]) == ("jti", parent["jti"], "test")
    assert out["cascaded"] == []
    problem(child(world, parent), 403, "revoked")
    entries = world.entries()
    assert entries[1]["decision"] == "allow" and entries[1]["jti"] == parent["jti"]
    assert entries[1]["peer"] == world.spiffe_id("admin")
    assert entries[2]["reason"] == "revoked"
    # Idempotent: the same revocation again returns the first row.
    again = revoke(world, "jti", parent["jti"]).json()
    assert again["seq"] == out["seq"]


def test_revoke_run_cascades(world: World) -> None:
    r0 = root(world)
    r1 = minted(child(world, r0))
    r2 = minted(child(world, r1))
    run0, run1, run2 = (world.verify(t["token"]).run for t in (r0, r1, r2))
    r = revoke(world, "run", run0)
    assert r.status_code == 201
    assert sorted(c["value"] for c in r.json()["cascaded"]) == sorted([run1, run2])
    # Revoked parent cannot spawn; revoked ancestor (cascade) cannot spawn a grandchild.
    problem(child(world, r0), 403, "revoked")
    problem(child(world, r1), 403, "revoked")
    problem(child(world, r2), 403, "revoked")
    # Nor can the run itself mint again.
    problem(world.mint("planner", **world.root_body(run=run0)), 403, "revoked")


def test_revoked_ancestor_in_chain_only(world: World) -> None:
    # The ancestor is revoked before the child exists: the chain alone refuses it.
    r0 = root(world)
    r1 = minted(child(world, r0))
    revoke(world, "run", world.verify(r0["token"]).run)
    problem(child(world, r1), 403, "revoked")


def test_revoke_agent_and_tenant(world: World) -> None:
    parent = root(world)
    assert revoke(world, "agent", world.worker).status_code == 201
    problem(child(world, parent), 403, "revoked")
    minted(world.mint("planner", **world.root_body()))
    assert revoke(world, "agent", world.planner).status_code == 201
    problem(world.mint("planner", **world.root_body()), 403, "revoked")
    bot = {"agent": world.bot, "audience": "payments", "scope": "payments:read"}
    minted(world.mint("bot", run=world.run(), **bot))
    assert revoke(world, "tenant", world.other_tenant).status_code == 201
    problem(world.mint("bot", run=world.run(), **bot), 403, "revoked")


def test_revocations_feed_paging(world: World) -> None:
    feed = world.client("payments")
    start = feed.get("/v1/revocations", params={"since": 0, "limit": 1000})
    assert start.status_code == 200
    since = 0
    while True:  # the shared PostgreSQL may hold other tests' rows: page to the end
        page = feed.get("/v1/revocations", params={"since": since}).json()
        if not page["revocations"]:
            break
        since = page["next"]
    values = [world.run() for _ in range(5)]
    for v in values:
        assert revoke(world, "run", v).status_code == 201
    seen: list[dict[str, Any]] = []
    cursor = since
    while True:
        r = feed.get("/v1/revocations", params={"since": cursor, "limit": 2})
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        page = r.json()
        assert set(page) == {"revocations", "next"}
        assert len(page["revocations"]) <= 2
        if not page["revocations"]:
            assert page["next"] == cursor
            break
        seqs = [row["seq"] for row in page["revocations"]]
        assert seqs == sorted(seqs) and seqs[0] > cursor and page["next"] == seqs[-1]
        seen.extend(page["revocations"])
        cursor = page["next"]
    mine = [row for row in seen if row["value"] in values]
    assert [row["value"] for row in mine] == values
    for row in mine:
        assert set(row) == {"seq", "kind", "value", "reason", "created_at"}
        assert row["kind"] == "run" and row["reason"] == "test"
        assert row["created_at"].endswith("Z")
    problem(feed.get("/v1/revocations", params={"since": "-1"}), 400, "bad_request")
    problem(feed.get("/v1/revocations", params={"since": "abc"}), 400, "bad_request")
    problem(feed.get("/v1/revocations", params={"limit": "0"}), 400, "bad_request")
    problem(feed.get("/v1/revocations", params={"limit": "1001"}), 400, "bad_request")


# --------------------------------------------------------------------------- decision log


def test_every_mint_and_refusal_is_logged(world: World) -> None:
    parent = root(world)
    problem(world.mint("stranger", **world.root_body()), 403, "agent_not_allowed")
    problem(world.mint("planner", **world.root_body(scope="admin:all")), 403, "scope_insufficient")
    problem(world.mint("planner", **world.root_body(ttl_seconds="x")), 400, "bad_request")
    kid = minted(child(world, parent))
    problem(child(world, parent, run=parent["req"]["run"]), 409, "run_conflict")
    entries = world.entries()
    assert [(e["decision"], e["reason"]) for e in entries] == [
        ("allow", "ok"),
        ("deny", "agent_not_allowed"),
        ("deny", "scope_insufficient"),
        ("deny", "bad_request"),
        ("allow", "ok"),
        ("deny", "run_conflict"),
    ]
    assert [e["seq"] for e in entries] == list(range(6))
    assert entries[4]["jti"] == kid["jti"] and entries[4]["agent"] == world.worker
    assert entries[4]["tenant"] == world.tenant
    # The checkpoint route serves the log's latest signed checkpoint.
    r = world.client("payments").get("/v1/audit/checkpoint")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.split("\n")
    assert lines[0] == f"axid/{world.log_name}" and lines[1] == "6"


def test_log_unavailable_means_no_token(tmp_path: Any) -> None:
    audit_db = tmp_path / "audit" / "log.db"
    w = make_world(tmp_path, "sqlite", audit_url=f"sqlite:///{audit_db}")
    with running(w):
        minted(w.mint("planner", **w.root_body()))
        with sqlite3.connect(audit_db) as db:
            db.execute(
                "CREATE TRIGGER down BEFORE INSERT ON axid_audit_entry "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        r = w.mint("planner", **w.root_body())
        body = problem(r, 503, "audit_unavailable")
        assert "token" not in r.text and "disk on fire" not in r.text
        assert set(body) == {"type", "title", "status", "detail", "reason"}
        problem(w.mint("stranger", **w.root_body()), 503, "audit_unavailable")
        problem(revoke(w, "run", w.run()), 503, "audit_unavailable")
        with sqlite3.connect(audit_db) as db:
            db.execute("DROP TRIGGER down")
        minted(w.mint("planner", **w.root_body()))
        assert [e["reason"] for e in w.entries()] == ["ok", "ok"]


def _client(w: World, name: str) -> httpx.Client:
    """A client of its own (one per thread; World.client shares one per name)."""
    ctx = client_context(w.source(name), server_id=w.pki.spiffe_id("issuer"))
    return httpx.Client(base_url=w.url, verify=ctx, timeout=30, trust_env=False)


def test_concurrent_mints_each_decided_and_logged(world: World) -> None:
    """Many mints at once (their store work shares thread hand-offs): every one gets
    its own outcome, and every outcome is in the log."""
    revoked_run = world.run()
    assert revoke(world, "run", revoked_run).status_code == 201
    shared = [world.run() for _ in range(4)]  # bound by whichever workload comes first
    jobs: list[tuple[str, dict[str, Any]]] = []
    for run in shared:
        jobs += [("planner", world.root_body(run=run, scope="payments:read"))] * 3
        jobs += [
            ("worker", {**world.root_body(run=run, scope="payments:read"), "agent": world.worker})
        ]
    jobs += [("planner", world.root_body(run=revoked_run))] * 3
    jobs += [("planner", world.root_body()) for _ in range(6)]
    jobs += [("stranger", world.root_body())] * 2

    local = threading.local()
    opened: list[httpx.Client] = []  # every thread's clients, closed at the end

    def send(job: tuple[str, dict[str, Any]]) -> httpx.Response:
        name, body = job
        clients = local.__dict__.setdefault("clients", {})
        if name not in clients:
            clients[name] = _client(world, name)
            opened.append(clients[name])
        return clients[name].post("/v1/tokens", json=body)

    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, jobs))
    finally:
        for c in opened:
            c.close()
    by_run: dict[str, set[str]] = {}
    for (name, body), r in zip(jobs, answers, strict=True):
        if name == "stranger":
            problem(r, 403, "agent_not_allowed")
        elif body["run"] == revoked_run:
            problem(r, 403, "revoked")
        elif body["run"] in shared:
            if r.status_code == 201:
                by_run.setdefault(body["run"], set()).add(name)
                assert world.verify(r.json()["token"]).sub == world.spiffe_id(name)
            else:
                problem(r, 409, "run_conflict")
        else:
            assert world.verify(minted(r)["token"]).run == body["run"]
    # Each shared run went to exactly one workload, for all of that workload's mints.
    assert set(by_run) == set(shared) and all(len(v) == 1 for v in by_run.values())
    winners = [next(iter(by_run[run])) for run in shared]
    assert sum(r.status_code == 201 for r in answers) == 6 + sum(
        3 if w == "planner" else 1 for w in winners
    )
    entries = [e for e in world.entries() if e["path"] == "/v1/tokens"]
    assert len(entries) == len(jobs)
    assert sorted(e["reason"] for e in entries) == sorted(
        r.json()["reason"] if r.status_code != 201 else "ok" for r in answers
    )
    assert {e["jti"] for e in entries if e["decision"] == "allow"} == {
        r.json()["jti"] for r in answers if r.status_code == 201
    }


def test_store_down_means_no_token(tmp_path: Any) -> None:
    # The issuer's own tables fail (not the log): 503, no token, and the refusal logged.
    w = make_world(tmp_path, "sqlite", audit_url=f"sqlite:///{tmp_path}/audit/log.db")
    with running(w):
        body = w.root_body()
        minted(w.mint("planner", **body))
        with sqlite3.connect(tmp_path / "state" / "axid.db") as db:
            db.execute("ALTER TABLE axid_issuer_revocation RENAME TO elsewhere")
        r = w.mint("planner", **body)
        problem(r, 503, "store_unavailable")
        assert "token" not in r.text and "elsewhere" not in r.text
        with sqlite3.connect(tmp_path / "state" / "axid.db") as db:
            db.execute("ALTER TABLE elsewhere RENAME TO axid_issuer_revocation")
        minted(w.mint("planner", **body))
        assert [(e["decision"], e["reason"]) for e in w.entries()] == [
            ("allow", "ok"),
            ("deny", "store_unavailable"),
            ("allow", "ok"),
        ]


# --------------------------------------------------------------------------- operations


def test_healthz_and_metrics(world: World) -> None:
    c = world.client("payments")
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    root(world)
    problem(world.mint("stranger", **world.root_body()), 403, "agent_not_allowed")
    m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'axid_issuer_decisions_total{decision="allow",reason="ok",route="tokens"} 1.0' in text
    assert (
        'axid_issuer_decisions_total{decision="deny",reason="agent_not_allowed",route="tokens"} 1.0'
        in text
    )
    assert "axid_issuer_mint_seconds_count 1.0" in text


def test_key_rotation_is_picked_up(world: World) -> None:
    first = root(world)
    # `axid keys rotate` (its own Keyring object on the same directory, as another
    # process would have); the fake clock has not moved yet, so both agree on "now".
    r = CliRunner().invoke(
        cli_app, ["keys", "rotate", "--dir", str(world.keys_dir), "--publish-lead", "330"]
    )
    assert r.exit_code == 0, r.output
    new_kid = Keyring.load(world.keys_dir).keys(world.clock())[-1].kid
    assert new_kid in r.output
    kids = [k["kid"] for k in world.client("payments").get("/.well-known/jwks.json").json()["keys"]]
    assert kids == [first["kid"], new_kid]  # current first, then next
    assert root(world)["kid"] == first["kid"]  # not signing before the publish lead
    world.clock.advance(331)
    second = root(world)
    assert second["kid"] == new_kid
    world.verify(second["token"])
    # An old-key parent still valid? It has expired by now (120 s): refused as such.
    problem(child(world, first), 401, "token_expired")
    kids = [k["kid"] for k in world.client("payments").get("/.well-known/jwks.json").json()["keys"]]
    assert kids == [new_kid, first["kid"]]  # the retired key stays published for a while
    world.clock.advance(300 + 30 + 1)
    kids = [k["kid"] for k in world.client("payments").get("/.well-known/jwks.json").json()["keys"]]
    assert kids == [new_kid]


def test_httptools_protocol(tmp_path: Any) -> None:
    w = make_world(tmp_path, "sqlite")
    with running(w, http="httptools"):
        out = minted(w.mint("planner", **w.root_body()))
        assert w.verify(out["token"]).sub == w.spiffe_id("planner")
        problem(w.mint("stranger", **w.root_body()), 403, "agent_not_allowed")


def test_unique_ids() -> None:
    assert uid() != uid()


def test_foreign_trust_domain_peer(tmp_path: Any) -> None:
    # A federated trust domain the issuer trusts for TLS, but not for revocations.
    w = make_world(tmp_path, "sqlite")
    other = DevCA.create("other.org")
    other.issue_svid("spiffe://other.org/svc/verifier").write(w.pki.directory / "foreign")
    combined = w.pki.bundle.read_bytes() + other.cert_pem()
    w.pki.bundle.write_bytes(combined)
    with running(w):
        feed = w.client("foreign")
        r = feed.get("/v1/revocations")
        problem(r, 403, "forbidden")
        problem(w.mint("foreign", **w.root_body()), 403, "agent_not_allowed")
        assert w.entries()[-1]["peer"] == "spiffe://other.org/svc/verifier"
        assert feed.get("/.well-known/jwks.json").status_code == 200


async def test_without_the_tls_extension_nobody_is_authenticated(tmp_path: Any) -> None:
    # Served without mtls.uvicorn's protocol class, the app sees no certificate: 401,
    # as for any anonymous request, and as for those, nothing is recorded.
    w = make_world(tmp_path, "sqlite")
    app = create_app(world_config(w), clock=w.clock)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="https://testserver") as c,
    ):
        r = await c.post("/v1/tokens", json=w.root_body())
        problem(r, 401, "no_peer_cert")
        assert r.headers["www-authenticate"] == 'AXID error="no_peer_cert"'
        problem(await c.get("/v1/revocations"), 401, "no_peer_cert")
        problem(await c.post("/v1/revocations", json={}), 401, "no_peer_cert")
        assert (await c.get("/.well-known/jwks.json")).status_code == 200  # public
    assert w.entries() == []
