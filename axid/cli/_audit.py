"""`axid audit`: the auditor's commands over the decision log.

Exit codes (the contract in DESIGN.md): 0 success / log intact, 1 tampering
found (``verify`` only), 2 usage or I/O error (missing database or bundle,
unknown log, several logs without ``--log``, unreadable files, bad vkey).
Click's own usage errors also exit 2.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from axid.audit.verify import (
    DatabaseSource,
    ExportDirSource,
    VerifyReport,
    VerifyUsageError,
    load_vkey_arg,
    verify_log,
)
from axid.cli._receipt import receipt_app

app = typer.Typer(help="Verify, export and inspect the decision log.", no_args_is_help=True)

DEFAULT_DB = "sqlite:///.axid/axid.db"
EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
PROGRESS_THRESHOLD = 10_000  # entries; smaller logs verify before a bar would help
_MAX_TRUSTED_CP = (1 << 20) + 1

_DbOpt = Annotated[
    str | None,
    typer.Option("--db", help=f"Database URL (default {DEFAULT_DB}).", show_default=False),
]
_LogOpt = Annotated[
    str | None,
    typer.Option("--log", help="Log name; needed only when the database holds several logs."),
]


def _fail(msg: str, *, as_json: bool = False) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": msg}))
    raise typer.Exit(EXIT_USAGE)


@contextmanager
def _db(db: str | None, log: str | None, *, as_json: bool = False) -> Iterator[DatabaseSource]:
    """Open the log; any way that fails is a usage/IO error (exit 2)."""
    try:
        source = DatabaseSource(db or DEFAULT_DB, log)
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    try:
        yield source
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    except Exception as e:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(e, SQLAlchemyError):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            _fail(f"cannot read the database: {first}", as_json=as_json)
        raise
    finally:
        source.close()


# --------------------------------------------------------------------------- verify


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode("ascii")


def _report_json(report: VerifyReport, log: str | None) -> dict[str, Any]:
    cp = report.latest_checkpoint
    fb = report.first_bad
    return {
        "ok": report.ok,
        "log": log,
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "root": _b64(report.root),
        "first_bad": None
        if fb is None
        else {"seq": fb.seq, "checkpoint_size": fb.checkpoint_size, "what": fb.what},
        "latest_checkpoint": None
        if cp is None
        else {
            "origin": cp.origin,
            "size": cp.size,
            "root": _b64(cp.root),
            "note": report.latest_note.decode("utf-8") if report.latest_note else None,
        },
        "vkey": report.vkey,
        "vkey_from_log": report.vkey_from_log,
        "warnings": report.warnings,
    }


def _print_report(report: VerifyReport, log: str | None) -> None:
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    if report.ok:
        typer.echo("OK: the log is intact")
    else:
        fb = report.first_bad
        assert fb is not None
        seq = "unknown" if fb.seq is None else str(fb.seq)
        typer.echo("TAMPERED: the log fails verification")
        typer.echo(f"first bad seq: {seq}")
        if fb.checkpoint_size is not None:
            typer.echo(f"checkpoint:    {fb.checkpoint_size}")
        typer.echo(f"what:          {fb.what}")
    if log:
        typer.echo(f"log:           {log}")
    typer.echo(f"entries:       {report.entries}" + ("" if report.ok else " (read)"))
    typer.echo(f"checkpoints:   {report.checkpoints}" + ("" if report.ok else " (read)"))
    if report.ok and report.root is not None:
        typer.echo(f"root:          {_b64(report.root)}")
    if report.vkey:
        typer.echo(f"vkey:          {report.vkey}")
    if report.latest_note is not None:
        if report.ok:
            typer.echo("latest checkpoint (keep it; pass it as --trusted-checkpoint next time):")
        else:
            typer.echo("last checkpoint that verified:")
        typer.echo(report.latest_note.decode("utf-8"), nl=False)


def _run_verify(source: Any, *, vkey: str | None, trusted: bytes | None, as_json: bool) -> Any:
    total = source.size_hint() if hasattr(source, "size_hint") else None
    if as_json or total is None or total <= PROGRESS_THRESHOLD:
        return verify_log(source, vkey=vkey, trusted_checkpoint=trusted)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("verifying entries", total=total)
        return verify_log(
            source,
            vkey=vkey,
            trusted_checkpoint=trusted,
            progress=lambda n: bar.update(task, completed=n),
        )


def _check_bundle_log(source: ExportDirSource, log: str, vkey: str | None) -> None:
    """``--log`` with a bundle asserts which log it holds: a mismatch is a usage error."""
    from axid.audit.note import NoteError, NoteVerifier
    from axid.audit.verify import SourceFormatError

    if vkey is None:
        try:
            vkey = source.vkey()
        except SourceFormatError:
            return  # verification reports the malformed vkey file
    if vkey is None:
        return
    try:
        name = NoteVerifier.from_vkey(vkey).name
    except NoteError:
        return
    if name != f"axid/{log}":
        raise VerifyUsageError(f"the bundle's key is for {name!r}, not for log {log!r}")


@app.command()
def verify(
    bundle: Annotated[
        Path | None,
        typer.Argument(
            help="An export bundle directory to verify instead of the database.",
            show_default=False,
        ),
    ] = None,
    db: _DbOpt = None,
    log: _LogOpt = None,
    vkey: Annotated[
        str | None,
        typer.Option(
            "--vkey",
            metavar="VKEY_OR_FILE",
            help="The log's published verifier key (or a file holding it). Without it the "
            "key stored with the log is used, which is only as trustworthy as the log.",
        ),
    ] = None,
    trusted_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--trusted-checkpoint",
            metavar="FILE",
            help="A signed checkpoint kept from an earlier verification: catches "
            "truncation, rollback and forks.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Re-hash every entry; check the chain, every checkpoint's signature and root.

    Exit 0 intact, 1 tampering found (prints the first bad seq), 2 usage/IO error.
    """
    if bundle is not None and db is not None:
        _fail("give either BUNDLE_DIR or --db, not both", as_json=as_json)
    try:
        key = load_vkey_arg(vkey) if vkey is not None else None
        trusted: bytes | None = None
        if trusted_checkpoint is not None:
            try:
                with trusted_checkpoint.open("rb") as f:
                    trusted = f.read(_MAX_TRUSTED_CP)
            except OSError as e:
                raise VerifyUsageError(
                    f"cannot read trusted checkpoint {trusted_checkpoint}: {e.strerror}"
                ) from e
        if bundle is not None:
            source: Any = ExportDirSource(bundle)
            if log is not None:
                _check_bundle_log(source, log, key)
                source.log_name = log
            report = _run_verify(source, vkey=key, trusted=trusted, as_json=as_json)
            log_name = source.log_name
        else:
            with _db(db, log, as_json=as_json) as source:
                report = _run_verify(source, vkey=key, trusted=trusted, as_json=as_json)
                log_name = source.log_name
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    if log_name is None and report.vkey is not None:
        name = report.vkey.split("+", 1)[0]
        log_name = name.removeprefix("axid/") if name.startswith("axid/") else None
    if as_json:
        typer.echo(json.dumps(_report_json(report, log_name), indent=2))
    else:
        _print_report(report, log_name)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_TAMPERED)


# --------------------------------------------------------------------------- export


@app.command()
def export(
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="New or empty directory for the bundle."),
    ],
    db: _DbOpt = None,
    log: _LogOpt = None,
) -> None:
    """Write an offline bundle: entries.jsonl, checkpoints/<size>, vkey."""
    from axid.audit.export import ExportError, export_bundle

    with _db(db, log) as source:
        try:
            result = export_bundle(source.store, None, out)
        except ExportError as e:
            _fail(str(e))
    typer.echo(
        f"exported log {result.log}: {result.entries} entries, {result.checkpoints} "
        f"checkpoints to {result.path}"
    )
    typer.echo(f"verify it offline with: axid audit verify {result.path} --vkey '{result.vkey}'")


# --------------------------------------------------------------------------- show


class _Decision(StrEnum):
    allow = "allow"
    deny = "deny"


_SECONDS_RE = re.compile(r"[0-9]+(\.[0-9]+)?")


def _parse_since(value: str) -> int:
    """Unix seconds or ISO 8601 (a time without an offset is UTC) -> unix ms."""
    v = value.strip()
    if _SECONDS_RE.fullmatch(v):
        # Exact decimal arithmetic: float would turn .693 into 692.999... ms.
        whole, _, frac = v.partition(".")
        return int(whole) * 1000 + int((frac + "000")[:3])
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither unix seconds nor an ISO 8601 time", param_hint="--since"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = int(dt.timestamp() * 1000)
    if ms < 0:
        raise typer.BadParameter(f"{value!r} is before 1970", param_hint="--since")
    return ms


_COLUMNS = ("seq", "ts", "decision", "reason", "method", "path", "tenant", "agent", "run")


@app.command()
def show(
    decision: Annotated[
        _Decision | None, typer.Option("--decision", help="Only allow or only deny.")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run.")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="TS", help="Only entries at or after TS (unix seconds or ISO 8601)."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="At most N entries (0: no limit).")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of entries.")] = False,
    db: _DbOpt = None,
    log: _LogOpt = None,
) -> None:
    """List entries (oldest first) matching every filter given.

    Shows what is stored; only `axid audit verify` says whether it is authentic.
    """
    from axid.audit.entry import EntryError, parse_entry

    since_ms = _parse_since(since) if since is not None else None
    with _db(db, log) as source:
        rows: list[dict[str, Any]] = []
        malformed = 0
        for data in source.store.query(
            decision=decision.value if decision is not None else None,
            tenant=tenant,
            agent=agent,
            run=run,
            since_ms=since_ms,
            limit=limit or None,
        ):
            try:
                rows.append(parse_entry(data))
            except EntryError:
                malformed += 1
    if malformed:
        typer.echo(
            f"warning: {malformed} stored entries are malformed (not shown); "
            "run `axid audit verify`",
            err=True,
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_cell(f"decision log {source.log_name}"), show_lines=False)
    for col in _COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("seq", "decision"))
    for r in rows:
        table.add_row(
            *(
                ""
                if r.get(c) is None
                else _cell(r[c])
                if c != "decision"
                else ("[green]allow[/]" if r[c] == "allow" else "[red]deny[/]")
                for c in _COLUMNS
            )
        )
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    more = f" (limit {limit}; --limit 0 for all)" if limit and len(rows) == limit else ""
    console.print(f"{len(rows)} entries{more}")


# C0 and C1 controls and DEL: shown as \xNN, never sent to the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _cell(value: object) -> Any:
    """A stored value as literal text: rich markup (``[/]``, ``[conceal]``), emoji
    codes and terminal control characters in it are shown, never interpreted."""
    from rich.text import Text

    return Text(_UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


# --------------------------------------------------------------------------- proof, vkey


@app.command()
def proof(
    seq: Annotated[int, typer.Argument(help="The entry's seq.", min=0)],
    db: _DbOpt = None,
    log: _LogOpt = None,
) -> None:
    """Print a C2SP tlog-proof: entry SEQ's inclusion in the latest signed checkpoint."""
    from axid.audit.store import NotFound, proof_text

    with _db(db, log) as source:
        try:
            hashes, note = source.store.inclusion_proof(seq)
        except NotFound as e:
            _fail(str(e))
        except KeyError as e:
            _fail(f"the stored Merkle tree is incomplete (node {e}); run `axid audit verify`")
        try:
            text = proof_text(seq, hashes, note)
        except ValueError as e:
            _fail(f"the stored checkpoint is malformed ({e}); run `axid audit verify`")
    typer.echo(text, nl=False)


@app.command("vkey")
def vkey_cmd(db: _DbOpt = None, log: _LogOpt = None) -> None:
    """Print the log's verifier key line (publish it; auditors pass it as --vkey)."""
    with _db(db, log) as source:
        v = source.vkey()
    typer.echo(v)


app.add_typer(receipt_app, name="receipt")
