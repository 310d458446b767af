"""The issuer's background approvals expiry sweep (DESIGN.md "Approvals"): an
undecided request's expiry is recorded in the issuer's log without any further
approvals request, once, also when two replicas sweep the same table; the sweep
survives a database error. Real issuer under uvicorn over mTLS, SQLite and
PostgreSQL; real time (approvals.timeout 1 s), polled with generous deadlines.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _tls_helpers import WAIT, run_server, wait_for
from _verifier_helpers import PG_URL, Pki, log_entries, make_pki, require_pg
from sqlalchemy import text

from axid.audit.store import make_engine
from axid.issuer.app import create_app
from axid.issuer.approval_settings import ApprovalSettings
from axid.issuer.approval_store import ApprovalStore
from axid.issuer.config import IssuerConfig
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeIdPattern
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config

pytestmark = pytest.mark.timeout(180)

GENEROUS = 60.0  # "eventually": far above the 0.5 s sweep interval


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        require_pg()
        return str(PG_URL)
    return f"sqlite:///{tmp_path}/issuer.db"


def _issuer(tmp: Path, pki: Pki, db_url: str, log: str) -> Any:
    td = pki.dev.trust_domain.name
    registration = {
        "spiffe_id": f"spiffe://{td}/agent/planner",
        "tenant": "acme",
        "agents": ["planner"],
        "audiences": ["payments"],
        "scope": "payments:delete",
    }
    (tmp / "registrations.yaml").write_text(json.dumps({"registrations": [registration]}))
    return create_app(
        IssuerConfig(
            registrations=tmp / "registrations.yaml",
            issuer="https://issuer.axid.test",
            port=0,
            cert=pki.cert("issuer"),
            key=pki.key("issuer"),
            bundle=pki.dev.bundle,
            keys_dir=tmp / "issuer-keys",
            database_url=db_url,
            log_name=log,
            log_key=tmp / "issuer-log.pem",
            approvals=ApprovalSettings(
                approvers=(SpiffeIdPattern.parse(f"spiffe://{td}/admin/*"),),
                services={"payments": (SpiffeIdPattern.parse(f"spiffe://{td}/svc/payments"),)},
                timeout=1,
            ),
        )
    )


def _file(pki: Pki, issuer_url: str) -> str:
    """File one request as the payments service does; its id."""
    source = FileSource(pki.cert("payments"), pki.key("payments"), pki.dev.bundle)
    ctx = client_context(source, server_id=pki.dev.spiffe_id("issuer"))
    doc = {
        "service": "payments",
        "tenant": "acme",
        "agent": "planner",
        "run": f"run-{uid()}",
        "sub": pki.spiffe_id("planner"),
        "cnf": {"x5t#S256": "A" * 43},
        "req": {"method": "DELETE", "path": f"/payments/{uid()}", "body_sha256": "0" * 64},
        "scope": "payments:delete",
        "jti": None,
        "approvers": None,
    }
    with httpx.Client(verify=ctx, timeout=WAIT, trust_env=False) as c:
        r = c.post(f"{issuer_url}/v1/approvals", json=doc)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _expiries(db_url: str, log: str, approval_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in log_entries(db_url, log)
        if e["reason"] == "approval_expired" and approval_id in (e.get("note") or "")
    ]


@pytest.fixture
def issuer(tmp_path: Path, db_url: str) -> Iterator[tuple[Pki, str, str]]:
    pki = make_pki(tmp_path)
    log = f"issuer-{uid()}"
    app = _issuer(tmp_path, pki, db_url, log)
    with run_server(
        uvicorn_config(app, source=app.state.components.source, log_level="warning")
    ) as server:
        yield pki, f"https://127.0.0.1:{server.port}", log


def test_expiry_is_recorded_without_a_request(issuer: tuple[Pki, str, str], db_url: str) -> None:
    pki, url, log = issuer
    approval_id = _file(pki, url)
    # No approvals request after the filing: only the background sweep can record it.
    wait_for(lambda: bool(_expiries(db_url, log, approval_id)), GENEROUS, "the expiry")
    (entry,) = _expiries(db_url, log, approval_id)
    assert entry["decision"] == "deny"
    time.sleep(1.5)  # a few more sweeps: still recorded once
    assert len(_expiries(db_url, log, approval_id)) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # drops the table: own file only
def test_the_sweep_survives_a_database_error(
    issuer: tuple[Pki, str, str], db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The approvals table vanishes under the running issuer (the sweep's query fails
    and is logged); once it is back, the next expiry is recorded all the same."""
    pki, url, log = issuer
    _file(pki, url)  # the desk and its table exist
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE axid_issuer_approval"))
        wait_for(lambda: "approvals expiry sweep failed" in caplog.text, GENEROUS, "a warning")
        ApprovalStore(engine).create_schema()
    finally:
        engine.dispose()
    approval_id = _file(pki, url)
    wait_for(lambda: bool(_expiries(db_url, log, approval_id)), GENEROUS, "the expiry")


def test_two_replicas_record_each_expiry_once(db_url: str) -> None:
    """Two stores on their own engines expire the same due rows at the same moment:
    each row is returned (so recorded) by exactly one of them."""
    engines = [make_engine(db_url), make_engine(db_url)]
    try:
        stores = [ApprovalStore(e) for e in engines]
        stores[0].create_schema()
        # In the past: other tests' pending rows (real time) are not made due by us.
        then = int(time.time()) - 30
        mine = set()
        for _ in range(20):
            fields = {
                "filed_by": "spiffe://example.org/svc/payments",
                "aud": "payments",
                "tenant": "acme",
                "agent": "planner",
                "run": f"run-{uid()}",
                "sub": "spiffe://example.org/agent/planner",
                "cnf": "A" * 43,
                "method": "DELETE",
                "path": f"/payments/{uid()}",
                "body_sha256": "0" * 64,
                "scope": None,
                "jti": None,
                "approvers": None,
            }
            record, new = stores[0].file(fields, now=then, timeout=1)
            assert new
            mine.add(record.id)
        barrier = threading.Barrier(2)
        results: list[list[str]] = [[], []]

        def sweep(i: int) -> None:
            barrier.wait()
            results[i] = [r.id for r in stores[i].expire_due(then + 1)]

        threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GENEROUS)
        swept = results[0] + results[1]
        assert len(swept) == len(set(swept))  # nobody expired a row twice
        assert mine <= set(swept)
        assert {r.status for r in (stores[1].get(i) for i in mine) if r} == {"expired"}
        assert mine.isdisjoint(r.id for r in stores[0].expire_due(then + 1))
    finally:
        for e in engines:
            e.dispose()
