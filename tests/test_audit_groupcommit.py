"""Group-commit appender (axid.audit.log): concurrency, failures, processes, crashes.

Real SQLite files, the real PostgreSQL (when AXID_TEST_DATABASE_URL is set),
real subprocesses and a real SIGKILL.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from _audit_storage_helpers import check_log, db_url, fields, fresh_log
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.entry import DecisionFields, EntryError
from axid.audit.log import AuditUnavailable, DecisionLog, Receipt
from axid.audit.merkle import leaf_hash
from axid.audit.note import NoteSigner
from axid.audit.store import (
    LogKeyMismatch,
    LogStore,
    create_schema,
    generate_log_key,
    load_log_key,
    make_engine,
)

WORKER = Path(__file__).with_name("_audit_storage_worker.py")
CALLERS = 64


@pytest.fixture(params=["sqlite", "pg"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return db_url(request.param, tmp_path)


@pytest.fixture
def key_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AXID_KEY_PASSPHRASE", raising=False)
    path = tmp_path / "keys" / "log.pem"
    generate_log_key(path)
    return path


def _sqlite_file(url: str) -> str:
    return url.removeprefix("sqlite:///")


# --------------------------------------------------------------------------- in-process


async def test_concurrent_callers_are_group_committed(url: str, key_path: Path) -> None:
    per_caller = 20
    async with await DecisionLog.open(url, log=fresh_log(), key=key_path) as dl:

        async def caller(c: int) -> list[Receipt]:
            return [await dl.append(fields(c * 1000 + i)) for i in range(per_caller)]

        receipts = [r for rs in await asyncio.gather(*map(caller, range(CALLERS))) for r in rs]
        n = CALLERS * per_caller
        assert sorted(r.seq for r in receipts) == list(range(n))
        assert len({r.leaf_hash for r in receipts}) == n
        chk = check_log(dl.store, dl.vkey)
        assert chk.size == n
        # Many entries per checkpoint: group commit happened.
        assert len(chk.checkpoint_sizes) < n
        for r in receipts:
            assert chk.leaf_hashes[r.seq] == r.leaf_hash
            assert r.seq < r.checkpoint_size and r.checkpoint_size in chk.checkpoint_sizes
        # Each caller's own entries are in its call order.
        seqs_by_note = {e["note"]: e["seq"] for e in chk.entries}
        for c in range(CALLERS):
            mine = [seqs_by_note[f"n{c * 1000 + i}"] for i in range(per_caller)]
            assert mine == sorted(mine)


async def test_batch_bounds(tmp_path: Path, key_path: Path) -> None:
    url = db_url("sqlite", tmp_path)
    async with await DecisionLog.open(
        url, log=fresh_log(), key=key_path, max_batch=8, max_delay=0.05
    ) as dl:
        await asyncio.gather(*(dl.append(fields(i)) for i in range(CALLERS)))
        sizes = [0, *check_log(dl.store, dl.vkey).checkpoint_sizes]
        assert sizes[-1] == CALLERS
        assert all(0 < b - a <= 8 for a, b in itertools.pairwise(sizes))
    # Callers that arrive together within max_delay share one batch and one checkpoint.
    async with await DecisionLog.open(
        url, log=fresh_log(), key=key_path, max_batch=1000, max_delay=0.2
    ) as dl:
        rs = await asyncio.gather(*(dl.append(fields(i)) for i in range(10)))
        assert {r.checkpoint_size for r in rs} == {10}
        assert [s for s, _ in dl.store.checkpoints()] == [10]


async def test_batch_closes_once_the_previous_batch_size_is_back(
    tmp_path: Path, key_path: Path
) -> None:
    # Adaptive group commit: once as many entries wait as went into the previous
    # batch, the batch closes without waiting out max_delay (60 s here).
    url = db_url("sqlite", tmp_path)
    dl = await DecisionLog.open(url, log=fresh_log(), key=key_path, max_batch=5, max_delay=60)
    try:
        first = await asyncio.gather(*(dl.append(fields(i)) for i in range(5)))  # full batch
        again = await asyncio.gather(*(dl.append(fields(5 + i)) for i in range(5)))  # target 5
        assert {r.checkpoint_size for r in first} == {5}
        assert {r.checkpoint_size for r in again} == {10}
        fewer = [asyncio.ensure_future(dl.append(fields(10 + i))) for i in range(3)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in fewer)  # 3 < 5: waits for more (or max_delay)
    finally:
        await dl.close()  # commits the 3 at once
    assert {f.result().checkpoint_size for f in fewer} == {13}


async def test_bad_fields_fail_only_their_caller(url: str, key_path: Path) -> None:
    async with await DecisionLog.open(url, log=fresh_log(), key=key_path) as dl:
        bad: list[dict[str, object]] = [
            {"decision": "maybe", "reason": "ok"},
            {"decision": "allow"},
            {"decision": "allow", "reason": "ok", "seq": 5},
            {"decision": "allow", "reason": "ok", "surprise": "x"},
            {"decision": "allow", "reason": "ok", "tenant": 7},
        ]
        good = [fields(i) for i in range(20)]
        results = await asyncio.gather(
            *(dl.append(f) for f in [*good[:10], *bad, *good[10:]]), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == len(bad) and all(isinstance(e, EntryError) for e in errors)
        assert sorted(r.seq for r in results if isinstance(r, Receipt)) == list(range(20))
        with pytest.raises(EntryError):
            await dl.append("not a mapping")  # type: ignore[arg-type]
        assert check_log(dl.store, dl.vkey).size == 20


async def test_entries_are_what_was_validated(tmp_path: Path, key_path: Path) -> None:
    url = db_url("sqlite", tmp_path)
    async with await DecisionLog.open(url, log=fresh_log(), key=key_path, max_delay=0.05) as dl:
        f = fields(1)
        chain = ["run-0"]
        f["chain"] = chain
        task = asyncio.ensure_future(dl.append(f))
        await asyncio.sleep(0)  # queued, not yet committed
        f["decision"] = "bogus"
        chain.append(12345)  # type: ignore[arg-type]
        r = await task
        e = check_log(dl.store, dl.vkey).entries[r.seq]
        assert e["decision"] == "allow" and e["chain"] == ["run-0"]


async def test_sqlite_lock_failure_then_recovery(tmp_path: Path, key_path: Path) -> None:
    url = db_url("sqlite", tmp_path)
    async with await DecisionLog.open(url, log=fresh_log(), key=key_path, lock_timeout=0.2) as dl:
        await dl.append(fields(0))
        # Another writer holds the database lock longer than lock_timeout.
        holder = sqlite3.connect(_sqlite_file(url), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            results = await asyncio.gather(
                *(dl.append(fields(i)) for i in range(1, 9)), return_exceptions=True
            )
            assert all(isinstance(r, AuditUnavailable) for r in results), results
            assert dl.store.size() == 1  # nothing half-committed
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # The appender survived: the database is back, appends work again.
        rs = await asyncio.gather(*(dl.append(fields(i)) for i in range(10, 20)))
        assert sorted(r.seq for r in rs) == list(range(1, 11))
        assert check_log(dl.store, dl.vkey).size == 11


async def test_postgres_lock_failure_then_recovery(tmp_path: Path, key_path: Path) -> None:
    url = db_url("pg", tmp_path)
    log = fresh_log()
    async with await DecisionLog.open(url, log=log, key=key_path, lock_timeout=0.2) as dl:
        await dl.append(fields(0))
        # Another session holds this log's row lock longer than lock_timeout.
        with psycopg.connect(url) as holder:
            holder.execute("SELECT name FROM axid_audit_log WHERE name = %s FOR UPDATE", (log,))
            results = await asyncio.gather(
                *(dl.append(fields(i)) for i in range(1, 9)), return_exceptions=True
            )
            assert all(isinstance(r, AuditUnavailable) for r in results), results
            holder.rollback()
        assert dl.store.size() == 1
        rs = await asyncio.gather(*(dl.append(fields(i)) for i in range(10, 20)))
        assert sorted(r.seq for r in rs) == list(range(1, 11))
        assert check_log(dl.store, dl.vkey).size == 11


async def test_close_commits_pending_then_refuses(url: str, key_path: Path) -> None:
    dl = await DecisionLog.open(url, log=fresh_log(), key=key_path, max_delay=0.5)
    tasks = [asyncio.ensure_future(dl.append(fields(i))) for i in range(30)]
    await asyncio.sleep(0)
    await dl.close()  # does not wait out max_delay, commits what is queued
    assert sorted(t.result().seq for t in tasks) == list(range(30))
    with pytest.raises(AuditUnavailable):
        await dl.append(fields(99))
    await dl.close()  # idempotent


async def test_cancelled_caller_is_not_recorded(tmp_path: Path, key_path: Path) -> None:
    url = db_url("sqlite", tmp_path)
    async with await DecisionLog.open(url, log=fresh_log(), key=key_path, max_delay=0.2) as dl:
        doomed = asyncio.ensure_future(dl.append(fields(1, note="cancelled")))
        kept = asyncio.ensure_future(dl.append(fields(2)))
        await asyncio.sleep(0)
        doomed.cancel()
        r = await kept
        assert r.seq == 0
        entries = check_log(dl.store, dl.vkey).entries
        assert [e["note"] for e in entries] == ["n2"]


async def test_open_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AXID_KEY_PASSPHRASE", raising=False)
    url = db_url("sqlite", tmp_path)
    log = fresh_log()
    key = tmp_path / ".axid" / "keys" / "log.pem"
    with pytest.raises(ValueError):
        await DecisionLog.open(url, log=log, key=key)  # missing, and not asked to create
    async with await DecisionLog.open(url, log=log, key=key, create_key=True) as dl:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        vkey = dl.vkey
        assert vkey.startswith(f"axid/{log}+") and dl.origin == f"axid/{log}"
        await dl.append(fields(0))
    async with await DecisionLog.open(url, log=log, key=key, create_key=True) as dl:
        assert dl.vkey == vkey  # reused, not regenerated
        assert (await dl.append(fields(1))).seq == 1
    with pytest.raises(LogKeyMismatch):
        await DecisionLog.open(url, log=log, key=Ed25519PrivateKey.generate())
    for bad in ({"max_batch": 0}, {"max_delay": -1}, {"max_batch": True}):
        with pytest.raises(ValueError):
            await DecisionLog.open(url, log=log, key=key, **bad)  # type: ignore[arg-type]


async def test_unreachable_database_is_unavailable(key_path: Path) -> None:
    with pytest.raises(AuditUnavailable):
        await DecisionLog.open(
            "postgresql://postgres@127.0.0.1:1/none", log=fresh_log(), key=key_path
        )


# --------------------------------------------------------------------------- processes


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "AXID_KEY_PASSPHRASE"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _prepare(url: str, log: str, key_path: Path) -> LogStore:
    # Tables and log row exist before the race, as after `axid audit init`.
    key = load_log_key(key_path)
    engine = make_engine(url)
    create_schema(engine)
    signer = NoteSigner(f"axid/{log}", key)
    store = LogStore(engine, log, signer=signer)
    store.ensure_log(store.origin, signer.vkey())
    return store


def test_four_processes_one_chain(
    url: str, key_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    nproc, per_proc = 4, 2000
    log = fresh_log()
    store = _prepare(url, log, key_path)
    for p in range(nproc):
        procs.append(_spawn("bulk", url, log, str(key_path), f"p{p}", str(per_proc), "32"))
    for p in procs:
        line = p.stdout.readline() if p.stdout else ""
        assert line.strip() == "ready", p.stderr.read() if p.stderr else ""
    t0 = time.perf_counter()
    for p in procs:  # all start together, so their batches really contend
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert out.strip() == f"done {per_proc}"
    elapsed = time.perf_counter() - t0
    chk = check_log(store, store.vkey(), consistency_checks=50)
    assert chk.size == nproc * per_proc
    notes = [e["note"] for e in chk.entries]
    want = {f"p{p}-{i}" for p in range(nproc) for i in range(per_proc)}
    assert len(notes) == len(set(notes)) and set(notes) == want  # no loss, no duplicate
    print(f"\n{url.split(':')[0]}: {chk.size / elapsed:.0f} appends/s across {nproc} processes")
    store.engine.dispose()


def test_sigkill_mid_append_leaves_a_verifiable_log(
    url: str, key_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    log = fresh_log()
    store = _prepare(url, log, key_path)
    proc = _spawn("loop", url, log, str(key_path), "crash", "16")
    procs.append(proc)
    assert proc.stdout is not None
    returned: dict[int, str] = {}
    while len(returned) < 400:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"worker died: {proc.stderr.read() if proc.stderr else ''}")
        seq, lh = line.split()
        returned[int(seq)] = lh
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Lines printed after our last read but before the kill count too.
    for line in proc.stdout.read().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[1]) == 64:  # the last line may be cut short
            returned[int(parts[0])] = parts[1]

    chk = check_log(store, store.vkey(), consistency_checks=50)
    assert chk.size >= len(returned)
    for seq, lh in returned.items():
        assert seq < chk.size, f"returned seq {seq} lost by the crash"
        assert chk.leaf_hashes[seq].hex() == lh
        assert leaf_hash(next(store.entries(seq, seq + 1))[1]).hex() == lh
    # The log is still appendable after the crash and continues the chain.
    signer_store = _prepare(url, log, key_path)
    got = signer_store.append_batch([DecisionFields.from_mapping(fields(0))])
    assert got[0].seq == chk.size
    assert check_log(signer_store, store.vkey(), consistency_checks=10).size == chk.size + 1
    store.engine.dispose()
    signer_store.engine.dispose()
