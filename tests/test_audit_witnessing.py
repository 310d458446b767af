"""The log's side of witnessing (axid.audit.witnessing) against real `axid witness
serve` processes on loopback, with real SQLite and PostgreSQL logs.

Cosignatures are checked with the spec oracle (``_spec_cosignature``), never
with axid.audit.cosignature. Process starts dominate the cost, so two witnesses
run for the whole module, configured for a pool of logs: each test takes its
own log (so its own witness state).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _audit_storage_helpers import db_url, fields, fresh_log
from _audit_witnessing_helpers import (
    Witness,
    check_cosigned,
    other_vkey,
    running,
    split_note,
    witness_lines,
)
from _spec_cosignature import parse_vkey
from prometheus_client import CollectorRegistry

from axid.audit.export import export_bundle
from axid.audit.log import AuditUnavailable, DecisionLog
from axid.audit.metrics import LogCollector
from axid.audit.note import NoteSigner
from axid.audit.receipt import Receipt
from axid.audit.store import generate_log_key, origin_for
from axid.audit.verify import DatabaseSource, ExportDirSource, verify_log
from axid.audit.witnessing import Witnessing

W1 = "witness.example/w1"
W2 = "witness.example/w2"


class LogKey:
    """A log name and its key file (its default head file goes beside it)."""

    def __init__(self, tmp: Path) -> None:
        self.log = fresh_log("wit")
        self.origin = origin_for(self.log)
        self.path = tmp / "keys" / "log.pem"
        self.vkey = NoteSigner(self.origin, generate_log_key(self.path)).vkey()

    async def open(self, url: str, **kw: Any) -> DecisionLog:
        return await DecisionLog.open(url, log=self.log, key=self.path, max_delay=0.02, **kw)


@dataclass
class Shared:
    """Two running witnesses configured for a pool of logs (W2 also has an ML-DSA-44
    key), and a vkey of W1's name for a key W1 does not hold."""

    pool: list[LogKey]
    w1: Witness
    w2: Witness
    wrong_vkey: str
    used: int = 0

    def take(self) -> LogKey:
        assert self.used < len(self.pool), "enlarge the pool"
        self.used += 1
        return self.pool[self.used - 1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("witnessing")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AXID_KEY_PASSPHRASE", raising=False)
        pool = [LogKey(tmp / "logs" / str(i)) for i in range(24)]
    logs = [(k.origin, k.vkey) for k in pool]
    w1, w2 = Witness.create(tmp / "w", [W1, W2], logs, ml_dsa=[W2])
    with running(w1, w2):
        yield Shared(pool, w1, w2, other_vkey(W1))


@pytest.fixture
def env(shared: Shared) -> Shared:
    for w in (shared.w1, shared.w2):
        if not w.running:  # a test stopped it and failed before starting it again
            w.start()
    return shared


@pytest.fixture
def lk(env: Shared) -> LogKey:
    return env.take()


@pytest.fixture(params=["sqlite", "pg"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return db_url(request.param, tmp_path)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def batch(dl: DecisionLog, start: int, n: int) -> list[Receipt]:
    return list(await asyncio.gather(*(dl.append(fields(start + i)) for i in range(n))))


def metric(dl: DecisionLog, name: str, witness: str) -> float | None:
    reg = CollectorRegistry()
    reg.register(LogCollector(lambda: [dl]))
    return reg.get_sample_value(name, {"log": dl.name, "witness": witness})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------- async


async def test_async_cosignatures_are_stored_and_exported(
    url: str, lk: LogKey, env: Shared, tmp_path: Path
) -> None:
    keys = [env.w1.spec_key, env.w2.spec_key]
    entries = [env.w1.config_entry(), env.w2.config_entry()]
    async with await lk.open(url, witnesses=entries, quorum=2) as dl:
        n = 0
        for size in (5, 7, 3, 9):
            receipts = await batch(dl, n, size)
            n += size
            # async: the receipt carries the log's note alone, at once
            assert witness_lines(receipts[0].checkpoint, lk.origin) == []
        await until(lambda: dl.witness_lag == {W1: 0, W2: 0})
        assert dl.witness_refusals == {W1: 0, W2: 0}
        assert len(dl.store.cosignatures(n)) == 2
        note = dl.store.cosigned_note(n)
        assert note is not None and note.startswith(dl.store.checkpoint(n) or b"-")
        assert check_cosigned(note, lk.origin, keys) == {W1, W2}
        for w in (W1, W2):
            assert metric(dl, "axid_log_witness_lag_entries", w) == 0
            assert metric(dl, "axid_log_witness_refusals_total", w) == 0
        bundle = tmp_path / "bundle"
        export_bundle(dl.store, None, bundle)
        db_notes = dict(DatabaseSource.from_store(dl.store).checkpoints())

    assert db_notes[n] == note
    files = sorted((bundle / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert [int(p.name) for p in files] == sorted(db_notes)
    for p in files:
        exported = p.read_bytes()
        assert exported == db_notes[int(p.name)]
        check_cosigned(exported, lk.origin, keys)  # every witness line present verifies
    latest = (bundle / "checkpoints" / str(n)).read_bytes()
    assert check_cosigned(latest, lk.origin, keys) == {W1, W2}
    # The log's own verification ignores the witnesses' lines (unknown keys).
    report = verify_log(ExportDirSource(bundle), vkey=lk.vkey)
    assert report.ok and report.entries == n, report.first_bad


async def test_a_new_replica_resyncs_from_the_witness_size(
    url: str, lk: LogKey, env: Shared, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that does not know the witness's size submits old 0, is told
    the size by a 409 and resubmits with the consistency proof from there."""
    caplog.set_level(logging.WARNING, logger="axid.audit")
    entry = [env.w1.config_entry()]
    b = await lk.open(url, witnesses=entry, head=tmp_path / "b.head")  # knows nothing yet
    a = await lk.open(url, witnesses=entry, head=tmp_path / "a.head")
    try:
        await batch(a, 0, 6)
        await until(lambda: a.witness_lag == {W1: 0})
        assert a.store.cosigned_sizes() == {(W1, env.w1.spec_key.key_id.hex()): 6}
        receipts = await batch(b, 6, 4)  # b: old 0 -> 409 "6" -> old 6 and the proof
        assert receipts[0].checkpoint_size == 10
        await until(lambda: b.witness_lag == {W1: 0})
        assert b.witness_refusals == {W1: 0}
        note = b.store.cosigned_note(10)
        assert note is not None
        assert check_cosigned(note, lk.origin, [env.w1.spec_key]) == {W1}
    finally:
        await a.close()
        await b.close()
    assert errors(caplog) == []


async def test_a_witness_ahead_of_the_database_is_a_refusal(
    lk: LogKey, env: Shared, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The witness cosigned a larger tree than the database holds (the database
    was rolled back to an older copy, head file and all): no cosignature."""
    url = db_url("sqlite", tmp_path)
    db = Path(url.removeprefix("sqlite:///"))
    async with await lk.open(url) as dl:
        await batch(dl, 0, 3)
    old_copy = db.read_bytes()
    async with await lk.open(url, witnesses=[env.w1.config_entry()]) as dl:
        await batch(dl, 3, 5)
        await until(lambda: dl.witness_lag == {W1: 0})
    db.write_bytes(old_copy)  # the rollback; the witness remembers size 8
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    (lk.path.parent / f"{lk.log}.head").unlink()
    async with await lk.open(url, witnesses=[env.w1.config_entry()]) as dl:
        # Refused twice: the latest checkpoint (3), offered on opening, then 5 (< 8).
        await batch(dl, 3, 2)
        await until(lambda: dl.witness_refusals == {W1: 2})
        assert dl.witness_lag == {W1: 5}
        assert dl.store.cosignatures(5) == []
    assert any("larger than the log's" in m for m in errors(caplog)), errors(caplog)


# --------------------------------------------------------------------------- sync


async def test_sync_receipts_carry_cosignatures_and_fail_closed(
    url: str, lk: LogKey, env: Shared
) -> None:
    w2 = env.w2
    keys = [env.w1.spec_key, w2.spec_key]
    entries = [env.w1.config_entry(), w2.config_entry()]
    async with await lk.open(
        url, witnesses=entries, quorum=2, witness_mode="sync", witness_timeout=1.5
    ) as dl:
        n = 0
        for size in (4, 1, 6):
            receipts = await batch(dl, n, size)
            n += size
            for r in receipts:
                assert r.checkpoint_size >= n  # its own checkpoint or a later one
                assert check_cosigned(r.checkpoint, lk.origin, keys) == {W1, W2}
                assert Receipt.from_header(r.header_value()).checkpoint == r.checkpoint
            # what the receipt carries is what the database keeps
            assert dl.store.cosigned_note(receipts[0].checkpoint_size) == receipts[0].checkpoint
        # Many concurrent callers, several batches: every one witnessed.
        many = await asyncio.gather(*(dl.append(fields(n + i)) for i in range(40)))
        n += 40
        assert all(check_cosigned(r.checkpoint, lk.origin, keys) == {W1, W2} for r in many)

        w2.stop()
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="not witnessed in time"):
            await dl.append(fields(n))
        waited = time.monotonic() - started
        assert 1.4 <= waited < 5, waited
        n += 1
        assert dl.store.size() == n  # recorded, but not witnessed in time
        assert dl.witness_refusals == {W1: 0, W2: 0}  # unreachable is not a refusal

        w2.start()  # back, on the same port: the next batch is witnessed again
        (r,) = await batch(dl, n, 1)
        n += 1
        assert r.checkpoint_size == n
        assert check_cosigned(r.checkpoint, lk.origin, keys) == {W1, W2}


async def test_sync_with_a_quorum_of_one_of_two(lk: LogKey, env: Shared, tmp_path: Path) -> None:
    """quorum 1: a witness that is down does not stop the log; the other cosigns."""
    down = {"url": closed_port_url(), "vkey": env.w2.vkey}
    entries = [env.w1.config_entry(), down]
    url = db_url("sqlite", tmp_path)
    async with await lk.open(
        url, witnesses=entries, quorum=1, witness_mode="sync", witness_timeout=2
    ) as dl:
        for n in (0, 3, 6):
            receipts = await batch(dl, n, 3)
            assert check_cosigned(receipts[0].checkpoint, lk.origin, [env.w1.spec_key]) == {W1}
        assert dl.witness_lag == {W1: 0, W2: 9}
        assert dl.witness_refusals == {W1: 0, W2: 0}
        assert metric(dl, "axid_log_witness_lag_entries", W2) == 9
        assert metric(dl, "axid_log_witness_lag_entries", W1) == 0


# --------------------------------------------------------------------------- refusals


async def test_a_wrong_vkey_drops_the_cosignatures_as_refusals(
    url: str, lk: LogKey, env: Shared, caplog: pytest.LogCaptureFixture
) -> None:
    # Same name, another key: what an operator who pasted an old vkey configures.
    wrong = [env.w1.config_entry(env.wrong_vkey)]
    assert env.wrong_vkey != env.w1.vkey
    caplog.set_level(logging.ERROR, logger="axid.audit")
    async with await lk.open(url, witnesses=wrong) as dl:
        await batch(dl, 0, 4)
        await until(lambda: dl.witness_refusals == {W1: 1})
        await batch(dl, 4, 2)
        await until(lambda: dl.witness_refusals == {W1: 2})
        assert dl.store.cosignatures(4) == [] and dl.store.cosignatures(6) == []
        assert dl.store.cosigned_sizes() == {}
        assert dl.witness_lag == {W1: 6}
        assert metric(dl, "axid_log_witness_refusals_total", W1) == 2
        assert metric(dl, "axid_log_witness_lag_entries", W1) == 6
    async with await lk.open(url, witnesses=wrong, witness_mode="sync", witness_timeout=1) as dl:
        with pytest.raises(AuditUnavailable):
            await dl.append(fields(6))
        assert dl.store.size() == 7
    logged = errors(caplog)
    assert any(W1 in m and "no cosignature by its configured key" in m for m in logged), logged
    assert all(env.wrong_vkey not in m and env.w1.vkey not in m for m in logged)


async def test_an_unknown_origin_is_a_refusal(env: Shared, tmp_path: Path) -> None:
    """A witness not configured for this log answers 404: a refusal, not a retry."""
    lk = LogKey(tmp_path)  # not among the witnesses' logs
    async with await lk.open(db_url("sqlite", tmp_path), witnesses=[env.w1.config_entry()]) as dl:
        await batch(dl, 0, 2)
        await until(lambda: dl.witness_refusals == {W1: 1})
        await asyncio.sleep(0.3)
        assert dl.witness_refusals == {W1: 1}  # not retried without a new checkpoint


async def test_opening_submits_the_latest_checkpoint(
    lk: LogKey, env: Shared, tmp_path: Path
) -> None:
    """A log opened with witnesses offers its latest checkpoint at once, so a
    witness catches up without a commit; cosigned sizes are read back from the
    database, so the next submission needs no 409."""
    url = db_url("sqlite", tmp_path)
    async with await lk.open(url) as dl:
        await batch(dl, 0, 7)
    async with await lk.open(url, witnesses=[env.w1.config_entry()]) as dl:
        await until(lambda: dl.store.cosignatures(7) != [])
        await until(lambda: dl.witness_lag == {W1: 0})
    async with await lk.open(url, witnesses=[env.w1.config_entry()]) as dl:
        assert dl.witness_lag == {W1: 0}
        await batch(dl, 7, 2)
        await until(lambda: dl.witness_lag == {W1: 0})
        note = dl.store.cosigned_note(9)
    body, lines = split_note(note or b"")
    assert body.splitlines()[1] == "9" and len(lines) == 2


async def test_a_cosignature_that_does_not_verify_is_dropped_as_a_refusal(
    lk: LogKey, env: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real witness's answer with one bit of its signature flipped on the way
    (as a broken or malicious witness or a middlebox would send it)."""
    real_post = Witnessing._post

    async def flipping(self: Witnessing, w: Any, body: bytes) -> tuple[int, str, bytes]:
        status, ctype, data = await real_post(self, w, body)
        if status == 200:
            prefix, b64 = data.decode().rstrip("\n").rsplit(" ", 1)
            blob = bytearray(base64.b64decode(b64))
            blob[-1] ^= 1
            data = f"{prefix} {base64.b64encode(bytes(blob)).decode()}\n".encode()
        return status, ctype, data

    monkeypatch.setattr(Witnessing, "_post", flipping)
    async with await lk.open(db_url("sqlite", tmp_path), witnesses=[env.w1.config_entry()]) as dl:
        await batch(dl, 0, 3)
        await until(lambda: dl.witness_refusals == {W1: 1})
        assert dl.store.cosignatures(3) == []
        assert dl.witness_lag == {W1: 3}
    monkeypatch.undo()
    # The witness did cosign size 3 (the log dropped it): the next process resyncs.
    async with await lk.open(db_url("sqlite", tmp_path), witnesses=[env.w1.config_entry()]) as dl:
        await batch(dl, 3, 1)
        await until(lambda: dl.witness_lag == {W1: 0})
        assert dl.witness_refusals == {W1: 0}


async def test_a_witness_with_two_keys_counts_once(lk: LogKey, env: Shared, tmp_path: Path) -> None:
    """W2 cosigns with Ed25519 (cosignature/v1) and ML-DSA-44 (subtree/v1): both
    lines are verified and kept; W2 is one witness towards the quorum."""
    w2 = env.w2
    mldsa = parse_vkey(w2.mldsa_vkey)
    both = [w2.config_entry(), w2.config_entry(w2.mldsa_vkey)]
    with pytest.raises(ValueError, match="quorum"):
        await lk.open(db_url("sqlite", tmp_path), witnesses=both, quorum=2)
    async with await lk.open(
        db_url("sqlite", tmp_path), witnesses=both, witness_mode="sync", witness_timeout=3
    ) as dl:
        (r,) = await batch(dl, 0, 1)
        assert check_cosigned(r.checkpoint, lk.origin, [w2.spec_key, mldsa]) == {W2}
        assert len(witness_lines(r.checkpoint, lk.origin)) == 2
        assert dl.witness_lag == {W2: 0} and dl.witness_refusals == {W2: 0}
        assert dl.store.cosigned_note(1) == r.checkpoint
    # Only the Ed25519 key configured: the ML-DSA line is by an unknown key, ignored.
    async with await lk.open(db_url("sqlite", tmp_path), witnesses=[w2.config_entry()]) as dl:
        await batch(dl, 1, 1)
        await until(lambda: dl.witness_lag == {W2: 0})
        assert len(dl.store.cosignatures(2)) == 1 and dl.witness_refusals == {W2: 0}
