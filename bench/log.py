"""Decision-log benchmarks: ``log.append``, ``log.verify``, ``log.proof`` (SQLite).

- ``log.append``: durable appends/s through :class:`axid.audit.log.DecisionLog`
  with 64 concurrent callers, each awaiting its receipt (committed with
  ``synchronous=FULL`` and checkpointed) before its next decision. Baseline:
  the very rows it stored (the entries table's columns), inserted with one
  plain ``executemany`` in one transaction into a fresh database with the same
  schema and SQLite settings: what the storage alone costs, with no chain,
  Merkle tree, signature, per-batch commit or asyncio.
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
import hashlib
import random
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select, text

from axid.audit.entry import validate_fields
from axid.audit.log import DecisionLog
from axid.audit.merkle import leaf_hash, verify_inclusion
from axid.audit.note import NoteSigner, NoteVerifier, open_checkpoint
from axid.audit.store import AuditEntry, LogStore, create_schema, make_engine, origin_for
from axid.audit.verify import DatabaseSource, verify_log
from bench._harness import BenchError, Context, Result, best_of, ops_per_s, register, timed

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
        valid = [validate_fields(f) for f in _FIELDS]
        with timed() as t:
            done = 0
            while done < size:
                n = min(_BUILD_BATCH, size - done)
                self.store.append_batch(
                    [valid[(done + k) % _POOL] for k in range(n)], validated=True
                )
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
