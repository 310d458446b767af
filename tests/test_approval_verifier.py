"""The verifier's approval step in-process (ASGI scopes shaped like mtls.uvicorn's, real
SQLite log and single-use table): an approval token binds one exact request of one
agent's run, once; the app receives exactly the bytes that were hashed.

Filing at a real issuer is covered end to end in test_approvals_e2e.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _verifier_helpers import (
    ISSUER,
    Answer,
    FakeClock,
    Pki,
    http_scope,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)

from axid.audit.verify import DatabaseSource, verify_log
from axid.keys import SigningKey
from axid.tokens import ApprovedRequest, mint_approval
from verifier.config import ApprovalsConfig, ConfigError, IdentityConfig, LogConfig, VerifierConfig
from verifier.decision import STATUS
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

NOW = 1_800_000_000.0
APPROVER = "spiffe://example.org/admin/ops"
RULES = [
    RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
    RouteRule(
        "/payments/*", methods=["DELETE", "POST"], scope="payments:delete", approval="required"
    ),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("approval"))


@dataclass
class Seen:
    bodies: list[bytes] = field(default_factory=list)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.bodies.append(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@dataclass
class World:
    pki: Pki
    key: SigningKey
    clock: FakeClock
    config: VerifierConfig
    verifier: AxidVerifier
    seen: Seen
    url: str
    approval_seq: int = 0

    def token(self, name: str = "planner", run: str = "run-a", **kw: Any) -> str:
        kw.setdefault("scope", "payments:read payments:delete")
        return token_for(self.pki, name, self.key, now=self.clock(), run=run, **kw)

    def approval(
        self,
        *,
        name: str = "planner",
        method: str = "DELETE",
        path: str = "/payments/p1",
        body: bytes = b"",
        run: str = "run-a",
        ttl: int = 120,
        approval_id: str | None = None,
    ) -> str:
        self.approval_seq += 1
        return mint_approval(
            key=self.key,
            iss=ISSUER,
            sub=self.pki.spiffe_id(name),
            aud="payments",
            tenant="acme",
            run=run,
            approval=approval_id or f"{self.approval_seq:022d}"[:21] + "A",
            approver=APPROVER,
            req=ApprovedRequest(method, path, hashlib.sha256(body).hexdigest()),
            cnf_x5t_s256=self.pki.cnf(name),
            now=int(self.clock()),
            ttl=ttl,
        )

    async def send(
        self,
        path: str = "/payments/p1",
        *,
        method: str = "DELETE",
        who: str = "planner",
        token: str | None = None,
        approvals: tuple[str, ...] = (),
        chunks: tuple[bytes, ...] = (b"",),
        query: bytes = b"",
    ) -> Answer:
        headers = [("X-AXID-Approval", a) for a in approvals]
        scope = http_scope(
            path, method=method, chain=self.pki.chain_pem(who), token=token, headers=headers
        )
        scope["query_string"] = query
        return await _call(self.verifier, scope, chunks)

    def entries(self) -> list[dict[str, Any]]:
        return log_entries(self.url, self.config.log_name)


async def _call(app: Any, scope: dict[str, Any], chunks: tuple[bytes, ...]) -> Answer:
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Answer(start["status"], headers, body)


@pytest.fixture
async def world(pki: Pki, tmp_path: Path) -> AsyncIterator[World]:
    key = new_signing_key()
    clock = FakeClock(NOW)
    url = f"sqlite:///{tmp_path / 'axid.db'}"
    config = VerifierConfig(
        service="payments",
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(
            bundle=pki.dev.bundle, cert=pki.cert("payments"), key=pki.key("payments")
        ),
        jwks=key_set(key),
        revocations=StaticRevocations(),
        log=LogConfig(url=url, key=tmp_path / "log.pem", max_delay=0),
        # Nothing listens there: filing fails (the success path is in the e2e test).
        approvals=ApprovalsConfig(url="https://127.0.0.1:9/v1/approvals", timeout=2, max_body=64),
        rules=RULES,
        clock=clock,
    )
    seen = Seen()
    verifier = AxidVerifier(seen.app, config)
    w = World(pki, key, clock, config, verifier, seen, url)
    await verifier.startup()
    yield w
    await verifier.shutdown()
    report = verify_log(DatabaseSource(url, config.log_name))
    assert report.ok, report.first_bad


def reason(answer: Answer) -> str:
    if answer.status == 200:
        return "ok"
    assert answer.status == STATUS[answer.json["reason"]]
    return str(answer.json["reason"])


async def test_allowed_once_with_the_approver_in_the_note(world: World) -> None:
    approval = world.approval(body=b'{"why":"dup"}')
    token = world.token()
    answer = await world.send(token=token, approvals=(approval,), chunks=(b'{"why":', b'"dup"}'))
    assert reason(answer) == "ok"
    assert world.seen.bodies == [b'{"why":"dup"}']  # exactly the bytes hashed
    entry = world.entries()[-1]
    assert entry["decision"] == "allow"
    assert APPROVER in entry["note"] and "approval " in entry["note"]
    again = await world.send(token=token, approvals=(approval,), chunks=(b'{"why":"dup"}',))
    assert reason(again) == "approval_invalid"
    assert world.entries()[-1]["reason"] == "approval_invalid"
    assert len(world.seen.bodies) == 1


async def test_no_approval_and_no_issuer_is_unavailable(world: World) -> None:
    answer = await world.send(token=world.token())
    assert reason(answer) == "approval_unavailable" and answer.status == 503
    assert world.entries()[-1]["reason"] == "approval_unavailable"
    assert world.seen.bodies == []


@pytest.mark.parametrize(
    ("approval_kw", "send_kw", "expected"),
    [
        ({"path": "/payments/p2"}, {}, "approval_invalid"),  # another path
        ({}, {"path": "/payments/p2"}, "approval_invalid"),
        ({}, {"query": b"force=1"}, "approval_invalid"),  # the query is part of the target
        ({"path": "/payments/p1?force=1"}, {"query": b"force=1"}, "ok"),
        ({"body": b"a"}, {}, "approval_invalid"),  # another body
        ({}, {"chunks": (b"b",)}, "approval_invalid"),
        ({"method": "POST"}, {}, "approval_invalid"),  # another method
        ({"run": "run-b"}, {}, "approval_invalid"),  # another run
        ({"name": "worker"}, {}, "approval_invalid"),  # another agent's approval
        ({"name": "planner2"}, {}, "approval_invalid"),  # another certificate
        ({}, {"chunks": (b"x" * 65,)}, "approval_invalid"),  # over max_body
    ],
)
async def test_bindings(
    world: World, approval_kw: dict[str, Any], send_kw: dict[str, Any], expected: str
) -> None:
    approval = world.approval(**approval_kw)
    answer = await world.send(token=world.token(), approvals=(approval,), **send_kw)
    assert reason(answer) == expected
    assert world.entries()[-1]["reason"] == expected
    assert len(world.seen.bodies) == (1 if expected == "ok" else 0)


async def test_expired_approval(world: World) -> None:
    approval = world.approval(ttl=10)
    world.clock.advance(20)
    answer = await world.send(token=world.token(), approvals=(approval,))
    assert reason(answer) == "approval_expired"


async def test_token_kinds_do_not_mix(world: World) -> None:
    token = world.token()
    answer = await world.send(token=token, approvals=(world.token(),))
    assert reason(answer) == "approval_invalid"
    assert "token_bad_type" in world.entries()[-1]["note"]
    approval = world.approval()
    answer = await world.send(token=approval, approvals=(approval,))
    assert reason(answer) == "token_bad_type"


async def test_two_approval_headers(world: World) -> None:
    approval = world.approval()
    answer = await world.send(token=world.token(), approvals=(approval, approval))
    assert reason(answer) == "approval_invalid"


async def test_other_routes_are_untouched(world: World) -> None:
    answer = await world.send(method="GET", token=world.token())
    assert reason(answer) == "ok"


def test_config() -> None:
    rule = RouteRule.from_dict(
        {"path": "/x", "approval": "required", "approvers": ["spiffe://example.org/admin/*"]}
    )
    assert rule.approval_required and rule.approvers == ("spiffe://example.org/admin/*",)
    for bad in (
        {"path": "/x", "approval": True},
        {"path": "/x", "approval": "yes"},
        {"path": "/x", "approvers": ["spiffe://example.org/a"]},
        {"path": "/x", "approval": "required", "approvers": "spiffe://example.org/a"},
        {"path": "/x", "approval": "required", "approvers": ["spiffe://example.org/a*"]},
        {"path": "/x", "approval": "required", "governed": False},
    ):
        with pytest.raises(ConfigError):
            RouteRule.from_dict(bad)
    with pytest.raises(ConfigError):
        ApprovalsConfig(url="http://127.0.0.1/v1/approvals")


def test_problem_json_carries_the_approval() -> None:
    from verifier.responses import problem_json

    doc = json.loads(problem_json(403, "approval_required", "d", {"id": "x", "url": "u"}))
    assert doc["approval"] == {"id": "x", "url": "u"}


async def test_one_approval_one_request_across_replicas(world: World, tmp_path: Path) -> None:
    """A second verifier (another replica: its own log, the same single-use table)
    and the first race one approval: exactly one request is allowed."""
    import asyncio
    import dataclasses

    other_config = dataclasses.replace(
        world.config,
        log=LogConfig(url=world.url, name="payments-2", key=tmp_path / "log2.pem", max_delay=0),
    )
    replica = AxidVerifier(world.seen.app, other_config)
    await replica.startup()
    try:
        approval, token = world.approval(), world.token()
        scopes = [
            http_scope(
                "/payments/p1",
                method="DELETE",
                chain=world.pki.chain_pem("planner"),
                token=token,
                headers=[("X-AXID-Approval", approval)],
            )
            for _ in range(2)
        ]
        answers = await asyncio.gather(
            _call(world.verifier, scopes[0], (b"",)), _call(replica, scopes[1], (b"",))
        )
    finally:
        await replica.shutdown()
    assert sorted(reason(a) for a in answers) == ["approval_invalid", "ok"]
    assert len(world.seen.bodies) == 1
    report = verify_log(DatabaseSource(world.url, "payments-2"))
    assert report.ok, report.first_bad
