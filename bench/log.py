"""Decision-log benchmarks: ``log.append``, ``log.verify``, ``log.proof`` (SQLite),
``log.append_pg`` (PostgreSQL).

- ``log.append``: durable appends/s through :class:`axid.audit.log.DecisionLog`
  with 64 concurrent callers, each awaiting its receipt (committed with
  ``synchronous=FULL`` and checkpointed) before its next decision. Baseline:
  the very rows it stored (the entries table's columns), inserted with one
  plain ``executemany`` in one transaction into a fresh database with the same
  schema and SQLite settings: what the storage alone costs, with no chain,
  Merkle tree, signature, per-batch commit or asyncio.
- ``log.append_pg``: the same durable appends into one log on the PostgreSQL
  server at ``AXID_BENCH_DATABASE_URL`` (skipped, with that reason, when it is
  unset), from 2 writer processes of 32 callers each, each process with its own
  :class:`DecisionLog` (so the writers take turns on the log's row lock and
  each proves the other's checkpoints). Baseline: the very rows stored,
  inserted with one plain ``executemany`` in one transaction on that server
  (same table, under another log name). Every run writes fresh log names
  (``bench-pg-<time>-<pid>-<round>``, and ``...-base``) and leaves them there:
  the log tables are append-only by design.
- ``log.verify``: entries/s of :func:`axid.audit.verify.verify_log` (the
  auditor's full check) over a 1,000,000-entry log (100,000 with
  ``--quick``), read from the database. Baseline: SHA-256 of the same entry
  bytes (the leaf hash, the one step no verification can skip), from memory.
- ``log.proof``: microseconds to produce one inclusion proof (with its signed
  checkpoint) for a random entry of that log. Baseline: one indexed
  ``SELECT`` by ``(log, seq)`` through the same engine, a fresh connection
  per call as the proof has: the cheapest storage read there is. A proof
  needs about log2(n) stored hashes, so the ratio reads as "how many such
  reads one proof costs".

The big log is built through :meth:`LogStore.append_batch` in large batches
(validated once), not one :class:`DecisionLog` call per entry, and is shared
by ``log.verify`` and ``log.proof``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import select as _select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select, text

from axid.audit.entry import DecisionFields
from axid.audit.log import DecisionLog
from axid.audit.merkle import leaf_hash, verify_inclusion
from axid.audit.note import NoteSigner, NoteVerifier, open_checkpoint
from axid.audit.store import (
    AuditEntry,
    LogStore,
    create_schema,
    generate_log_key,
    make_engine,
    origin_for,
)
from axid.audit.verify import DatabaseSource, verify_log
from bench._harness import (
    BenchError,
    BenchSkipped,
    Context,
    Result,
    best_of,
    ops_per_s,
    register,
    timed,
)
from bench._http import child_env

CALLERS = 64
LOG_NAME = "bench"
FULL_LOG_SIZE = 1_000_000
QUICK_LOG_SIZE = 100_000
_BUILD_BATCH = 10_000
_POOL = 4096  # distinct decision records, reused round-robin
_ENTRY_COLS = "log, seq, leaf_hash, data, ts, decision, reason, tenant, agent, run"


def decision_fields(i: int) -> dict[str, object]:
    """A realistic decision: one of many concurrent runs, some denies."""
    deny = i % 11 == 3
    run = f"run-{(i * 2654435761) % 997:03d}"  # ~1000 runs interleaved, as under load
    return {
        "decision": "deny" if deny else "allow",
        "reason": "scope_insufficient" if deny else "ok",
        "method": "POST" if i % 3 == 0 else "GET",
        "path": f"/payments/{i % 100_000}" + ("/refund" if i % 3 == 0 else ""),
        "service": "payments",
        "peer": f"spiffe://example.org/agent/{'worker' if i % 2 else 'planner'}",
        "peer_cert": f"{i % 512:03d}" + "Xk9vQ2Jd8mTq4Wc7Lh1Rz5Yb0Ns6Fp3Ga2Ue",
        "kid": "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
        "jti": f"{i:022d}",
        "iss": "https://issuer.example.org",
        "tenant": "acme" if i % 5 else "globex",
        "agent": "worker" if i % 2 else "planner",
        "run": run,
        "spawn_parent": "run-root" if i % 2 else None,
        "chain": ["run-root"] if i % 2 else [],
        "scope_required": "payments:refund" if i % 3 == 0 else "payments:read",
        "rule": "POST /payments/*/refund" if i % 3 == 0 else "GET /payments/*",
        "note": None,
    }


_FIELDS = [decision_fields(i) for i in range(_POOL)]


def _sqlite_url(d: Path) -> str:
    return f"sqlite:///{d}/axid.db"


# --------------------------------------------------------------------------- log.append


async def _append_round(d: Path, total: int) -> float:
    per = total // CALLERS
    # With its head file, as a service runs it (the head is written after each commit).
    key, head = Ed25519PrivateKey.generate(), d / f"{LOG_NAME}.head"
    async with await DecisionLog.open(_sqlite_url(d), log=LOG_NAME, key=key, head=head) as dl:

        async def caller(c: int) -> None:
            base = c * per
            for i in range(per):
                await dl.append(_FIELDS[(base + i) % _POOL])

        # Warm-up (connection, schema, first batch) outside the timed part.
        await asyncio.gather(*(dl.append(_FIELDS[i]) for i in range(CALLERS)))
        t0 = time.perf_counter()
        await asyncio.gather(*map(caller, range(CALLERS)))
        return ops_per_s(per * CALLERS, time.perf_counter() - t0)


def _entry_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        q = f"SELECT {_ENTRY_COLS} FROM axid_audit_entry WHERE log = :log ORDER BY seq"
        return [tuple(r) for r in conn.execute(text(q), {"log": LOG_NAME})]


def _insert_baseline(ctx: Context, rows: list[tuple[Any, ...]], vkey: str) -> float:
    """Rows/s of one executemany of ``rows`` in one transaction, same schema and settings."""
    engine = make_engine(_sqlite_url(ctx.tempdir("insert-")))
    try:
        create_schema(engine)
        with engine.begin() as conn:  # the log row the entries' foreign key needs
            conn.exec_driver_sql(
                "INSERT INTO axid_audit_log (name, origin, vkey, created_at) VALUES (?, ?, ?, 0)",
                (LOG_NAME, origin_for(LOG_NAME), vkey),
            )
        marks = ", ".join("?" * len(_ENTRY_COLS.split(",")))
        sql = f"INSERT INTO axid_audit_entry ({_ENTRY_COLS}) VALUES ({marks})"
        with timed() as t, engine.begin() as conn:
            conn.exec_driver_sql(sql, rows)
        return ops_per_s(len(rows), t[0])
    finally:
        engine.dispose()


@register("log.append")
def log_append(ctx: Context) -> Result:
    total = max(CALLERS, ctx.n(full=64_000, quick=12_800) // CALLERS * CALLERS)
    best = 0.0
    best_dir: Path | None = None
    for _ in range(ctx.repeats(full=3, quick=1)):
        d = ctx.tempdir("append-")
        got = asyncio.run(_append_round(d, total))
        if got > best:
            best, best_dir = got, d
    assert best_dir is not None
    engine = make_engine(_sqlite_url(best_dir))
    try:
        rows = _entry_rows(engine)
        vkey = LogStore(engine, LOG_NAME).vkey()
    finally:
        engine.dispose()
    if len(rows) != total + CALLERS:
        raise BenchError(f"log.append: {len(rows)} entries stored, expected {total + CALLERS}")
    base = best_of(ctx.repeats(full=3, quick=1), lambda: _insert_baseline(ctx, rows, vkey))
    ctx.detail("log.append", f"{CALLERS} callers, {total:,} appends")
    return Result.of(
        "log.append", best, "ops/s", "SQLite executemany, same rows, 1 transaction", base
    )


# --------------------------------------------------------------------------- log.append_pg

PG_URL_ENV = "AXID_BENCH_DATABASE_URL"
PG_WRITERS = 2
PG_CALLERS = 32  # per writer process
_PG_START_TIMEOUT = 60.0
_PG_RUN_TIMEOUT = 600.0
_PG_CHILD = "import sys\nfrom bench.log import pg_writer\npg_writer(sys.argv[1:])\n"


def pg_writer(argv: list[str]) -> None:
    """A writer process: ``URL LOG KEY HEAD OFFSET COUNT``. Opens the log, appends one
    decision per caller (warm-up), prints ``ready``, waits for a line on stdin, then
    appends ``COUNT`` decisions with :data:`PG_CALLERS` callers and prints ``done``."""
    url, log, key, head, offset, count = argv[0], argv[1], argv[2], argv[3], *map(int, argv[4:6])
    per = count // PG_CALLERS

    async def main() -> None:
        async with await DecisionLog.open(url, log=log, key=key, head=head) as dl:
            warm = (dl.append(_FIELDS[(offset + i) % _POOL]) for i in range(PG_CALLERS))
            await asyncio.gather(*warm)
            print("ready", flush=True)
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                return  # stdin closed: the benchmark process gave up

            async def caller(c: int) -> None:
                base = offset + c * per
                for i in range(per):
                    await dl.append(_FIELDS[(base + i) % _POOL])

            await asyncio.gather(*map(caller, range(PG_CALLERS)))
            print("done", flush=True)

    asyncio.run(main())


class _Writer:
    """One :func:`pg_writer` process; :meth:`stop` always ends it."""

    def __init__(self, args: list[str], stderr: Path) -> None:
        self.stderr = stderr
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PG_CHILD, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(),
            )

    def expect(self, word: str, deadline: float) -> None:
        out = self.proc.stdout
        assert out is not None
        left = deadline - time.monotonic()
        ready = _select.select([out], [], [], max(0.0, left))[0]
        line = out.readline().decode("ascii", "replace").strip() if ready else ""
        if line != word:
            tail = self.stderr.read_text(errors="replace").strip().splitlines()[-4:]
            got = f"said {line!r}" if ready else "timed out"
            raise BenchError(f"log.append_pg: a writer {got} instead of {word!r}: {tail}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _pg_round(ctx: Context, engine: Engine, url: str, log: str, total: int) -> float:
    """Appends/s of one round: :data:`PG_WRITERS` processes on one fresh log."""
    d = ctx.tempdir("append-pg-")
    key = generate_log_key(d / "log.pem")
    signer = NoteSigner(origin_for(log), key)
    LogStore(engine, log, signer=signer).ensure_log(origin_for(log), signer.vkey())
    per = total // PG_WRITERS
    writers: list[_Writer] = []
    try:
        for w in range(PG_WRITERS):
            args = [url, log, str(d / "log.pem"), str(d / f"w{w}.head"), str(w * per), str(per)]
            writers.append(_Writer(args, d / f"w{w}.stderr"))
        deadline = time.monotonic() + _PG_START_TIMEOUT
        for w in writers:
            w.expect("ready", deadline)
        t0 = time.perf_counter()
        for w in writers:
            w.go()
        deadline = time.monotonic() + _PG_RUN_TIMEOUT
        for w in writers:
            w.expect("done", deadline)
        return ops_per_s(total, time.perf_counter() - t0)
    finally:
        for w in writers:
            w.stop()


def _pg_rows(engine: Engine, log: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        q = f"SELECT {_ENTRY_COLS} FROM axid_audit_entry WHERE log = :log ORDER BY seq"
        return [tuple(r) for r in conn.execute(text(q), {"log": log})]


def _pg_insert_baseline(engine: Engine, rows: list[tuple[Any, ...]], log: str, vkey: str) -> float:
    """Rows/s of one driver ``executemany`` of ``rows`` (as log ``log``), one transaction."""
    with engine.begin() as conn:  # the log row the entries' foreign key needs
        sql = "INSERT INTO axid_audit_log (name, origin, vkey, created_at) VALUES (:n, :o, :v, 0)"
        conn.execute(text(sql), {"n": log, "o": origin_for(log), "v": vkey})
    mine = [(log, *r[1:]) for r in rows]
    marks = ", ".join(["%s"] * len(_ENTRY_COLS.split(",")))
    sql = f"INSERT INTO axid_audit_entry ({_ENTRY_COLS}) VALUES ({marks})"
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        with timed() as t:
            with raw.cursor() as cur:
                cur.executemany(sql, mine)
            raw.commit()
    return ops_per_s(len(rows), t[0])


@register("log.append_pg")
def log_append_pg(ctx: Context) -> Result:
    url = os.environ.get(PG_URL_ENV, "")
    if not url:
        raise BenchSkipped(f"{PG_URL_ENV} is not set (a postgresql:// URL to write to)")
    total = max(64, ctx.n(full=64_000, quick=12_800) // 64 * 64)
    stamp = f"bench-pg-{int(time.time())}-{os.getpid()}"
    engine = make_engine(url)
    try:
        create_schema(engine)
        best, best_log = 0.0, ""
        for r in range(ctx.repeats(full=3, quick=1)):
            got = _pg_round(ctx, engine, url, f"{stamp}-{r}", total)
            if got > best:
                best, best_log = got, f"{stamp}-{r}"
        rows = _pg_rows(engine, best_log)
        want = total + PG_WRITERS * PG_CALLERS
        if len(rows) != want or [r[1] for r in rows] != list(range(want)):
            raise BenchError(f"log.append_pg: {len(rows)} entries stored, expected {want}")
        vkey = LogStore(engine, best_log).vkey()
        base = _pg_insert_baseline(engine, rows, f"{stamp}-base", vkey)
    finally:
        engine.dispose()
    ctx.detail(
        "log.append_pg",
        f"{PG_WRITERS} processes x {PG_CALLERS} callers, {total:,} appends; log {best_log}",
    )
    return Result.of(
        "log.append_pg",
        best,
        "ops/s",
        "PostgreSQL executemany, same rows, 1 transaction",
        base,
    )


# --------------------------------------------------------------------------- the big log


class _BigLog:
    def __init__(self, ctx: Context, size: int) -> None:
        self.size = size
        self.engine = make_engine(_sqlite_url(ctx.tempdir("biglog-")))
        ctx.on_close(self.engine.dispose)
        create_schema(self.engine)
        signer = NoteSigner(origin_for(LOG_NAME), Ed25519PrivateKey.generate())
        self.vkey = signer.vkey()
        self.store = LogStore(self.engine, LOG_NAME, signer=signer)
        self.store.ensure_log(self.store.origin, self.vkey)
        valid = [DecisionFields.from_mapping(f) for f in _FIELDS]
        with timed() as t:
            done = 0
            while done < size:
                n = min(_BUILD_BATCH, size - done)
                self.store.append_batch([valid[(done + k) % _POOL] for k in range(n)])
                done += n
        self.build_seconds = t[0]


def _big_log(ctx: Context) -> _BigLog:
    size = ctx.log_size or (QUICK_LOG_SIZE if ctx.quick else FULL_LOG_SIZE)
    log = ctx.shared.get("log.big")
    if log is None or log.size != size:
        log = _BigLog(ctx, size)
        ctx.shared["log.big"] = log
    return log


# --------------------------------------------------------------------------- log.verify


def _hash_rate(store: LogStore) -> float:
    """Entries/s of SHA-256 (the leaf hash) over the log's entry bytes, from memory."""
    hashing = 0.0
    n = 0
    sha256 = hashlib.sha256
    for page in _pages(store):
        t0 = time.perf_counter()
        for data in page:
            sha256(b"\x00" + data).digest()
        hashing += time.perf_counter() - t0
        n += len(page)
    return ops_per_s(n, hashing)


def _pages(store: LogStore, page: int = 50_000) -> Any:
    buf: list[bytes] = []
    for _, data, _ in store.entries(batch=page):
        buf.append(data)
        if len(buf) == page:
            yield buf
            buf = []
    if buf:
        yield buf


@register("log.verify")
def log_verify(ctx: Context) -> Result:
    log = _big_log(ctx)

    def once() -> float:
        with timed() as t:
            rep = verify_log(DatabaseSource.from_store(log.store), vkey=log.vkey)
        if not rep.ok or rep.entries != log.size:
            raise BenchError(f"log.verify: the log did not verify ({rep.first_bad})")
        return ops_per_s(log.size, t[0])

    value = best_of(ctx.repeats(full=1, quick=1), once)
    base = best_of(ctx.repeats(full=3, quick=1), lambda: _hash_rate(log.store))
    ctx.detail("log.verify", f"{log.size:,}-entry log (built in {log.build_seconds:.1f} s)")
    return Result.of("log.verify", value, "entries/s", "SHA-256 of the entry bytes", base)


# --------------------------------------------------------------------------- log.proof


def _select_leaf(engine: Engine, seq: int) -> bytes:
    q = select(AuditEntry.__table__.c.leaf_hash).where(  # type: ignore[attr-defined]
        AuditEntry.__table__.c.log == LOG_NAME,  # type: ignore[attr-defined]
        AuditEntry.__table__.c.seq == seq,  # type: ignore[attr-defined]
    )
    with engine.connect() as conn:
        h = conn.execute(q).scalar()
    if h is None:
        raise BenchError(f"log.proof: no entry {seq}")
    return bytes(h)


@register("log.proof")
def log_proof(ctx: Context) -> Result:
    log = _big_log(ctx)
    store, engine = log.store, log.engine
    k = ctx.n(full=2000, quick=300)
    rng = random.Random(8785)  # the same entries in every run
    seqs = [rng.randrange(log.size) for _ in range(k)]

    # The proofs must be real: check a few against the signed checkpoint.
    note = store.latest_checkpoint()
    if note is None:
        raise BenchError("log.proof: no checkpoint")
    cp = open_checkpoint(note, [NoteVerifier.from_vkey(log.vkey)], origin=store.origin)
    for seq in seqs[:8]:
        proof, _ = store.inclusion_proof(seq)
        verify_inclusion(seq, cp.size, leaf_hash(_entry_bytes(store, seq)), proof, cp.root)

    def per_proof() -> float:
        with timed() as t:
            for seq in seqs:
                store.inclusion_proof(seq)
        return t[0] / len(seqs) * 1e6

    def per_select() -> float:
        with timed() as t:
            for seq in seqs:
                _select_leaf(engine, seq)
        return t[0] / len(seqs) * 1e6

    reps = ctx.repeats(full=3, quick=2)
    value = best_of(reps, per_proof, lower_is_better=True)
    base = best_of(reps, per_select, lower_is_better=True)
    ctx.detail("log.proof", f"{log.size:,}-entry log, {k:,} random entries")
    return Result.of("log.proof", value, "µs/op", "one indexed SELECT by (log, seq)", base)


def _entry_bytes(store: LogStore, seq: int) -> bytes:
    for _, data, _ in store.entries(seq, seq + 1):
        return data
    raise BenchError(f"log.proof: no entry {seq}")
