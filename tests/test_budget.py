"""verifier.BudgetLedger: budgets shared by every replica (DESIGN "Approvals, delegation
and budgets"), on a real SQLite file and a real PostgreSQL database.

Attacks first: spending past a limit (one tree, its spawned children, a tenant over a
day), rows left half-reserved, a reservation kept for a request that was not allowed
in the end, malformed inputs, a broken database (must deny, never allow). Then the
plain cases, settle, and ``axid budget show``. The race between two replicas is
tests/test_budget_race.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _budget_helpers import BACKENDS, fresh_database
from _verifier_helpers import (
    ISSUER,
    Pki,
    call,
    http_scope,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)
from sqlalchemy import text
from typer.testing import CliRunner

from axid.audit.store import make_engine
from axid.audit.verify import DatabaseSource, verify_log
from axid.cli import app as cli
from axid.tokens import mint, verify
from verifier import BudgetLedger, CheckResult, IdentityConfig, LogConfig, VerifierConfig
from verifier.budget import BudgetRow, read_budgets
from verifier.checks import RequestInfo
from verifier.decision import STATUS, VerifiedAction
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

KEY = new_signing_key()
DAY = 86_400
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def uid() -> str:
    return uuid.uuid4().hex[:10]


def action(run: str, chain: tuple[str, ...] = (), tenant: str = "acme") -> VerifiedAction:
    """A verified action from a real token (minted and verified)."""
    now = int(time.time())
    token = mint(
        key=KEY,
        iss=ISSUER,
        sub="spiffe://example.org/agent/planner",
        aud="payments",
        tenant=tenant,
        agent="planner",
        run=run,
        spawn_parent=chain[-1] if chain else None,
        chain=list(chain),
        scope="payments:read",
        cnf_x5t_s256="A" * 43,
        now=now,
        ttl=120,
    )
    claims = verify(token, key_set(KEY), issuer=ISSUER, audience="payments", now=now)
    return VerifiedAction.from_claims(claims)


def request(cost: int) -> RequestInfo:
    info = RequestInfo("GET", "/spend/1", b"", (), None)
    return info.for_rule(RouteRule("/spend/*", scope="payments:read", cost=cost))


def rows(url: str) -> dict[tuple[str, str, str], BudgetRow]:
    return {(r.kind, r.name, r.day): r for r in read_budgets(url)}


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock()


def ledger_for(url: str, clock: Clock, **limits: Any) -> BudgetLedger:
    return BudgetLedger(url, clock=clock, lock_timeout=10.0, **limits)


# --------------------------------------------------------------------------- attacks


async def test_a_tree_cannot_spend_past_its_limit(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=30)
    try:
        root = f"root-{uid()}"
        for _ in range(3):
            assert (await ledger(action(root), request(10))).allow
        # The root again, and a child it spawned: the tree is full.
        for who in (action(root), action(f"child-{uid()}", chain=(root,))):
            denied = await ledger(who, request(10))
            assert not denied.allow and denied.reason == "budget_exceeded"
            assert denied.note == f"tree {root}: 30/30, cost 10"
        # A grandchild too (chain[0] is the tree), even at cost 1.
        deep = action(f"gc-{uid()}", chain=(root, f"child-{uid()}"))
        assert (await ledger(deep, request(1))).reason == "budget_exceeded"
        # Another tree has its own limit.
        assert (await ledger(action(f"root-{uid()}"), request(30))).allow
        # A single request larger than the whole limit.
        huge = await ledger(action(f"root-{uid()}"), request(31))
        assert huge.reason == "budget_exceeded" and huge.note.endswith(": 0/30, cost 31")
        assert rows(db)[("tree", root, "")].spent == 30
    finally:
        ledger.close()


async def test_a_tenant_cannot_spend_past_its_day(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=100, per_tenant_daily=25)
    try:
        trees = [f"t-{uid()}" for _ in range(3)]
        assert (await ledger(action(trees[0]), request(10))).allow
        assert (await ledger(action(trees[1]), request(10))).allow
        denied = await ledger(action(trees[2]), request(10))
        assert denied.reason == "budget_exceeded"
        assert denied.note == f"tenant acme on {day_of(T0)}: 20/25, cost 10"
        # The tree row of the denied request was rolled back with it, not left reserved.
        before = rows(db)
        assert ("tree", trees[2], "") not in before
        assert before[("tenant", "acme", day_of(T0))].spent == 20
        # Another tenant, and the next UTC day, have their own budgets.
        assert (await ledger(action(trees[2], tenant="globex"), request(10))).allow
        clock.now += DAY
        assert (await ledger(action(trees[2]), request(10))).allow
        after = rows(db)
        assert after[("tenant", "acme", day_of(T0 + DAY))].spent == 10
        assert after[("tenant", "acme", day_of(T0))].spent == 20
        assert after[("tree", trees[2], "")].spent == 20  # globex's and today's
    finally:
        ledger.close()


async def test_undo_releases_once(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=20, per_tenant_daily=1000)
    try:
        tree = f"t-{uid()}"
        first = await ledger(action(tree), request(10))
        assert first.allow and first.undo is not None
        second = await ledger(action(tree), request(10))
        assert second.allow
        assert (await ledger(action(tree), request(10))).reason == "budget_exceeded"
        await first.undo()
        await first.undo()  # a second call gives back nothing more
        now = rows(db)
        assert now[("tree", tree, "")].spent == 10
        assert now[("tenant", "acme", day_of(T0))].spent == 10
        assert (await ledger(action(tree), request(10))).allow
        assert (await ledger(action(tree), request(10))).reason == "budget_exceeded"
    finally:
        ledger.close()


@contextmanager
def row_locked(url: str) -> Iterator[None]:
    """Another connection holds the budget table's write lock (SQLite) or its rows'
    locks (PostgreSQL), so a reservation waits."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with psycopg.connect(url) as pg, pg.transaction():
        pg.execute("SELECT spent FROM axid_budget FOR UPDATE")
        yield


async def test_released_when_the_check_is_cancelled_mid_reservation(db: str, clock: Clock) -> None:
    """The pipeline's check_timeout cancels a check whose reservation is still waiting
    in its thread: once that reservation commits, it is given back."""
    ledger = ledger_for(db, clock, per_tree=100)
    try:
        tree = f"t-{uid()}"
        assert (await ledger(action(tree), request(10))).allow
        with row_locked(db):
            check = asyncio.ensure_future(ledger(action(tree), request(10)))
            await asyncio.sleep(0.2)  # let it reach the database and wait there
            check.cancel()
            with pytest.raises(asyncio.CancelledError):
                await check
            assert ledger._pending  # its reservation is still in flight
            clock.now += 5  # what the release writes, and only the release
        while ledger._pending:  # the orphaned reservation, then its release
            await asyncio.sleep(0.05)
        row = rows(db)[("tree", tree, "")]
        assert (row.spent, row.updated_at) == (10, int(T0) + 5)
    finally:
        ledger.close()


async def test_a_database_error_denies(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=100)
    try:
        tree = f"t-{uid()}"
        assert (await ledger(action(tree), request(10))).allow  # creates the table
        engine = make_engine(db)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE axid_budget"))
        engine.dispose()
        result = await ledger(action(tree), request(10))
        assert not result.allow and result.reason is None  # custom_check_denied
        assert result.note.startswith("budget store unavailable (")
        # A zero cost needs no database: still allowed.
        assert (await ledger(action(tree), request(0))).allow
        with pytest.raises(Exception, match="axid_budget"):
            await ledger.settle(tree, "acme", 1)
    finally:
        ledger.close()
    nowhere = BudgetLedger("postgresql://postgres@127.0.0.1:1/none", per_tree=5, lock_timeout=1)
    try:
        result = await nowhere(action(f"t-{uid()}"), request(1))
        assert not result.allow and result.note.startswith("budget store unavailable (")
    finally:
        nowhere.close()


async def test_no_rule_no_allow(tmp_path: Path) -> None:
    ledger = BudgetLedger(f"sqlite:///{tmp_path}/b.db", per_tree=5)
    try:
        result = await ledger(action("r"), RequestInfo("GET", "/x", b"", (), None))
        assert not result.allow and "no route rule" in result.note
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"per_tree": None, "per_tenant_daily": None},
        {"per_tree": True},
        {"per_tree": -1},
        {"per_tree": 1.0},
        {"per_tree": "10"},
        {"per_tenant_daily": 10**15 + 1},
    ],
)
def test_limits_are_strict(tmp_path: Path, limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BudgetLedger(f"sqlite:///{tmp_path}/b.db", **limits)


@pytest.mark.parametrize(
    ("tree", "tenant", "delta"),
    [
        ("t", "acme", True),
        ("t", "acme", 1.0),
        ("t", "acme", "1"),
        ("t", "acme", 10**12 + 1),
        ("t", "acme", -(10**12) - 1),
        ("", "acme", 1),
        ("t", "", 1),
        ("t\n", "acme", 1),
        ("t" * 513, "acme", 1),
        (None, "acme", 1),
    ],
)
async def test_settle_is_strict(tmp_path: Path, tree: Any, tenant: Any, delta: Any) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    ledger = BudgetLedger(url, per_tree=5)
    try:
        with pytest.raises(ValueError):
            await ledger.settle(tree, tenant, delta)
        assert not Path(url.removeprefix("sqlite:///")).exists()  # refused before any SQL
    finally:
        ledger.close()


def test_rule_cost_is_strict() -> None:
    assert RouteRule("/a").cost == 0
    assert RouteRule.from_dict({"path": "/a", "cost": 250}).cost == 250
    for bad in (True, False, -1, 2.5, "5", None, 10**12 + 1):
        with pytest.raises(ValueError, match="cost"):
            RouteRule.from_dict({"path": "/a", "cost": bad})
    with pytest.raises(ValueError, match="cost"):
        RouteRule("/a", governed=False, cost=1)


def test_check_result_reason_is_a_403_code() -> None:
    assert CheckResult(False, "x").deny_reason == "custom_check_denied"
    assert CheckResult(False, "x", "budget_exceeded").deny_reason == "budget_exceeded"
    for bad in ("ok", "audit_unavailable", "token_expired", "no_such_reason", 403):
        with pytest.raises(ValueError):
            CheckResult(False, "x", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CheckResult(True, "x", "revoked")  # an allow has no reason

    async def undo() -> None:
        return None

    with pytest.raises(ValueError):
        CheckResult(False, "x", undo=undo)  # nothing was reserved for a deny
    assert STATUS["budget_exceeded"] == 403


# --------------------------------------------------------------------------- settle


async def test_settle_corrects_both_rows_or_neither(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=50, per_tenant_daily=60)
    try:
        tree, today = f"t-{uid()}", day_of(T0)
        assert (await ledger(action(tree), request(20))).allow
        after = await ledger.settle(tree, "acme", -15)  # it cost 5, not 20
        assert [(r.kind, r.spent, r.limit) for r in after] == [("tree", 5, 50), ("tenant", 5, 60)]
        # Real spend is recorded even past the limit; reservations then stop.
        await ledger.settle(tree, "acme", 50)
        now = rows(db)
        assert now[("tree", tree, "")].spent == 55 and now[("tenant", "acme", today)].spent == 55
        assert (await ledger(action(tree), request(1))).reason == "budget_exceeded"
        # A refund below zero on either row changes neither.
        other = f"t-{uid()}"
        with pytest.raises(ValueError, match="below 0"):
            await ledger.settle(other, "acme", -10)
        now = rows(db)
        assert now[("tenant", "acme", today)].spent == 55
        assert ("tree", other, "") not in now or now[("tree", other, "")].spent == 0
    finally:
        ledger.close()


async def test_zero_cost_touches_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    ledger = BudgetLedger(url, per_tree=0)
    try:
        result = await ledger(action("r"), request(0))
        assert result.allow and result.undo is None and result.note == ""
        assert not (tmp_path / "b.db").exists()
        assert (await ledger(action("r"), request(1))).note == "tree r: 0/0, cost 1"
    finally:
        ledger.close()


# --------------------------------------------------------------------------- in the verifier


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("budget"))


def verifier_for(pki: Pki, tmp_path: Path, checks: list[Any], **rule: Any) -> AxidVerifier:
    config = VerifierConfig(
        service="payments",
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(bundle=pki.dev.bundle),
        jwks=key_set(KEY),
        revocations=StaticRevocations(),
        log=LogConfig(
            url=f"sqlite:///{tmp_path}/log.db", key=tmp_path / "log.pem", lock_timeout=0.3
        ),
        rules=[RouteRule("/spend/*", scope="payments:read", **rule)],
        checks=checks,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return AxidVerifier(app, config)


async def test_verifier_denies_budget_exceeded_and_records_it(pki: Pki, tmp_path: Path) -> None:
    budget = f"sqlite:///{tmp_path}/budget.db"
    ledger = BudgetLedger(budget, per_tree=20)
    verifier = verifier_for(pki, tmp_path, [ledger], cost=10)
    await verifier.startup()
    try:
        token = token_for(pki, "planner", KEY, now=time.time(), run="root-1")
        chain = pki.chain_pem("planner")
        answers = [
            await call(verifier, http_scope(f"/spend/{i}", chain=chain, token=token))
            for i in range(3)
        ]
        assert [a.status for a in answers] == [200, 200, 403]
        assert answers[2].headers["www-authenticate"] == 'AXID error="budget_exceeded"'
        assert answers[2].json["reason"] == "budget_exceeded"
        entries = log_entries(f"sqlite:///{tmp_path}/log.db", "payments")
        assert [e["reason"] for e in entries] == ["ok", "ok", "budget_exceeded"]
        assert entries[1]["note"].startswith("budget: tree root-1: 20/20; tenant acme on ")
        assert entries[2]["note"] == "budget: tree root-1: 20/20, cost 10"
    finally:
        await verifier.shutdown()
        ledger.close()
    assert verify_log(DatabaseSource(f"sqlite:///{tmp_path}/log.db", "payments")).ok


async def test_released_when_a_later_check_denies(pki: Pki, tmp_path: Path) -> None:
    budget = f"sqlite:///{tmp_path}/budget.db"
    ledger = BudgetLedger(budget, per_tree=20)

    async def refuse(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        return CheckResult(False, "no")

    verifier = verifier_for(pki, tmp_path, [ledger, refuse], cost=10)
    await verifier.startup()
    try:
        token = token_for(pki, "planner", KEY, now=time.time(), run="root-2")
        for i in range(3):  # each would reserve 10 of 20 if kept
            answer = await call(
                verifier, http_scope(f"/spend/{i}", chain=pki.chain_pem("planner"), token=token)
            )
            assert answer.status == 403 and answer.json["reason"] == "custom_check_denied"
        assert rows(budget)[("tree", "root-2", "")].spent == 0
    finally:
        await verifier.shutdown()
        ledger.close()


async def test_released_when_the_single_use_claim_is_lost(pki: Pki, tmp_path: Path) -> None:
    """Two requests with one single-use token both pass the look at step 5 and reserve;
    the one whose claim comes second is ``replayed`` and gives its reservation back."""
    budget = f"sqlite:///{tmp_path}/budget.db"
    ledger = BudgetLedger(budget, per_tree=100)
    token = token_for(pki, "planner", KEY, now=time.time(), run="root-4")
    inner: list[int] = []

    async def interleave(action: VerifiedAction, request: RequestInfo) -> CheckResult:
        if not inner:  # the first request, reserved but not yet claimed: a second one
            inner.append(0)
            scope = http_scope("/spend/y", chain=pki.chain_pem("planner"), token=token)
            inner[0] = (await call(verifier, scope)).status
        return CheckResult(True)

    verifier = verifier_for(pki, tmp_path, [ledger, interleave], cost=10, single_use=True)
    await verifier.startup()
    try:
        scope = http_scope("/spend/x", chain=pki.chain_pem("planner"), token=token)
        answer = await call(verifier, scope)
        assert inner == [200]
        assert answer.status == 403 and answer.json["reason"] == "replayed"
        assert rows(budget)[("tree", "root-4", "")].spent == 10  # the winner's only
    finally:
        await verifier.shutdown()
        ledger.close()


async def test_released_when_the_log_cannot_record(pki: Pki, tmp_path: Path) -> None:
    budget = f"sqlite:///{tmp_path}/budget.db"
    ledger = BudgetLedger(budget, per_tree=20)
    verifier = verifier_for(pki, tmp_path, [ledger], cost=10)
    await verifier.startup()
    try:
        token = token_for(pki, "planner", KEY, now=time.time(), run="root-3")
        chain = pki.chain_pem("planner")
        assert (
            await call(verifier, http_scope("/spend/a", chain=chain, token=token))
        ).status == 200
        # Another connection holds the log's write lock: the append fails (503).
        locker = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            answer = await call(verifier, http_scope("/spend/b", chain=chain, token=token))
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert answer.status == 503 and answer.json["reason"] == "audit_unavailable"
        assert rows(budget)[("tree", "root-3", "")].spent == 10  # /spend/b's 10 released
        assert (
            await call(verifier, http_scope("/spend/c", chain=chain, token=token))
        ).status == 200
        entries = log_entries(f"sqlite:///{tmp_path}/log.db", "payments")
        assert [e["path"] for e in entries] == ["/spend/a", "/spend/c"]
    finally:
        await verifier.shutdown()
        ledger.close()


# --------------------------------------------------------------------------- axid budget show


async def test_budget_show(db: str, clock: Clock) -> None:
    ledger = ledger_for(db, clock, per_tree=100, per_tenant_daily=None)
    tree = f"t-{uid()}"
    try:
        assert (await ledger(action(tree), request(30))).allow
        assert (await ledger(action(f"t-{uid()}"), request(5))).allow
    finally:
        ledger.close()
    runner = CliRunner()
    result = runner.invoke(cli, ["budget", "show", "--db", db, "--tree", tree, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["budgets"] == [
        {
            "kind": "tree",
            "name": tree,
            "day": None,
            "spent": 30,
            "limit": 100,
            "left": 70,
            "updated_at": int(T0),
        }
    ]
    result = runner.invoke(cli, ["budget", "show", "--db", db, "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DAY", "SPENT", "LIMIT", "LEFT"]
    assert lines[1].split() == ["tenant", "acme", day_of(T0), "35", "-", "-"]
    result = runner.invoke(cli, ["budget", "show", "--db", db])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 4
    missing = runner.invoke(cli, ["budget", "show", "--db", f"{db}-missing"])
    assert missing.exit_code == 1 and "error:" in missing.output
