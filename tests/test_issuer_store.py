"""The issuer's runs and revocations tables, on SQLite files and PostgreSQL, with
several engines at once standing in for several issuer replicas."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from _issuer_helpers import db_url, uid

from axid.issuer.store import IssuerStore, RunConflict, RunRecord


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
