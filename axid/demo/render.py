"""What ``axid demo`` prints: the story's table, the witness's cosignatures, the
auditor's results, the verdict and, with ``--keep-running``, the servers' addresses.
"""

from __future__ import annotations

import os

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from axid.demo.audit import (
    AuditSummary,
    AxidRun,
    CosignWait,
    ReceiptAudit,
    WitnessedAudit,
    witnessed_verify_args,
)
from axid.demo.payments import PAYMENTS_SERVICE
from axid.demo.play import StepResult
from axid.demo.provisioning import WITNESS_QUORUM, DemoLayout
from axid.demo.stack import DemoStack
from axid.demo.steps import NO_LOG

__all__ = [
    "make_console",
    "print_endpoints",
    "render_audit",
    "render_cosign_wait",
    "render_failure",
    "render_receipt_check",
    "render_steps",
    "render_success",
    "render_witnessed_audit",
]


def make_console() -> Console:
    # Piped output (tests, CI logs) gets a wide table instead of folded reason codes.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, markup=False, width=200)
    return console


def _steps_table() -> Table:
    table = Table(
        title="axid demo: agents, tokens and decisions on loopback",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("actor", no_wrap=True)
    table.add_column("action", overflow="fold", ratio=1)
    table.add_column("HTTP", justify="right", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("log seq", no_wrap=True)
    table.add_column("receipt", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    return table


def render_steps(console: Console, steps: list[StepResult]) -> None:
    """The story as a table: one row per step, its detail under the action."""
    table = _steps_table()
    for s in steps:
        action = Text(s.action)
        if s.detail:
            action.append("\n" + s.detail, style="dim" if s.ok else "red")
        table.add_row(
            Text(str(s.number)),
            Text(s.actor),
            action,
            Text(NO_LOG if s.status is None else str(s.status)),
            Text(s.reason, style="green" if s.reason == "ok" else "yellow"),
            Text(s.log),
            Text(NO_LOG if s.receipt is None else str(s.receipt.seq)),
            Text("✓", style="green") if s.ok else Text("✗", style="bold red"),
        )
    console.print(table)


def render_cosign_wait(console: Console, wait: CosignWait) -> None:
    sizes = ", ".join(f"{log} {size}" for log, size in wait.sizes.items())
    if wait.ok:
        console.print(
            f"witness: {wait.witness} cosigned the logs' latest checkpoints ({sizes}); "
            f"witnessing is async (no request waited for it): the demo waited "
            f"{wait.seconds:.2f} s for it, at most {wait.limit:g} s",
            soft_wrap=True,
        )
        return
    got = ", ".join(f"{log} {wait.cosigned.get(log, 0)}" for log in wait.sizes)
    console.print(
        f"witness: FAILED: {wait.witness} did not cosign the logs' latest checkpoints "
        f"({sizes}) within {wait.limit:g} s; it has cosigned {got}",
        soft_wrap=True,
    )


def _audit_line(a: AuditSummary, db_url: str) -> str:
    if a.ok:
        witnessed = ""
        if a.witnessed_size is not None:
            witnessed = (
                f"; witnessed: checkpoint {a.witnessed_size} cosigned by {', '.join(a.cosigners)}"
            )
        return (
            f"audit verify: OK ({a.entries} entries, {a.checkpoints} checkpoints)"
            f" log {a.log} in {db_url}{witnessed}"
        )
    if a.problem is None and a.witness_failure is not None:
        return (
            f"audit verify: NOT WITNESSED log {a.log} (intact: {a.entries} entries, "
            f"{a.checkpoints} checkpoints): {a.witness_failure}"
        )
    return f"audit verify: FAILED log {a.log}: {a.problem}"


def render_audit(console: Console, audits: list[AuditSummary], db_url: str) -> None:
    """One line a log, then the payments log's latest checkpoint (cosigned, when the
    witness cosigned the latest)."""
    for a in audits:
        console.print(_audit_line(a, db_url), soft_wrap=True)
    payments = next((a for a in audits if a.log == PAYMENTS_SERVICE), None)
    if payments is None or not payments.latest_note:
        return
    note, cosigned = payments.latest_note, ""
    if payments.witnessed_note and payments.witnessed_size == payments.entries:
        note, cosigned = payments.witnessed_note, f", cosigned by {', '.join(payments.cosigners)}"
    console.print(
        "latest checkpoint of the payments log (C2SP signed note, "
        f"verified with vkey {payments.vkey}{cosigned}):",
        soft_wrap=True,
    )
    console.print(note.rstrip("\n"), soft_wrap=True)


def _render_run(console: Console, run: AxidRun, printed_from: str, title: str, what: str) -> None:
    """A child ``axid`` command, its output (up to ``printed_from``, the part printed
    above already; all of it when it failed), and ``title: OK what`` or FAILED."""
    console.print(f"$ axid {' '.join(run.args)}", soft_wrap=True)
    output = run.output
    if run.ok:
        output = output.split(printed_from, 1)[0]
    for line in output.rstrip("\n").splitlines():
        console.print(f"  {line}", soft_wrap=True)
    if run.ok:
        console.print(f"{title}: OK {what}", soft_wrap=True)
    else:
        code = "no exit" if run.code is None else f"exit {run.code}"
        console.print(f"{title}: FAILED ({code}) {what}", soft_wrap=True)


def render_witnessed_audit(console: Console, audit: WitnessedAudit) -> None:
    """The auditor's verify with the witness: the command, its report, the result."""
    what = f"the {audit.log} log, with the witness's cosignature required (quorum {WITNESS_QUORUM})"
    _render_run(console, audit, "latest checkpoint (keep it", "audit verify --witness", what)


def render_receipt_check(console: Console, check: ReceiptAudit, step: int) -> None:
    """The receipt check's command, its output and result."""
    what = f"the receipt of step {step} (seq {check.seq}) against the {check.log} log"
    _render_run(console, check, "the log's latest signed checkpoint:", "audit receipt check", what)


def render_failure(console: Console, message: str) -> None:
    """The verdict when something did not do what it should (``demo: FAILED...``)."""
    console.print(message, style="bold red", soft_wrap=True)


def render_success(console: Console, steps: int, elapsed: float, layout: DemoLayout | None) -> None:
    """The verdict; with ``layout`` (a kept ``--dir``), how to audit it again."""
    console.print(
        f"demo: all {steps} steps did what they should, both logs verify and "
        f"are witnessed, the refund's receipt checks ({elapsed:.1f} s)",
        style="bold green",
        soft_wrap=True,
    )
    if layout is None:
        return
    console.print(
        f"kept in {layout.root}; audit it again with: axid "
        f"{' '.join(witnessed_verify_args(layout, PAYMENTS_SERVICE, None))} "
        "(new entries are cosigned in the background: --max-unwitnessed N allows "
        "N entries after the newest cosigned checkpoint); check the refund's "
        f"receipt again with: axid audit receipt check {layout.receipt_file} "
        f"--vkey {layout.vkey_file(PAYMENTS_SERVICE)} --db {layout.db_url} "
        f"--log {PAYMENTS_SERVICE}",
        soft_wrap=True,
    )


def print_endpoints(console: Console, stack: DemoStack) -> None:
    """``--keep-running``: how to try it by hand, then the plain lines scripts read
    (each flushed), ending with ``ready``."""
    layout = stack.layout
    certs = layout.certs
    console.print(
        "still serving; mint as the planner with: axid token mint "
        f"--issuer {stack.issuer_url} --cert {certs}/planner.pem --key {certs}/planner.key "
        f"--bundle {certs}/bundle.pem --agent planner --run my-run --aud payments "
        '--scope "payments:read"; the witness serves POST '
        f"{stack.witness_url}/add-checkpoint (its state: {layout.witness_dir}/witness.db); "
        "Ctrl-C stops the servers",
        soft_wrap=True,
    )
    console.file.flush()
    for line in (
        f"issuer: {stack.issuer_url}",
        f"payments: {stack.payments_url}",
        f"witness: {stack.witness_url}",
        f"certs: {certs}",
        f"keys: {layout.keys}",
        f"audit: {layout.db_url}",
        "ready",
    ):
        print(line, flush=True)
