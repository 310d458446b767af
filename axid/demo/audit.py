"""The auditor's part of the demo, after the story: wait (bounded) for the witness's
cosignatures of both logs' latest checkpoints (async witnessing: in the background),
verify both logs (:func:`axid.audit.verify.verify_log`) with the verifier keys
derived when the log keys were created (not the keys stored in the database) and
the witness's vkey, then two child processes as an auditor and a caller would run
them: ``axid audit verify ... --witness keys/witness.vkey --quorum 1
--max-unwitnessed 0`` on the payments log, and ``axid audit receipt check`` on the
allowed refund's kept receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from axid.audit.cosignature import WitnessKey
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import RECEIPT_HEADER, Receipt
from axid.audit.store import LogStore, make_engine
from axid.audit.verify import DatabaseSource, VerifyReport, VerifyUsageError, verify_log
from axid.demo.provisioning import WITNESS_QUORUM, DemoError, DemoLayout

__all__ = [
    "COSIGN_WAIT",
    "AuditSummary",
    "AxidRun",
    "CosignWait",
    "ReceiptAudit",
    "WitnessedAudit",
    "check_kept_receipt",
    "verify_logs",
    "verify_witnessed",
    "wait_for_cosignatures",
    "witnessed_verify_args",
]

# How long the demo waits for the witness to cosign the logs' latest checkpoints
# (async witnessing: in the background) before the audit.
COSIGN_WAIT: Final = 10.0
_CHILD_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class AuditSummary:
    """The auditor's verification of one decision log."""

    log: str
    ok: bool
    entries: int
    checkpoints: int
    latest_note: str | None
    problem: str | None = None
    vkey: str = field(default="", repr=False)
    # With a witness (verify_logs(witness_vkey=...)): the newest checkpoint it
    # cosigned, by whom, and that note with its cosignature lines.
    witnessed_size: int | None = None
    cosigners: tuple[str, ...] = ()
    witnessed_note: str | None = field(default=None, repr=False)
    witness_failure: str | None = None  # intact (problem None), but not witnessed

    @classmethod
    def of(cls, log: str, vkey: str, report: VerifyReport) -> AuditSummary:
        """The summary of ``report``, the verification of ``log`` with ``vkey``."""
        problem = None
        if report.first_bad is not None:
            problem = str(report.first_bad)
        elif not report.ok and report.witness_failure is None:
            problem = "verification failed"
        return cls(
            log,
            report.ok,
            report.entries,
            report.checkpoints,
            _text(report.latest_note),
            problem,
            vkey,
            report.witnessed_size,
            tuple(report.cosigners),
            _text(report.witnessed_note),
            None if problem is not None else report.witness_failure,
        )


def _text(note: bytes | None) -> str | None:
    return note.decode("utf-8", "replace") if note else None


def verify_logs(
    db_url: str, vkeys: dict[str, str], witness_vkey: str | None = None
) -> list[AuditSummary]:
    """Verify each log in ``vkeys`` (log name -> trusted verifier key) in ``db_url``;
    with ``witness_vkey``, also require a checkpoint cosigned by that witness (quorum 1;
    every cosignature by it must verify)."""
    policy = None
    if witness_vkey is not None:
        policy = WitnessPolicy((WitnessKey.from_vkey(witness_vkey),), WITNESS_QUORUM)
    out = []
    for log, vkey in vkeys.items():
        try:
            source = DatabaseSource(db_url, log)
            try:
                report = verify_log(source, vkey=vkey, witnesses=policy)
            finally:
                source.close()
        except VerifyUsageError as exc:
            out.append(AuditSummary(log, False, 0, 0, None, str(exc), vkey))
            continue
        out.append(AuditSummary.of(log, vkey, report))
    return out


@dataclass(frozen=True)
class CosignWait:
    """How waiting for the witness's cosignatures on the logs' latest checkpoints went."""

    witness: str
    sizes: dict[str, int]  # log -> its latest checkpoint's size
    cosigned: dict[str, int]  # log -> the largest size the witness cosigned (0: none)
    seconds: float  # waited
    limit: float  # the most it would have waited

    @property
    def ok(self) -> bool:
        return all(self.cosigned.get(log, -1) >= size for log, size in self.sizes.items())


async def wait_for_cosignatures(
    db_url: str, logs: list[str], witness_vkey: str, timeout: float | None = None
) -> CosignWait:
    """Wait (at most ``timeout`` seconds, default :data:`COSIGN_WAIT`) until the
    witness's cosignature of each log's latest checkpoint is stored beside it, as the
    logs' background witnessing stores it (``witness_mode: async``: no request waited
    for it)."""
    limit = COSIGN_WAIT if timeout is None else timeout
    key = WitnessKey.from_vkey(witness_vkey)
    stored_as = (key.name, key.key_id.hex())
    engine = make_engine(db_url)

    def look() -> tuple[dict[str, int], dict[str, int]]:
        sizes, cosigned = {}, {}
        for log in logs:
            store = LogStore(engine, log)
            sizes[log] = store.size()
            cosigned[log] = store.cosigned_sizes().get(stored_as, 0)
        return sizes, cosigned

    try:
        began = time.monotonic()
        while True:
            sizes, cosigned = await asyncio.to_thread(look)
            wait = CosignWait(key.name, sizes, cosigned, time.monotonic() - began, limit)
            if wait.ok or wait.seconds >= limit:
                return wait
            await asyncio.sleep(0.02)
    finally:
        await asyncio.to_thread(engine.dispose)


@dataclass(frozen=True)
class AxidRun:
    """An ``axid`` command run as a child process on ``log``: its arguments (after
    ``axid``), exit code (None: it did not finish in time) and output."""

    log: str
    args: list[str]
    code: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True)
class WitnessedAudit(AxidRun):
    """``axid audit verify ... --witness VKEY --quorum 1`` run on a log."""


@dataclass(frozen=True)
class ReceiptAudit(AxidRun):
    """``axid audit receipt check`` run on a kept receipt, the entry at ``seq``."""

    seq: int = -1


def witnessed_verify_args(
    layout: DemoLayout, log: str, max_unwitnessed: int | None = 0
) -> list[str]:
    """The auditor's command (after ``axid``): the log verified with its vkey, and a
    checkpoint cosigned by the witness required, by default with no entry after it
    (the demo waited for the latest checkpoint's cosignature)."""
    args = [
        *("audit", "verify", "--db", layout.db_url, "--log", log),
        *("--vkey", str(layout.vkey_file(log))),
        *("--witness", str(layout.witness_vkey_file), "--quorum", str(WITNESS_QUORUM)),
    ]
    if max_unwitnessed is not None:
        args += ["--max-unwitnessed", str(max_unwitnessed)]
    return args


async def verify_witnessed(layout: DemoLayout, log: str) -> WitnessedAudit:
    """Run :func:`witnessed_verify_args` as an auditor would: a child process."""
    args = witnessed_verify_args(layout, log)
    code, output = await _run_axid(args)
    return WitnessedAudit(log, args, code, output)


async def check_kept_receipt(layout: DemoLayout, log: str, receipt: Receipt) -> ReceiptAudit:
    """Keep ``receipt`` in ``layout.receipt_file`` as its caller would, then check it
    against ``log`` in the demo's database as an auditor would: ``axid audit receipt
    check FILE --vkey keys/<log>.vkey --db URL --log LOG``, a child process."""
    try:
        layout.receipt_file.write_text(
            f"{RECEIPT_HEADER}: {receipt.header_value()}\n", encoding="ascii"
        )
    except OSError as exc:
        raise DemoError(f"cannot write {layout.receipt_file}: {exc}") from None
    args = [
        *("audit", "receipt", "check", str(layout.receipt_file)),
        *("--vkey", str(layout.vkey_file(log)), "--db", layout.db_url, "--log", log),
    ]
    code, output = await _run_axid(args)
    return ReceiptAudit(log, args, code, output, seq=receipt.seq)


async def _run_axid(args: list[str]) -> tuple[int | None, str]:
    """``axid ARGS`` in a child process: (exit code, None if it did not finish within
    the time limit; its output)."""
    proc = await asyncio.create_subprocess_exec(
        *_axid_command(),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _CHILD_TIMEOUT)
    except BaseException as exc:  # the timeout, or the demo being stopped
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await proc.wait()
        if not isinstance(exc, TimeoutError):
            raise
        return None, f"did not finish within {_CHILD_TIMEOUT:g} s"
    return proc.returncode, out.decode("utf-8", "replace")


def _axid_command() -> list[str]:
    """The ``axid`` console script installed next to this Python."""
    script = Path(sys.executable).parent / "axid"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from axid.cli import main; main()"]
