"""The issuer's runs and revocations tables, on SQLite files and PostgreSQL, with
several engines at once standing in for several issuer replicas."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from _issuer_helpers import db_url, uid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import SQLAlchemyError

from axid.issuer._mint_checks import MintChecks
from axid.issuer.store import (
    REVOCATION_KINDS,
    IssuerStore,
    MintCheck,
    Revocation,
    RunConflict,
    RunRecord,
)


@pytest.fixture(params=["sqlite", "pg"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return db_url(request.param, tmp_path)


def rec(
    run: str, *, parent: str | None = None, tenant: str = "acme", agent: str = "a"
) -> RunRecord:
    return RunRecord(
        run, tenant, agent, "spiffe://example.org/agent/a", parent, parent or run, 0, 1
    )


def race(n: int, target: Any) -> list[Any]:
    """Run ``target(i)`` on n threads released together; results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def work(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_bind_run_race_across_replicas(url: str) -> None:
    replicas = [IssuerStore.open(url) for _ in range(6)]
    try:
        run = f"run-{uid()}"
        parents = [f"p{i}-{uid()}" for i in range(6)]
        results = race(6, lambda i: replicas[i].bind_run(rec(run, parent=parents[i])))
        wins = [r for r in results if isinstance(r, tuple)]
        losses = [r for r in results if isinstance(r, RunConflict)]
        assert len(wins) == 1 and len(losses) == 5, results
        stored, created = wins[0]
        assert created
        assert all(loss.existing == stored and loss.what == "parent" for loss in losses)
        assert replicas[0].get_run(run) == stored
        # The same binding again, from any replica: fine, not created.
        assert replicas[3].bind_run(rec(run, parent=stored.parent)) == (stored, False)
    finally:
        for r in replicas:
            r.close()


def test_bind_run_compares_every_field(url: str) -> None:
    store = IssuerStore.open(url)
    try:
        run = f"run-{uid()}"
        store.bind_run(rec(run))
        for changed, what in (
            (rec(run, tenant="other"), "tenant"),
            (rec(run, agent="b"), "agent"),
            (rec(run, parent="x"), "parent"),
            (
                RunRecord(run, "acme", "a", "spiffe://example.org/agent/b", None, run, 0, 1),
                "workload",
            ),
        ):
            with pytest.raises(RunConflict) as info:
                store.bind_run(changed)
            assert info.value.what == what
    finally:
        store.close()


def test_revocation_seqs_are_unique_and_ordered(url: str) -> None:
    replicas = [IssuerStore.open(url) for _ in range(5)]
    try:
        start = replicas[0].last_revocation_seq()
        values = [f"run-{uid()}" for _ in range(5)]
        results = race(
            5,
            lambda i: replicas[i].revoke("run", values[i], "race", created_by="t", now_ms=1),
        )
        seqs = sorted(r[0].seq for r in results)
        assert len(set(seqs)) == 5 and seqs[0] > start
        page = replicas[1].revocations(start)
        assert [r.seq for r in page] == sorted(r.seq for r in page)
        assert {r.value for r in page} >= set(values)
    finally:
        for r in replicas:
            r.close()


def test_revoke_cascade_and_lookup(url: str) -> None:
    store = IssuerStore.open(url)
    try:
        u = uid()
        store.bind_run(rec(f"a-{u}"))
        store.bind_run(rec(f"b-{u}", parent=f"a-{u}"))
        store.bind_run(rec(f"c-{u}", parent=f"b-{u}"))
        store.bind_run(rec(f"d-{u}", parent=f"a-{u}"))
        store.bind_run(rec(f"x-{u}"))
        assert store.descendants(f"a-{u}") == [f"b-{u}", f"c-{u}", f"d-{u}"]
        first, cascaded = store.revoke("run", f"b-{u}", "why", created_by="admin", now_ms=5)
        assert [c.value for c in cascaded] == [f"c-{u}"]
        assert cascaded[0].reason == f"cascade from run b-{u}"
        again, more = store.revoke("run", f"b-{u}", "other", created_by="admin", now_ms=6)
        assert again == first and more == []
        assert store.find_revocation(runs=[f"c-{u}"]) == cascaded[0]
        assert store.find_revocation(runs=[f"a-{u}", f"d-{u}"]) is None
        assert store.find_revocation(jtis=["j"], agents=[f"ag-{u}"], tenants=[f"t-{u}"]) is None
        t, _ = store.revoke("tenant", f"t-{u}", "gone", created_by="admin", now_ms=7)
        assert store.find_revocation(runs=[f"x-{u}"], tenants=[f"t-{u}"]) == t
        assert store.find_revocation() is None
        with pytest.raises(ValueError):
            store.revoke("everything", "x", "y", created_by="a", now_ms=1)
        with pytest.raises(ValueError):
            store.revocations(-1)
    finally:
        store.close()


# --------------------------------------------------------------------------- mint checks


def test_check_mints_in_order(url: str) -> None:
    store = IssuerStore.open(url)
    try:
        u = uid()
        revoked, _ = store.revoke("run", f"r-{u}", "why", created_by="admin", now_ms=3)
        outcomes = store.check_mints(
            [
                MintCheck(rec(f"a-{u}"), runs=(f"a-{u}",), agents=("a",)),
                # Same run, other parent, in the same batch: the first one won.
                MintCheck(rec(f"a-{u}", parent=f"p-{u}"), runs=(f"a-{u}", f"p-{u}")),
                # A revoked ancestor: refused, and the run is NOT bound.
                MintCheck(rec(f"c-{u}", parent=f"r-{u}"), runs=(f"c-{u}", f"r-{u}")),
                MintCheck(rec(f"a-{u}"), runs=(f"a-{u}",)),  # the same binding: fine
                MintCheck(rec(f"d-{u}")),  # nothing to look up: bound only
            ]
        )
        first, conflict, refused, again, bare = outcomes
        assert first is None and again is None and bare is None
        assert isinstance(conflict, RunConflict) and conflict.what == "parent"
        assert conflict.existing == store.get_run(f"a-{u}")
        assert refused == revoked
        assert store.get_run(f"c-{u}") is None
        assert store.get_run(f"d-{u}") == rec(f"d-{u}")
        # The one-mint form raises the conflict.
        assert store.check_mint(rec(f"e-{u}"), runs=[f"e-{u}"], tenants=[f"t-{u}"]) is None
        with pytest.raises(RunConflict) as info:
            store.check_mint(rec(f"e-{u}", agent="b"), runs=[f"e-{u}"])
        assert info.value.what == "agent"
        assert store.check_mints([]) == []
    finally:
        store.close()


def test_next_check_sees_another_replicas_revocation(url: str) -> None:
    # No cache to go stale: each check reads the revocations table itself.
    minter, admin = IssuerStore.open(url), IssuerStore.open(url)
    try:
        for kind in ("tenant", "agent", "run", "jti"):
            u = uid()
            jti = f"J{u}".ljust(22, "x")
            child = rec(f"c-{u}", parent=f"p-{u}", agent=f"ag-{u}", tenant=f"t-{u}")
            values = {
                "jti": [jti],
                "run": [child.run, f"root-{u}", f"p-{u}"],
                "agent": [f"ag-{u}", f"parent-ag-{u}"],
                "tenant": [f"t-{u}"],
            }

            def check(
                child: RunRecord = child, values: dict[str, list[str]] = values
            ) -> Revocation | None:
                return minter.check_mint(
                    child,
                    jtis=values["jti"],
                    runs=values["run"],
                    agents=values["agent"],
                    tenants=values["tenant"],
                )

            assert check() is None
            first, _ = admin.revoke(kind, values[kind][-1], "now", created_by="a", now_ms=9)
            assert check() == first
            # The oldest matching revocation is the answer, whatever matched later.
            admin.revoke("run", child.run, "later", created_by="a", now_ms=10)
            assert check() == first
    finally:
        minter.close()
        admin.close()


def test_bound_run_takes_no_write_lock(tmp_path: Path) -> None:
    """Minting on a bound run only reads: it goes on while another connection holds
    SQLite's write lock (the decision log's commit, another replica's insert); only a
    new run's binding waits for the lock (and fails once the lock timeout passes)."""
    db = tmp_path / "state.db"
    store = IssuerStore.open(f"sqlite:///{db}", lock_timeout=0.2)
    try:
        store.bind_run(rec("bound"))
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            assert store.bind_run(rec("bound")) == (rec("bound"), False)
            assert store.check_mint(rec("bound"), runs=["bound"], tenants=["acme"]) is None
            with pytest.raises(RunConflict):
                store.check_mint(rec("bound", agent="b"), runs=["bound"])
            with pytest.raises(SQLAlchemyError):  # "database is locked", as the 503
                store.check_mint(rec("new"), runs=["new"])
            holder.execute("COMMIT")
        finally:
            holder.close()
        assert store.check_mint(rec("new"), runs=["new"]) is None
        assert store.get_run("new") == rec("new")
    finally:
        store.close()


def test_driver_errors_are_sqlalchemy_errors(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = IssuerStore.open(f"sqlite:///{db}")
    try:
        store.bind_run(rec("r1"))
        with sqlite3.connect(db) as other:
            other.execute("ALTER TABLE axid_issuer_revocation RENAME TO gone")
        for call in (
            lambda: store.check_mint(rec("r1"), runs=["r1"]),
            lambda: store.find_revocation(runs=["r1"]),
        ):
            with pytest.raises(SQLAlchemyError):
                call()
        # Runs do not need the revocations table (nothing to look up): still fine.
        assert store.check_mint(rec("r1")) is None
        with sqlite3.connect(db) as other:
            other.execute("ALTER TABLE gone RENAME TO axid_issuer_revocation")
        # The failed connections were dropped; the next ones work.
        assert store.check_mint(rec("r1"), runs=["r1"]) is None
    finally:
        store.close()


async def test_mint_checks_serve_concurrent_callers(tmp_path: Path) -> None:
    """The service's batcher: concurrent callers each get their own outcome, a
    cancelled caller disturbs nobody, a failed batch fails its callers only."""
    db = tmp_path / "state.db"
    store = IssuerStore.open(f"sqlite:///{db}")
    try:
        checks = MintChecks(store, parallel=1)
        revoked, _ = store.revoke("run", "bad", "why", created_by="admin", now_ms=1)
        calls = [MintCheck(rec(f"r{i}"), runs=(f"r{i}",)) for i in range(20)]
        calls += [
            MintCheck(rec("bad"), runs=("bad",)),
            MintCheck(rec("r3", agent="b"), runs=("r3",)),  # queued behind r3's binding
        ]
        outcomes = await asyncio.gather(*(checks.run(c) for c in calls))
        assert outcomes[:20] == [None] * 20 and outcomes[20] == revoked
        assert isinstance(outcomes[21], RunConflict) and outcomes[21].what == "agent"
        assert all(store.get_run(f"r{i}") == rec(f"r{i}") for i in range(20))

        gone = asyncio.ensure_future(checks.run(MintCheck(rec("c1"))))
        others = [asyncio.ensure_future(checks.run(MintCheck(rec(f"c{i}")))) for i in range(2, 6)]
        await asyncio.sleep(0)
        gone.cancel()
        assert await asyncio.gather(*others) == [None] * 4

        with sqlite3.connect(db) as other:
            other.execute("ALTER TABLE axid_issuer_revocation RENAME TO gone")
        failed = await asyncio.gather(
            *(checks.run(MintCheck(rec("r1"), runs=("r1",))) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(f, SQLAlchemyError) for f in failed), failed
        with sqlite3.connect(db) as other:
            other.execute("ALTER TABLE gone RENAME TO axid_issuer_revocation")
        assert await checks.run(MintCheck(rec("r1"), runs=("r1",))) is None
    finally:
        store.close()


# The revocation lookup (hand-written SQL with IN lists of any length) against a model.
_VALUES = st.sampled_from(["a", "b", "c", "d", "e"])
_LOOKUP = st.lists(_VALUES | st.just(""), max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    revocations=st.lists(st.tuples(st.sampled_from(REVOCATION_KINDS), _VALUES), max_size=10),
    jtis=_LOOKUP,
    runs=_LOOKUP,
    agents=_LOOKUP,
    tenants=_LOOKUP,
)
def test_find_revocation_matches_a_model(
    revocations: list[tuple[str, str]],
    jtis: list[str],
    runs: list[str],
    agents: list[str],
    tenants: list[str],
) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = IssuerStore.open(f"sqlite:///{d}/state.db")
        try:
            stored = [
                store.revoke(kind, value, "p", created_by="t", now_ms=1, cascade=False)[0]
                for kind, value in revocations
            ]
            wanted = {"jti": jtis, "run": runs, "agent": agents, "tenant": tenants}
            hits = [r for r in stored if r.value in wanted[r.kind]]
            expected = min(hits, key=lambda r: r.seq) if hits else None
            assert store.find_revocation(jtis=jtis, runs=runs, agents=agents, tenants=tenants) == (
                expected
            )
            outcome = store.check_mint(
                rec("run-x"), jtis=jtis, runs=runs, agents=agents, tenants=tenants
            )
            assert outcome == expected
            assert (store.get_run("run-x") is None) == (expected is not None)
        finally:
            store.close()
