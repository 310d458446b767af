"""``axid demo``: the whole AXID story on loopback, in one process, in a few seconds.

In order, each part in its own module:

1. :mod:`axid.demo.provisioning`: the demo directory (a new temporary one, or
   ``--dir DIR``): a dev PKI, the registrations, the logs' keys and vkeys, the
   witness's keys and ``witness.yaml``;
2. :mod:`axid.demo.stack`: the witness, the issuer and the sample service
   "payments" (:mod:`axid.demo.payments`) served on 127.0.0.1 in this process's one
   event loop, as ``axid witness serve``, ``axid serve`` and a uvicorn deployment
   serve them, both logs witnessed (quorum 1, async);
3. :mod:`axid.demo.steps` (the story, a table) played by :mod:`axid.demo.play` with
   real mTLS clients: every step is a real HTTP request, and its row shows the
   answer, the decision-log entry that recorded it and the seq of the
   ``AXID-Receipt`` the answer carried (which must be that entry's);
4. :mod:`axid.demo.audit`: the witness's cosignatures awaited (at most 10 s), both
   logs verified with their vkeys and the witness's, ``axid audit verify ...
   --witness ... --quorum 1`` on the payments log and ``axid audit receipt check``
   on the allowed refund's kept receipt, as an auditor and its caller would run them;
5. :mod:`axid.demo.render`: all of it printed, and the verdict.

Nothing is faked: the expired token really expires (a 1-second token and a 1-second
leeway, so the demo waits about a second), the revocation reaches the verifier
through its revocation source reading the issuer's table, and the call without a
client certificate is refused by the TLS handshake itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from axid.demo import render
from axid.demo.audit import (
    AuditSummary,
    CosignWait,
    ReceiptAudit,
    WitnessedAudit,
    check_kept_receipt,
    verify_logs,
    verify_witnessed,
    wait_for_cosignatures,
)
from axid.demo.payments import PAYMENTS_SERVICE
from axid.demo.play import StepResult, play_story
from axid.demo.provisioning import DemoLayout, parse_trust_domain, prepare_directory, provision
from axid.demo.stack import DemoStack
from axid.demo.steps import RECEIPT_STEP, STORY_STEPS

__all__ = ["run_demo"]

_T = TypeVar("_T")


class _Interrupted(Exception):
    """SIGINT or SIGTERM came before the story and the audit ended."""


class _Stop:
    """SIGINT/SIGTERM, caught in the running loop: they end whatever runs in :meth:`run`
    (and ``--keep-running``'s wait)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signals: list[int] = []

    @property
    def exit_code(self) -> int:
        return 128 + self.signals[0]

    def on_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.on_signal, sig)
                except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                    continue
                installed.append(sig)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def run(self, work: Awaitable[_T]) -> _T:
        """``work``'s result; :class:`_Interrupted` if a signal came first (or meanwhile:
        it reached the child processes too)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.create_task(self.event.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.event.is_set():
            raise _Interrupted
        return task.result()


@dataclass(frozen=True)
class _Outcome:
    """What the story and the audit came to."""

    steps: list[StepResult]
    wait: CosignWait
    audits: list[AuditSummary]
    witnessed: WitnessedAudit
    receipt_check: ReceiptAudit | None  # None: the story ended before the receipt's step

    def failure(self) -> str | None:
        """The verdict's line when something did not do what it should, else None."""
        failed = [s for s in self.steps if not s.ok]
        if failed:
            s = failed[0]
            return f"demo: FAILED at step {s.number} ({s.actor}: {s.action}): {s.problem}"
        if len(self.steps) != STORY_STEPS:
            return f"demo: FAILED: {len(self.steps)} steps played, not {STORY_STEPS}"
        if any(a.problem is not None for a in self.audits):
            return "demo: FAILED: a decision log does not verify"
        if not self.wait.ok or not self.witnessed.ok or not all(a.ok for a in self.audits):
            return "demo: FAILED: the logs' latest checkpoints are not witnessed"
        if self.receipt_check is None or not self.receipt_check.ok:
            return f"demo: FAILED: the receipt of step {RECEIPT_STEP} does not check"
        return None


async def _play_and_audit(stack: DemoStack, stop: _Stop, console: Console) -> _Outcome:
    """The story, then the audit, each part printed as soon as it is known."""
    p = stack.provisioned
    db_url = p.layout.db_url
    steps = await stop.run(play_story(stack))
    render.render_steps(console, steps)
    # Async witnessing: wait (bounded) for the latest checkpoints' cosignatures.
    wait = await stop.run(wait_for_cosignatures(db_url, list(p.vkeys), p.witness_vkey))
    render.render_cosign_wait(console, wait)
    audits = await stop.run(asyncio.to_thread(verify_logs, db_url, p.vkeys, p.witness_vkey))
    render.render_audit(console, audits, db_url)
    # The auditor's verify with the witness required, and the allowed refund's
    # receipt, kept and checked as its caller would: two child processes.
    kept = steps[RECEIPT_STEP - 1].receipt if len(steps) >= RECEIPT_STEP else None
    checks: list[Awaitable[Any]] = [verify_witnessed(p.layout, PAYMENTS_SERVICE)]
    if kept is not None:
        checks.append(check_kept_receipt(p.layout, PAYMENTS_SERVICE, kept))
    done = await stop.run(asyncio.gather(*checks))
    witnessed: WitnessedAudit = done[0]
    receipt_check: ReceiptAudit | None = done[1] if kept is not None else None
    render.render_witnessed_audit(console, witnessed)
    if receipt_check is not None:
        render.render_receipt_check(console, receipt_check, RECEIPT_STEP)
    return _Outcome(steps, wait, audits, witnessed, receipt_check)


async def _main(
    layout: DemoLayout, trust_domain: str, keep_running: bool, console: Console, kept: bool
) -> int:
    stop = _Stop()
    began = time.monotonic()
    with stop.installed():
        provisioned = await asyncio.to_thread(provision, layout, trust_domain)
        async with DemoStack(provisioned) as stack:
            try:
                outcome = await _play_and_audit(stack, stop, console)
            except _Interrupted:
                console.print("demo: interrupted", style="yellow")
                return stop.exit_code
            failure = outcome.failure()
            if failure is not None:
                render.render_failure(console, failure)
                return 1
            elapsed = time.monotonic() - began
            render.render_success(console, len(outcome.steps), elapsed, layout if kept else None)
            if keep_running:
                render.print_endpoints(console, stack)
                await stop.event.wait()
            return 0


def run_demo(
    directory: Path | None = None,
    *,
    keep_running: bool = False,
    trust_domain: str = "example.org",
    console: Console | None = None,
) -> int:
    """``axid demo``: set up, play, verify, print; the exit code (0: every step did
    what it should, both logs verify and the refund's receipt checks; 1: something
    did not; 128+N: stopped by signal N before the end). Raises
    :class:`~axid.demo.provisioning.DemoUsageError` for bad arguments.

    Without ``directory`` everything lives in a temporary directory removed at the
    end; with it, the PKI, keys and database are kept there.
    """
    parse_trust_domain(trust_domain)
    out = console or render.make_console()
    temporary: str | None = None
    if directory is None:
        temporary = tempfile.mkdtemp(prefix="axid-demo-")
        layout = DemoLayout(Path(temporary))
    else:
        layout = prepare_directory(directory)
    try:
        return asyncio.run(_main(layout, trust_domain, keep_running, out, temporary is None))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
