"""Witness benchmarks: ``witness.add_checkpoint``, ``log.append_witnessed_async_p50``,
``log.append_witnessed_sync_p50``.

All three run against one real witness: ``axid witness serve --config
witness.yaml`` in its own process (the CLI's own entry point, ``--log-level
warning``), plain HTTP on 127.0.0.1, its state in a SQLite file (WAL,
``synchronous=FULL``) in the run's temporary directory, one Ed25519 key from
:func:`axid.witness.keys.init_keys` (what ``axid witness init`` writes). It is
started once per run and stopped (SIGTERM, then a kill) when the run ends,
also on error.

- ``witness.add_checkpoint``: cosignatures/s, ``POST /add-checkpoint`` answered
  200. 8 logs (origins), each with its own keep-alive HTTP/1.1 connection
  submitting its next checkpoint as soon as the previous one is cosigned (one
  submission in flight per log, as a log's witnessing task sends them); each
  checkpoint extends the last by 16 entries, with its RFC 9162 consistency
  proof from the witness's size (``old M``, 4 to 6 proof lines). The requests
  are built (signed checkpoints, proofs) before the clock starts; the witness
  does all of its work per request: parse, the log's signature, the proof,
  the atomic state update (one SQLite transaction, ``BEGIN IMMEDIATE``), the
  cosignature. Baseline: one Ed25519 signature (``cryptography``) over a
  cosignature/v1 message of the same size, ops/s in this process: the one
  step a cosignature cannot skip. Self-checks: every answer is a 200, the last
  cosignature of each log verifies with the witness's vkey, and the witness's
  stored state holds each log's last submitted size.
- ``log.append_witnessed_async_p50``: microseconds per
  :meth:`DecisionLog.append <axid.audit.log.DecisionLog.append>` (p50) from
  one sequential caller (each append awaited, so one entry per batch and one
  checkpoint per append), with the witness configured ``witness_mode: async``,
  quorum 1: the log submits each new checkpoint in the background.
  Baseline: the same caller on a log with no witness. The ratio is what async
  witnessing costs the caller (the background submissions share its event
  loop and database). Self-check: after the rounds the witness has cosigned
  the log's latest checkpoint (waited for, at most 10 s) and refused nothing.
- ``log.append_witnessed_sync_p50``: the same with ``witness_mode: sync``:
  each append returns only once a checkpoint covering it is cosigned (a
  round trip to the witness, then the cosignature stored). Baseline: the
  async figure above, from the same run. The ratio is what sync adds.
  Self-check: the last receipt's checkpoint carries the witness's
  cosignature, and it verifies.

The three logs live in separate SQLite files (with their head files), so the
two append figures are taken in one pass: rounds of ``no witness``, ``async``
and ``sync`` alternate and the best p50 of each counts.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import math
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.cosignature import WitnessKey, cosigned_by, verify_cosignature
from axid.audit.log import DecisionLog
from axid.audit.merkle import ListNodes, consistency_proof
from axid.audit.note import Checkpoint, NoteSigner, NoteVerifier, open_checkpoint, sign_note
from axid.audit.store import consistency_text, origin_for
from bench._harness import BenchError, Context, Result, rate, register
from bench._http import AnswerProtocol, child_env, first_line, stderr_tail, stop_child

HOST: Final = "127.0.0.1"
WITNESS_NAME: Final = "bench.witness.test/w1"
CP_LOGS: Final = 8  # logs submitting to the witness at once (witness.add_checkpoint)
CP_STEP: Final = 16  # entries between two checkpoints of one log (one commit batch)
APPEND_LOGS: Final = {"none": "wnone", "async": "wasync", "sync": "wsync"}
START_TIMEOUT: Final = 60.0
COSIGNED_WAIT: Final = 10.0
# The CLI's own entry point (the ``axid`` console script), from this checkout.
_SERVE: Final = (sys.executable, "-c", "from axid.cli import main; main()", "witness", "serve")
_MAX_ANSWER: Final = 1 << 16


# --------------------------------------------------------------------------- the witness


@dataclass
class _Chain:
    """One log submitting to the witness: its key, its (fake) tree, what it sent."""

    origin: str
    signer: NoteSigner
    nodes: ListNodes = field(default_factory=ListNodes)
    planned: int = 0  # the size of the last checkpoint built
    last: Checkpoint | None = None

    def requests(self, port: int, count: int) -> list[bytes]:
        """The next ``count`` ``add-checkpoint`` requests, each ``CP_STEP`` entries on."""
        out = []
        for _ in range(count):
            old = self.planned
            for _ in range(CP_STEP):
                n = self.nodes.size
                self.nodes.append(hashlib.sha256(f"{self.origin} {n}".encode()).digest())
            size = self.nodes.size
            cp = Checkpoint(self.origin, size, self.nodes.root())
            note = sign_note(cp.to_text(), self.signer)
            proof = consistency_proof(old, size, self.nodes) if old else []
            out.append(_post(port, consistency_text(old, proof, note).encode("utf-8")))
            self.planned, self.last = size, cp
        return out


def _post(port: int, body: bytes) -> bytes:
    head = (
        f"POST /add-checkpoint HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class WitnessProcess:
    """``axid witness serve --config CONFIG`` in a child process."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.url = ""
        self._stderr = workdir / "witness.stderr"
        env = child_env()
        with self._stderr.open("wb") as err:
            self._proc = subprocess.Popen(
                [*_SERVE, "--config", str(config), "--log-level", "warning"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env=env,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """The URL it printed (``listening http://HOST:PORT``); BenchError otherwise."""
        line = first_line(self._proc, time.monotonic() + timeout, "the witness", self._stderr)
        m = re.fullmatch(r"listening (http://127\.0\.0\.1:[0-9]+)", line)
        if m is None:
            raise BenchError(f"the witness said {line[:80]!r}{self.problems()}")
        self.url = m.group(1)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def problems(self) -> str:
        """What it logged at WARNING or above (empty when nothing)."""
        return stderr_tail(self._stderr)

    def stop(self) -> None:
        stop_child(self._proc)


@dataclass
class BenchWitness:
    """The run's witness: its directory, vkey, process, and the logs it knows."""

    directory: Path
    vkey: str
    process: WitnessProcess
    chains: list[_Chain]
    log_keys: dict[str, Ed25519PrivateKey]

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def key(self) -> WitnessKey:
        return WitnessKey.from_vkey(self.vkey)

    @property
    def database(self) -> Path:
        return self.directory / "witness.db"

    def stored_sizes(self) -> dict[str, int]:
        """Each origin's size in the witness's state (read after it stopped)."""
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            return {
                str(o): int(s) for o, s in conn.execute("SELECT origin, size FROM witness_state")
            }
        finally:
            conn.close()


def bench_witness(ctx: Context) -> BenchWitness:
    """The run's witness (started once; stopped when the run ends)."""
    got = ctx.shared.get("witness.server")
    if got is not None:
        return got  # type: ignore[no-any-return]
    from axid.witness.keys import init_keys

    d = ctx.tempdir("witness-")
    (key,) = init_keys(d / "keys", WITNESS_NAME)
    chains = [
        _Chain(f"bench.axid.test/log{i}", NoteSigner(f"bench.axid.test/log{i}", _new_key()))
        for i in range(CP_LOGS)
    ]
    log_keys = {name: _new_key() for name in APPEND_LOGS.values()}
    logs = [{"origin": c.origin, "vkey": c.signer.vkey()} for c in chains]
    for mode, name in APPEND_LOGS.items():
        if mode != "none":
            origin = origin_for(name)
            logs.append({"origin": origin, "vkey": NoteSigner(origin, log_keys[name]).vkey()})
    config = {
        "listen": f"{HOST}:0",
        "keys": "keys",
        "database": "sqlite:///witness.db",
        "logs": logs,
    }
    (d / "witness.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    process = WitnessProcess(d / "witness.yaml", d)
    ctx.on_close(process.stop)
    process.wait_ready()
    w = BenchWitness(d, key.vkey(), process, chains, log_keys)
    ctx.shared["witness.server"] = w
    return w


def _new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# --------------------------------------------------------------------------- witness.add_checkpoint


class _Submitter(AnswerProtocol):
    """One keep-alive connection sending its log's requests one after the other."""

    def __init__(self, label: str) -> None:
        super().__init__(label, _MAX_ANSWER)
        self.requests: Sequence[bytes] = ()
        self.next = 0
        self.last_body = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BenchError(f"{self.label}: the witness closed the connection"))

    def start(self, requests: Sequence[bytes]) -> asyncio.Future[None]:
        assert self.transport is not None and requests
        self.done = asyncio.get_running_loop().create_future()
        self.requests, self.next = requests, 1
        self.transport.write(requests[0])
        return self.done

    def data_received(self, data: bytes) -> None:
        answer = self._answer(data)
        if answer is None:
            return
        status, body, extra = answer
        if extra or status != b"200":
            why = "more bytes than one answer" if extra else f"HTTP {status.decode('latin-1')}"
            self._fail(BenchError(f"{self.label}: {why}: {body[:200].decode('utf-8', 'replace')}"))
            return
        self.last_body = body
        assert self.transport is not None and self.done is not None
        if self.next < len(self.requests):
            self.transport.write(self.requests[self.next])
            self.next += 1
        elif not self.done.done():
            self.done.set_result(None)


async def _submit_rounds(w: BenchWitness, plan: _Plan) -> tuple[float, int]:
    """Best cosignatures/s over the plan's rounds, and the checkpoints per log of a round.

    A warm-up round gives the rate that sizes the timed rounds (about
    ``plan.seconds`` each); with ``--iterations`` the sizes are fixed."""
    loop = asyncio.get_running_loop()
    port = w.process.port
    conns: list[_Submitter] = []

    async def one_round(count: int) -> float:
        batches = [c.requests(port, count) for c in w.chains]  # built before the clock starts
        gc.collect()
        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(conn.start(b) for conn, b in zip(conns, batches, strict=True))),
            timeout=120,
        )
        return count * len(conns) / (time.perf_counter() - t0)

    try:
        for c in w.chains:
            _, conn = await loop.create_connection(lambda c=c: _Submitter(c.origin), HOST, port)
            conns.append(conn)
        warm = await one_round(plan.warmup)
        per_log = plan.per_log or max(5, math.ceil(warm * plan.seconds / len(conns)))
        best = 0.0
        for _ in range(plan.rounds):
            best = max(best, await one_round(per_log))
        for c, conn in zip(w.chains, conns, strict=True):
            _check_cosignature(conn.last_body, c, w.key)
        return best, per_log
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.done = None
                conn.transport.close()


@dataclass(frozen=True)
class _Plan:
    """Round sizes: a warm-up, then ``rounds`` timed rounds of ``per_log`` checkpoints
    per log (None: about ``seconds`` long, from the warm-up's rate)."""

    warmup: int
    per_log: int | None
    seconds: float
    rounds: int


def _plan(ctx: Context) -> _Plan:
    if ctx.iterations is not None:
        return _Plan(1, max(1, ctx.iterations // CP_LOGS), 0.0, 1)
    if ctx.quick:
        return _Plan(10, None, 1.0, 2)
    return _Plan(20, None, 3.0, ctx.repeats(full=3))


def _check_cosignature(answer: bytes, chain: _Chain, key: WitnessKey) -> None:
    assert chain.last is not None
    try:
        line = answer.decode("utf-8")
        verify_cosignature(line, chain.last, key)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BenchError(f"witness.add_checkpoint: a cosignature did not verify ({exc})") from None


def _sign_rate() -> float:
    """Ed25519 signatures/s over a cosignature/v1 message of a checkpoint's size."""
    key = Ed25519PrivateKey.generate()
    body = Checkpoint("bench.axid.test/log0", 123_456, bytes(range(32))).to_text()
    message = f"cosignature/v1\ntime {int(time.time())}\n{body}".encode()
    return rate(lambda: key.sign(message), seconds=0.3, repeat=3)


@register("witness.add_checkpoint")
def witness_add_checkpoint(ctx: Context) -> Result:
    w = bench_witness(ctx)
    value, per_log = asyncio.run(_submit_rounds(w, _plan(ctx)))
    base = _sign_rate()
    _check_stored(ctx, w)  # the last witness benchmark of a run (report order)
    ctx.detail(
        "witness.add_checkpoint",
        f"{CP_LOGS} logs, 1 keep-alive connection each, {per_log:,} checkpoints each per "
        "round; SQLite state",
    )
    return Result.of(
        "witness.add_checkpoint", value, "ops/s", "one Ed25519 sign (cosignature/v1)", base
    )


def _check_stored(ctx: Context, w: BenchWitness) -> None:
    """After the witness stopped: its state holds each log's last submitted size."""
    w.process.stop()
    problems = w.process.problems()
    ctx.shared.pop("witness.server", None)
    stored = w.stored_sizes()
    for c in w.chains:
        if c.planned and stored.get(c.origin) != c.planned:
            raise BenchError(
                f"witness.add_checkpoint: the witness stored size {stored.get(c.origin)} for "
                f"{c.origin}, not {c.planned}{problems}"
            )


# --------------------------------------------------------------------------- log.append_witnessed_*


def _fields(i: int) -> dict[str, object]:
    return {
        "decision": "allow",
        "reason": "ok",
        "method": "GET",
        "path": f"/payments/p-{i % 100_000}",
        "service": "payments",
        "peer": "spiffe://example.org/agent/planner",
        "tenant": "acme",
        "agent": "planner",
        "run": f"run-{i % 997:03d}",
        "scope_required": "payments:read",
        "rule": "GET /payments/*",
    }


@dataclass(frozen=True)
class _Latencies:
    p50: dict[str, float]  # best round's p50 per mode, µs
    p99: dict[str, float]  # over every sample of the mode, µs
    appends: dict[str, int]  # timed appends per mode


@dataclass(frozen=True)
class _AppendPlan:
    """Each mode's part of a round: appends until ``seconds`` passed and at least
    ``least`` were timed, at most ``most``."""

    least: int
    most: int
    seconds: float
    rounds: int


def _append_plan(ctx: Context) -> _AppendPlan:
    if ctx.iterations is not None:
        return _AppendPlan(ctx.iterations, ctx.iterations, 0.0, 1)
    if ctx.quick:
        return _AppendPlan(20, 5_000, 0.6, 2)
    return _AppendPlan(50, 50_000, 2.0, ctx.repeats(full=3))


async def _append_latencies(ctx: Context, w: BenchWitness, plan: _AppendPlan) -> _Latencies:
    d = ctx.tempdir("witnessed-")
    witness = [{"url": w.url, "vkey": w.vkey}]
    logs: dict[str, DecisionLog] = {}
    try:
        for mode, name in APPEND_LOGS.items():
            extra: dict[str, Any] = {}
            if mode != "none":
                extra = {"witnesses": witness, "quorum": 1, "witness_mode": mode}
            logs[mode] = await DecisionLog.open(
                f"sqlite:///{d}/{name}.db",
                log=name,
                key=w.log_keys[name],
                head=d / f"{name}.head",
                **extra,
            )
        i = 0
        for dl in logs.values():  # warm-up: connections, first checkpoints, first cosignature
            for _ in range(5):
                await dl.append(_fields(i))
                i += 1
        best = {mode: float("inf") for mode in logs}
        samples: dict[str, list[float]] = {mode: [] for mode in logs}
        last_receipt = None
        for _ in range(plan.rounds):
            for mode, dl in logs.items():
                lat: list[float] = []
                gc.collect()
                gc_was = gc.isenabled()
                gc.disable()
                try:
                    began = time.perf_counter()
                    while len(lat) < plan.most and (
                        len(lat) < plan.least or time.perf_counter() - began < plan.seconds
                    ):
                        t0 = time.perf_counter()
                        receipt = await dl.append(_fields(i))
                        lat.append(time.perf_counter() - t0)
                        i += 1
                finally:
                    if gc_was:
                        gc.enable()
                if mode == "sync":
                    last_receipt = receipt
                best[mode] = min(best[mode], statistics.median(lat) * 1e6)
                samples[mode] += lat
        await _check_witnessed(logs, w, last_receipt)
        p99 = {
            m: statistics.quantiles(s, n=100)[98] * 1e6 if len(s) >= 2 else s[0] * 1e6
            for m, s in samples.items()
        }
        return _Latencies(best, p99, {m: len(v) for m, v in samples.items()})
    finally:
        for dl in logs.values():
            await dl.close()


async def _check_witnessed(logs: dict[str, DecisionLog], w: BenchWitness, receipt: Any) -> None:
    """The async log's latest checkpoint gets cosigned; the sync receipt carries one."""
    deadline = time.monotonic() + COSIGNED_WAIT
    dl = logs["async"]
    while dl.witness_lag.get(WITNESS_NAME, 1) > 0:
        if time.monotonic() > deadline:
            raise BenchError(
                "log.append_witnessed_async_p50: the witness did not cosign the latest "
                f"checkpoint within {COSIGNED_WAIT:g} s (lag {dl.witness_lag})"
                + w.process.problems()
            )
        await asyncio.sleep(0.01)
    for mode in ("async", "sync"):
        refused = sum(logs[mode].witness_refusals.values())
        if refused:
            raise BenchError(f"log.append_witnessed_{mode}_p50: the witness refused {refused}")
    sync = logs["sync"]
    if receipt is None:
        raise BenchError("log.append_witnessed_sync_p50: no receipt")
    cp = open_checkpoint(
        receipt.checkpoint, [NoteVerifier.from_vkey(sync.vkey)], origin=sync.origin
    )
    if cp.size <= receipt.seq or WITNESS_NAME not in cosigned_by(receipt.checkpoint, cp, [w.key]):
        raise BenchError(
            "log.append_witnessed_sync_p50: the receipt's checkpoint is not cosigned by the witness"
        )


def _latencies(ctx: Context) -> _Latencies:
    got = ctx.shared.get("witness.append")
    if got is None:
        got = asyncio.run(_append_latencies(ctx, bench_witness(ctx), _append_plan(ctx)))
        ctx.shared["witness.append"] = got
    return got  # type: ignore[no-any-return]


@register("log.append_witnessed_async_p50")
def log_append_witnessed_async_p50(ctx: Context) -> Result:
    lat = _latencies(ctx)
    ctx.detail(
        "log.append_witnessed_async_p50",
        f"1 sequential caller, {lat.appends['async']:,} appends (no witness "
        f"{lat.appends['none']:,}); p99 {lat.p99['async']:,.0f} µs (no witness "
        f"{lat.p99['none']:,.0f} µs)",
    )
    return Result.of(
        "log.append_witnessed_async_p50",
        lat.p50["async"],
        "µs/op",
        "the same appends, no witness",
        lat.p50["none"],
    )


@register("log.append_witnessed_sync_p50")
def log_append_witnessed_sync_p50(ctx: Context) -> Result:
    lat = _latencies(ctx)
    ctx.detail(
        "log.append_witnessed_sync_p50",
        f"1 sequential caller, {lat.appends['sync']:,} appends, witness on loopback; "
        f"p99 {lat.p99['sync']:,.0f} µs",
    )
    return Result.of(
        "log.append_witnessed_sync_p50",
        lat.p50["sync"],
        "µs/op",
        "the same appends, async witnessing",
        lat.p50["async"],
    )
