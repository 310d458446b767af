"""Approvals end to end over real mTLS (DESIGN.md "Approvals"): the real issuer under
uvicorn (its approvals table in SQLite or PostgreSQL) and a governed "payments"
service under uvicorn behind AxidVerifier (YAML config: keys, revocations and
approvals from the issuer over mTLS with the service's own SVID).

The planner's DELETE is denied approval_required and filed; an approver decides
through the issuer's routes (and the CLI); the agent polls the approval token;
exactly that request, once, by that workload, in that run, before expiry, is
allowed. Every decision is in the logs, which verify.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from _tls_helpers import WAIT, ServerThread, wait_for
from _verifier_helpers import PG_URL, Pki, log_entries, make_pki, require_pg
from fastapi import FastAPI, Request
from typer.testing import CliRunner

from axid.audit.verify import DatabaseSource, verify_log
from axid.issuer.app import create_app
from axid.issuer.approvals import ApprovalSettings
from axid.issuer.client import IssuerClient, IssuerError
from axid.issuer.config import IssuerConfig
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeIdPattern
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import VerifierConfig
from verifier.middleware import AxidVerifier

pytestmark = pytest.mark.timeout(180)

ISS = "https://issuer.axid.test"
TIMEOUT = 600  # approvals.timeout of this issuer


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
    issuer: ServerThread
    governed: ServerThread
    issuer_db: str
    issuer_log: str
    log_url: str
    log_name: str
    deleted: list[tuple[str, bytes]]
    notices: list[dict[str, Any]]
    _clients: dict[str, httpx.Client] = field(default_factory=dict)
    _issuers: dict[str, IssuerClient] = field(default_factory=dict)

    @property
    def issuer_url(self) -> str:
        return f"https://127.0.0.1:{self.issuer.port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.governed.port}"

    def source(self, name: str) -> FileSource:
        return FileSource(self.pki.cert(name), self.pki.key(name), self.pki.dev.bundle)

    def client(self, name: str) -> httpx.Client:
        c = self._clients.get(name)
        if c is None:
            ctx = client_context(self.source(name), server_id=self.pki.dev.spiffe_id("payments"))
            c = self._clients[name] = httpx.Client(verify=ctx, timeout=WAIT, trust_env=False)
        return c

    def at_issuer(self, name: str) -> IssuerClient:
        c = self._issuers.get(name)
        if c is None:
            c = self._issuers[name] = IssuerClient(self.issuer_url, self.source(name))
        return c

    def token(self, name: str = "planner", run: str | None = None) -> str:
        return (
            self.at_issuer(name)
            .mint(
                agent=name.rstrip("2"),
                run=run or f"run-{uid()}",
                audience="payments",
                scope="payments:read payments:delete",
            )
            .token
        )

    def delete(
        self,
        path: str,
        token: str,
        *,
        who: str = "planner",
        approval: str | None = None,
        body: bytes = b"",
    ) -> httpx.Response:
        headers = {"X-Waxell-AXID": token}
        if approval is not None:
            headers["X-AXID-Approval"] = approval
        return self.client(who).request("DELETE", self.url + path, headers=headers, content=body)

    def filed(self, path: str, token: str, **kw: Any) -> str:
        """Make the request without an approval: denied approval_required; its id."""
        r = self.delete(path, token, **kw)
        assert r.status_code == 403 and r.json()["reason"] == "approval_required", r.text
        approval = r.json()["approval"]
        assert approval["url"] == f"{self.issuer_url}/v1/approvals/{approval['id']}"
        assert approval["expires_at"] > self.clock()
        return str(approval["id"])

    def approved(self, approval_id: str, *, agent: str = "planner") -> str:
        self.at_issuer("admin").decide(approval_id, "approve", "looks right")
        doc = self.at_issuer(agent).approval(approval_id)
        assert doc["status"] == "approved"
        return str(doc["token"])

    def entries(self) -> list[dict[str, Any]]:
        return log_entries(self.log_url, self.log_name)

    def issuer_entries(self) -> list[dict[str, Any]]:
        return log_entries(self.issuer_db, self.issuer_log)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        for ic in self._issuers.values():
            ic.close()


def _registrations(td: str) -> str:
    scope = "payments:read payments:delete"
    return json.dumps(
        {
            "registrations": [
                {
                    "spiffe_id": f"spiffe://{td}/agent/planner",
                    "tenant": "acme",
                    "agents": ["planner"],
                    "audiences": ["payments"],
                    "scope": scope,
                },
                {
                    "spiffe_id": f"spiffe://{td}/agent/worker",
                    "tenant": "acme",
                    "agents": ["worker"],
                    "audiences": ["payments"],
                    "scope": scope,
                },
            ]
        }
    )


def _verifier_yaml(tmp: Path, pki: Pki, issuer_url: str, log_url: str, log: str) -> str:
    d = pki.dev.directory
    doc = {
        "service": "payments",
        "issuer": ISS,
        "tenants": ["acme"],
        "identity": {
            "bundle": str(pki.dev.bundle),
            "cert": str(d / "payments.pem"),
            "key": str(d / "payments.key"),
        },
        "jwks": {"url": f"{issuer_url}/.well-known/jwks.json", "refetch_min_interval": 0},
        "revocations": {"url": f"{issuer_url}/v1/revocations", "interval": 0.2},
        "log": {"url": log_url, "name": log, "key": str(tmp / "payments-log.pem")},
        "approvals": {"url": f"{issuer_url}/v1/approvals", "max_body": 4096},
        "rules": [
            {"methods": ["GET"], "path": "/payments/*", "scope": "payments:read"},
            {
                "methods": ["DELETE"],
                "path": "/payments/*",
                "scope": "payments:delete",
                "approval": "required",
            },
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _payments(deleted: list[tuple[str, bytes]]) -> FastAPI:
    app = FastAPI()

    @app.delete("/payments/{pid}")
    async def delete(pid: str, request: Request) -> dict[str, Any]:
        deleted.append((pid, await request.body()))
        return {"pid": pid, "deleted": True}

    return app


@contextmanager
def _webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A plain HTTP receiver for approvals.notify_url (what a chat hook would be)."""
    notices: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            notices.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", notices
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    kind = request.param
    if kind == "postgresql":
        require_pg()
    tmp = tmp_path_factory.mktemp(f"approvals-{kind}")
    pki = make_pki(tmp)
    clock = OffsetClock()
    td = pki.dev.trust_domain.name
    (tmp / "registrations.yaml").write_text(_registrations(td))
    issuer_db = f"sqlite:///{tmp}/issuer.db" if kind == "sqlite" else str(PG_URL)
    issuer_log = f"issuer-{uid()}"
    with _webhook() as (hook_url, notices):
        yield from _env(kind, tmp, pki, clock, (issuer_db, issuer_log), hook_url, notices)


def _env(
    kind: str,
    tmp: Path,
    pki: Pki,
    clock: OffsetClock,
    issuer_db_log: tuple[str, str],
    hook_url: str,
    notices: list[dict[str, Any]],
) -> Iterator[Env]:
    td = pki.dev.trust_domain.name
    issuer_db, issuer_log = issuer_db_log
    issuer_app = create_app(
        IssuerConfig(
            registrations=tmp / "registrations.yaml",
            issuer=ISS,
            port=0,
            cert=pki.cert("issuer"),
            key=pki.key("issuer"),
            bundle=pki.dev.bundle,
            keys_dir=tmp / "issuer-keys",
            database_url=issuer_db,
            log_name=issuer_log,
            admins=(SpiffeIdPattern.parse(f"spiffe://{td}/admin/*"),),
            log_key=tmp / "issuer-log.pem",
            approvals=ApprovalSettings(
                # The planner is an approver too: still never of its own requests.
                approvers=(
                    SpiffeIdPattern.parse(f"spiffe://{td}/admin/*"),
                    SpiffeIdPattern.parse(f"spiffe://{td}/agent/planner"),
                ),
                # Each service files only for itself (envoy stands in for "ledger").
                services={
                    "payments": (SpiffeIdPattern.parse(f"spiffe://{td}/svc/payments"),),
                    "ledger": (SpiffeIdPattern.parse(f"spiffe://{td}/proxy/envoy"),),
                },
                timeout=TIMEOUT,
                notify_url=hook_url,
            ),
        ),
        clock=clock,
    )
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
        deleted: list[tuple[str, bytes]] = []
        verifier = AxidVerifier(
            _payments(deleted), VerifierConfig.from_file(config_path), clock=clock
        )
        source = FileSource(pki.cert("payments"), pki.key("payments"), pki.dev.bundle)
        governed = ServerThread(
            uvicorn_config(verifier, source=source, log_level="warning", lifespan="on")
        ).start()
        servers.append(governed)
        e = Env(
            kind,
            tmp,
            pki,
            clock,
            issuer,
            governed,
            issuer_db,
            issuer_log,
            log_url,
            log_name,
            deleted,
            notices,
        )
        try:
            yield e
        finally:
            e.close()
            for log_db, name in ((log_url, log_name), (issuer_db, issuer_log)):
                report = verify_log(DatabaseSource(log_db, name))
                assert report.ok, (name, report.first_bad)
    finally:
        for server in reversed(servers):
            server.stop()


def reason(r: httpx.Response) -> str:
    return "ok" if r.status_code == 200 else str(r.json()["reason"])


def test_approved_once_with_the_approver_recorded(env: Env) -> None:
    token = env.token()
    approval_id = env.filed("/payments/p1", token, body=b"why")
    assert env.filed("/payments/p1", token, body=b"why") == approval_id  # pending: reused
    listed = env.at_issuer("admin").approvals("pending")
    assert approval_id in [a["id"] for a in listed]
    # Its own agent may not approve it, approver or not.
    with pytest.raises(IssuerError) as refused:
        env.at_issuer("planner").decide(approval_id, "approve")
    assert refused.value.reason == "forbidden"
    approval = env.approved(approval_id)
    assert env.at_issuer("planner").approval(approval_id)["token"] == approval  # same each poll
    allowed = env.delete("/payments/p1", token, approval=approval, body=b"why")
    assert allowed.status_code == 200, allowed.text
    assert env.deleted[-1] == ("p1", b"why")
    entry = env.entries()[-1]
    assert entry["decision"] == "allow" and entry["path"] == "/payments/p1"
    admin = env.pki.spiffe_id("admin")
    assert approval_id in entry["note"] and admin in entry["note"]
    again = env.delete("/payments/p1", token, approval=approval, body=b"why")
    assert reason(again) == "approval_invalid"
    issuer = env.issuer_entries()
    decided = [e for e in issuer if e["path"] == f"/v1/approvals/{approval_id}/decision"]
    assert [(e["decision"], e["reason"], e["peer"]) for e in decided] == [
        ("deny", "forbidden", env.pki.spiffe_id("planner")),
        ("allow", "ok", admin),
    ]
    filed = [e for e in issuer if e["path"] == "/v1/approvals" and approval_id in e["note"]]
    assert len(filed) == 2 and filed[0]["peer"] == env.pki.spiffe_id("payments")
    # approvals.notify_url got the new request (the reuse is no new request).
    wait_for(lambda: any(n["id"] == approval_id for n in env.notices), what="the notice")
    notice = next(n for n in env.notices if n["id"] == approval_id)
    assert notice["req"]["path"] == "/payments/p1" and "token" not in notice


@pytest.mark.parametrize("case", ["path", "body", "agent", "run", "certificate", "query"])
def test_an_approval_binds_one_exact_request(env: Env, case: str) -> None:
    run = f"run-{uid()}"
    token = env.token(run=run)
    approval = env.approved(env.filed("/payments/p2", token, body=b"a"))
    path, body, who, used_token = "/payments/p2", b"a", "planner", token
    if case == "path":
        path = "/payments/p3"
    elif case == "query":
        path = "/payments/p2?all=1"
    elif case == "body":
        body = b"b"
    elif case == "agent":
        who, used_token = "worker", env.token("worker", run=f"run-{uid()}")
    elif case == "run":
        used_token = env.token(run=f"run-{uid()}")
    elif case == "certificate":  # the planner's SPIFFE ID, another certificate
        who, used_token = "planner2", env.token("planner2", run=run)
    r = env.delete(path, used_token, who=who, approval=approval, body=body)
    assert reason(r) == "approval_invalid", r.text
    assert env.entries()[-1]["reason"] == "approval_invalid"
    # The exact request still passes (the refusals consumed nothing).
    assert reason(env.delete("/payments/p2", token, approval=approval, body=b"a")) == "ok"


def test_expired_approval_token(env: Env) -> None:
    token_run = f"run-{uid()}"
    token = env.token(run=token_run)
    approval = env.approved(env.filed("/payments/p4", token))
    env.clock.advance(310)
    try:
        fresh = env.token(run=token_run)
        r = env.delete("/payments/p4", fresh, approval=approval)
        assert reason(r) == "approval_expired"
        assert env.entries()[-1]["reason"] == "approval_expired"
    finally:
        env.clock.advance(-310)


def test_undecided_request_expires_and_is_never_allowed(env: Env) -> None:
    run = f"run-{uid()}"
    token = env.token(run=run)
    approval_id = env.filed("/payments/p5", token)
    env.clock.advance(TIMEOUT + 1)
    try:
        assert env.at_issuer("planner").approval(approval_id)["status"] == "expired"
        with pytest.raises(IssuerError) as late:
            env.at_issuer("admin").decide(approval_id, "approve")
        assert late.value.reason == "approval_expired"
        assert "token" not in env.at_issuer("planner").approval(approval_id)
        fresh = env.token(run=run)
        assert env.filed("/payments/p5", fresh) != approval_id  # a new request, not allowed
        expiries = [e for e in env.issuer_entries() if e["reason"] == "approval_expired"]
        assert any(approval_id in e["note"] for e in expiries)
    finally:
        env.clock.advance(-(TIMEOUT + 1))


def test_denied_and_the_cli(env: Env) -> None:
    from axid.cli._app import app

    runner = CliRunner()
    d = env.pki.dev.directory

    def axid(name: str, *args: str) -> Any:
        conn = ["--issuer", env.issuer_url, "--cert", str(d / f"{name}.pem")]
        conn += ["--key", str(d / f"{name}.key"), "--bundle", str(env.pki.dev.bundle)]
        return runner.invoke(app, ["approvals", *args, *conn])

    token = env.token()
    first = env.filed("/payments/p6", token)
    listed = axid("admin", "list", "--status", "pending")
    assert listed.exit_code == 0 and first in listed.stdout
    shown = axid("admin", "show", first)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["req"]["path"] == "/payments/p6"
    assert axid("admin", "deny", first, "--note", "no").exit_code == 0
    waited = axid("planner", "wait", first, "--interval", "0.1")
    assert waited.exit_code == 1 and waited.stdout == ""
    second = env.filed("/payments/p6", token)  # filed anew
    assert second != first
    assert axid("admin", "approve", second, "--note", "ok").exit_code == 0
    waited = axid("planner", "wait", second, "--interval", "0.1")
    assert waited.exit_code == 0
    approval = waited.stdout.strip()
    assert reason(env.delete("/payments/p6", token, approval=approval)) == "ok"
    # Another workload may not read the request.
    assert axid("worker", "show", second).exit_code == 1


def test_async_client(env: Env) -> None:
    """AsyncIssuerClient: the approver's and the agent's calls, as an asyncio runtime makes them."""
    import asyncio

    from axid.issuer.client import AsyncIssuerClient

    token = env.token()
    approval_id = env.filed("/payments/p7", token)

    async def decide_and_poll() -> str:
        admin = AsyncIssuerClient(env.issuer_url, env.source("admin"))
        agent = AsyncIssuerClient(env.issuer_url, env.source("planner"))
        try:
            assert approval_id in [a["id"] for a in await admin.approvals("pending")]
            assert (await admin.decide(approval_id, "approve"))["status"] == "approved"
            doc = await agent.approval(approval_id)
            return str(doc["token"])
        finally:
            await admin.aclose()
            await agent.aclose()

    approval = asyncio.run(decide_and_poll())
    assert reason(env.delete("/payments/p7", token, approval=approval)) == "ok"


def _filing_doc(env: Env, service: str) -> dict[str, Any]:
    """A well-formed filing body, as a verifier sends it."""
    return {
        "service": service,
        "tenant": "acme",
        "agent": "planner",
        "run": f"run-{uid()}",
        "sub": env.pki.spiffe_id("planner"),
        "cnf": {"x5t#S256": "A" * 43},
        "req": {"method": "DELETE", "path": "/payments/p9", "body_sha256": "0" * 64},
        "scope": "payments:delete",
        "jti": None,
        "approvers": None,
    }


@pytest.mark.parametrize(
    ("who", "service"),
    [
        ("payments", "ledger"),  # another configured service
        ("payments", "billing"),  # a service that is not a key
        ("envoy", "payments"),  # a filer of another service
        ("worker", "payments"),  # a workload of the trust domain that files for nothing
    ],
)
def test_a_service_files_only_for_itself(env: Env, who: str, service: str) -> None:
    """approvals.services binds the filing SVID to the service it names (the approval
    token's aud): anything else is 403 forbidden, recorded, and nothing is filed."""

    def file(name: str, doc: dict[str, Any]) -> httpx.Response:
        ctx = client_context(env.source(name), server_id=env.pki.dev.spiffe_id("issuer"))
        with httpx.Client(verify=ctx, timeout=WAIT, trust_env=False) as c:
            return c.post(f"{env.issuer_url}/v1/approvals", json=doc)

    doc = _filing_doc(env, service)
    r = file(who, doc)
    assert r.status_code == 403 and r.json()["reason"] == "forbidden", r.text
    last = env.issuer_entries()[-1]
    assert (last["decision"], last["reason"]) == ("deny", "forbidden")
    assert (last["peer"], last["path"]) == (env.pki.spiffe_id(who), "/v1/approvals")
    assert doc["run"] not in [a["run"] for a in env.at_issuer("admin").approvals()]
    # The payments service still files for payments.
    ok = file("payments", _filing_doc(env, "payments"))
    assert ok.status_code == 201, ok.text
    assert ok.json()["id"] in [a["id"] for a in env.at_issuer("admin").approvals("pending")]


def test_approval_ids_read_as_command_line_arguments() -> None:
    """An id never starts with '-' (or '_'): `axid approvals approve ID` must not read
    it as an option (a leading '-' did, in about one id in 32)."""
    from axid.issuer.approval_store import _new_id

    ids = {_new_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(len(i) == 22 and i[0].isalnum() for i in ids)
