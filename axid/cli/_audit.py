"""`axid audit`: the auditor's commands over the decision log.

Exit codes (the contract in DESIGN.md): 0 success / log intact, 1 tampering
found (``verify``; ``show`` and ``tree`` when a row read disagrees with its
entry bytes or an entry is malformed), 2 usage or I/O error (missing database
or bundle, unknown log or run, several logs without ``--log``, no key to verify
with, unreadable files, bad vkey, a size with no checkpoint). Click's own usage
errors also exit 2.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from axid.audit.quorum import QuorumError, WitnessPolicy
from axid.audit.verify import (
    DatabaseSource,
    ExportDirSource,
    VerifyReport,
    VerifyUsageError,
    load_vkey_arg,
    load_witness_arg,
    verify_log,
)
from axid.cli._receipt import receipt_app

if TYPE_CHECKING:
    from axid.audit.tree import RunNode

app = typer.Typer(help="Verify, export and inspect the decision log.", no_args_is_help=True)

DEFAULT_DB = "sqlite:///.axid/axid.db"
EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
PROGRESS_THRESHOLD = 10_000  # entries; smaller logs verify before a bar would help
_MAX_TRUSTED_CP = (1 << 20) + 1
_ORIGIN_PREFIX = "axid/"

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
def _db_sources(
    db: str | None, log: str | None, *, every_log: bool = False, as_json: bool = False
) -> Iterator[list[DatabaseSource]]:
    """Open the log ``log`` (or, with ``every_log`` and no ``log``, every log in the
    database); any way that fails is a usage/IO error (exit 2)."""
    url = db or DEFAULT_DB
    try:
        if every_log and log is None:
            sources = DatabaseSource.open_all(url)
        else:
            sources = [DatabaseSource(url, log)]
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    try:
        yield sources
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    except Exception as e:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(e, SQLAlchemyError):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            _fail(f"cannot read the database: {first}", as_json=as_json)
        raise
    finally:
        for source in sources:
            source.close()


@contextmanager
def _db(db: str | None, log: str | None, *, as_json: bool = False) -> Iterator[DatabaseSource]:
    """Open one log (``--log``, or the database's only one)."""
    with _db_sources(db, log, as_json=as_json) as sources:
        yield sources[0]


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
        "witness": _witness_json(report),
    }


def _witness_json(report: VerifyReport) -> dict[str, Any] | None:
    """The witness quorum's outcome (None when no quorum was asked for)."""
    if report.quorum is None:
        return None
    note = report.witnessed_note
    return {
        "quorum": report.quorum,
        "witnesses": list(report.witnesses),
        "witnessed_size": report.witnessed_size,
        "cosigners": list(report.cosigners),
        "unwitnessed_entries": report.unwitnessed,
        "witnessed_checkpoint": None if note is None else note.decode("utf-8"),
        "failure": report.witness_failure,
    }


def _print_witnessed(report: VerifyReport) -> None:
    if report.quorum is None:
        return
    given = f"quorum {report.quorum} of {', '.join(report.witnesses)}"
    if report.witnessed_size is None:
        typer.echo(f"witnessed:     no checkpoint with a quorum ({given})")
        return
    typer.echo(
        f"witnessed:     checkpoint {report.witnessed_size}, cosigned by "
        f"{', '.join(report.cosigners)} ({given}); "
        f"{_count(report.unwitnessed or 0, 'entry', 'entries')} after it"
    )


def _print_report(report: VerifyReport, log: str | None) -> None:
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    fb = report.first_bad
    if report.ok:
        typer.echo("OK: the log is intact" + (" and witnessed" if report.quorum else ""))
    elif fb is None:
        typer.echo(f"NOT WITNESSED: {report.witness_failure}")
    else:
        seq = "unknown" if fb.seq is None else str(fb.seq)
        typer.echo("TAMPERED: the log fails verification")
        typer.echo(f"first bad seq: {seq}")
        if fb.checkpoint_size is not None:
            typer.echo(f"checkpoint:    {fb.checkpoint_size}")
        typer.echo(f"what:          {fb.what}")
    if log:
        typer.echo(f"log:           {log}")
    intact = fb is None  # the log verified (a quorum may still be missing)
    typer.echo(f"entries:       {report.entries}" + ("" if intact else " (read)"))
    typer.echo(f"checkpoints:   {report.checkpoints}" + ("" if intact else " (read)"))
    if intact and report.root is not None:
        typer.echo(f"root:          {_b64(report.root)}")
    if report.vkey:
        typer.echo(f"vkey:          {report.vkey}")
    _print_witnessed(report)
    if report.latest_note is not None:
        if intact:
            typer.echo("latest checkpoint (keep it; pass it as --trusted-checkpoint next time):")
        else:
            typer.echo("last checkpoint that verified:")
        typer.echo(report.latest_note.decode("utf-8"), nl=False)


def _run_verify(
    source: Any,
    *,
    vkey: str | None,
    trusted: bytes | None,
    as_json: bool,
    witnesses: WitnessPolicy | None = None,
) -> Any:
    total = source.size_hint() if hasattr(source, "size_hint") else None
    if as_json or total is None or total <= PROGRESS_THRESHOLD:
        return verify_log(source, vkey=vkey, trusted_checkpoint=trusted, witnesses=witnesses)
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
            witnesses=witnesses,
        )


def _key_name(vkey: str) -> str | None:
    from axid.audit.note import NoteError, NoteVerifier

    try:
        return NoteVerifier.from_vkey(vkey).name
    except NoteError:
        return None


def _check_bundle_log(source: ExportDirSource, log: str, vkey: str | None) -> None:
    """``--log`` with a bundle asserts which log it holds: a mismatch is a usage error."""
    from axid.audit.verify import SourceFormatError

    if vkey is None:
        try:
            vkey = source.vkey()
        except SourceFormatError:
            return  # verification reports the malformed vkey file
    name = None if vkey is None else _key_name(vkey)
    if name is not None and name != _ORIGIN_PREFIX + log:
        raise VerifyUsageError(f"the bundle's key is for {name!r}, not for log {log!r}")


def _bundle_log(source: ExportDirSource, log: str | None) -> str | None:
    """The log a bundle holds: ``--log``, else what its own vkey file names (to pick
    the right ``--vkey``, which verification then holds the bundle to)."""
    from axid.audit.verify import SourceFormatError

    if log is not None:
        return log
    try:
        stored = source.vkey()
    except SourceFormatError:
        return None
    name = None if stored is None else _key_name(stored)
    return name.removeprefix(_ORIGIN_PREFIX) if name and name.startswith(_ORIGIN_PREFIX) else None


@dataclass
class _Target:
    """One log to verify and what to verify it with."""

    source: Any  # DatabaseSource | ExportDirSource
    log: str | None  # its name, when known before verifying
    vkey: str | None = None
    trusted: bytes | None = None


@dataclass(frozen=True)
class _Trusted:
    path: Path
    origin: str
    note: bytes


def _vkeys(values: list[str]) -> dict[str, str]:
    """The ``--vkey`` values by key name (a log takes the one named after its origin)."""
    keys: dict[str, str] = {}
    for value in values:
        key = load_vkey_arg(value)
        name = _key_name(key) or ""  # load_vkey_arg checked it parses
        if keys.setdefault(name, key) != key:
            raise VerifyUsageError(f"two different --vkey for {name!r}")
    return keys


def _witness_policy(
    values: list[str], quorum: int | None, max_unwitnessed: int | None
) -> WitnessPolicy | None:
    """The quorum ``--witness``/``--quorum``/``--max-unwitnessed`` ask for (None: none)."""
    try:
        return WitnessPolicy.from_options(
            [load_witness_arg(v) for v in values], quorum, max_unwitnessed
        )
    except QuorumError as e:
        raise VerifyUsageError(str(e)) from e


def _read_trusted(paths: list[Path]) -> list[_Trusted]:
    out: list[_Trusted] = []
    for p in paths:
        try:
            with p.open("rb") as f:
                note = f.read(_MAX_TRUSTED_CP)
        except OSError as e:
            raise VerifyUsageError(f"cannot read trusted checkpoint {p}: {e.strerror}") from e
        origin = note.split(b"\n", 1)[0].decode("utf-8", "replace")
        if any(t.origin == origin for t in out):
            raise VerifyUsageError(f"two --trusted-checkpoint for origin {origin!r}")
        out.append(_Trusted(p, origin, note))
    return out


def _assign_keys(targets: list[_Target], keys: dict[str, str]) -> None:
    """Each log takes the ``--vkey`` named after its origin; a single log and a
    single key are paired as given (verification says if they do not match)."""
    for t in targets:
        origin = None if t.log is None else _ORIGIN_PREFIX + t.log
        if origin is not None and origin in keys:
            t.vkey = keys[origin]
        elif len(keys) == 1 and len(targets) == 1:
            t.vkey = next(iter(keys.values()))
        else:
            what = f"log {t.log!r} (a key named {origin!r})" if t.log else "the bundle (--log)"
            raise VerifyUsageError(f"no --vkey for {what}; or use --trust-log-key")


def _assign_trusted(targets: list[_Target], trusted: list[_Trusted]) -> None:
    """Each log takes the trusted checkpoint of its origin; a single log and a single
    checkpoint are paired as given (verification says if they do not match)."""
    if len(targets) == 1 and len(trusted) == 1:
        targets[0].trusted = trusted[0].note
        return
    by_origin = {t.origin: t for t in trusted}
    for t in targets:
        mine = None if t.log is None else by_origin.pop(_ORIGIN_PREFIX + t.log, None)
        t.trusted = None if mine is None else mine.note
    for left in by_origin.values():
        raise VerifyUsageError(
            f"--trusted-checkpoint {left.path} is for {left.origin!r}, not a log verified here"
        )


def _verify_targets(
    targets: list[_Target], as_json: bool, witnesses: WitnessPolicy | None = None
) -> list[tuple[str | None, Any]]:
    results: list[tuple[str | None, Any]] = []
    for t in targets:
        report = _run_verify(
            t.source, vkey=t.vkey, trusted=t.trusted, as_json=as_json, witnesses=witnesses
        )
        name = getattr(t.source, "log_name", None) or t.log
        if name is None and report.vkey is not None:
            key = report.vkey.split("+", 1)[0]
            name = key.removeprefix(_ORIGIN_PREFIX) if key.startswith(_ORIGIN_PREFIX) else None
        results.append((name, report))
    return results


def _emit_reports(results: list[tuple[str | None, Any]], *, several: bool, as_json: bool) -> None:
    """One report, or (``several``: every log of a database) one per log."""
    if as_json:
        docs = [_report_json(r, log) for log, r in results]
        out: Any = {"ok": all(r.ok for _, r in results), "logs": docs} if several else docs[0]
        typer.echo(json.dumps(out, indent=2))
        return
    for i, (log, report) in enumerate(results):
        if several:
            typer.echo(("\n" if i else "") + f"== log {log} ==")
        _print_report(report, log)
    if several:
        bad = [str(log) for log, r in results if r.first_bad is not None]
        unwitnessed = [str(log) for log, r in results if not r.ok and r.first_bad is None]
        verdicts = [f"TAMPERED: {', '.join(bad)}"] if bad else []
        verdicts += [f"NOT WITNESSED: {', '.join(unwitnessed)}"] if unwitnessed else []
        verdict = "; ".join(verdicts) or "all intact"
        typer.echo(f"\n{_count(len(results), 'log')}: {verdict}")


def _verify_bundle(bundle: Path, log: str | None, keys: dict[str, str]) -> _Target:
    source = ExportDirSource(bundle)
    target = _Target(source, _bundle_log(source, log))
    if keys:
        _assign_keys([target], keys)
    if log is not None:
        _check_bundle_log(source, log, target.vkey)
        source.log_name = log
    return target


_VkeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vkey",
        metavar="VKEY_OR_FILE",
        help="A log's published verifier key (or a file holding it), obtained out of band. "
        "Repeatable: each log takes the key named after its origin (axid/<log>).",
        show_default=False,
    ),
]
_TrustLogKeyOpt = Annotated[
    bool,
    typer.Option(
        "--trust-log-key",
        help="Instead of --vkey, use the key stored with the log: only as trustworthy "
        "as the log itself (a warning says so).",
    ),
]
_WitnessOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--witness",
        metavar="VKEY_OR_FILE",
        help="A witness's vkey (or a file holding it): type 0x04 (Ed25519) or 0x06 "
        "(ML-DSA-44). Repeatable; with --quorum.",
        show_default=False,
    ),
]
_QuorumOpt = Annotated[
    int | None,
    typer.Option(
        "--quorum",
        metavar="K",
        help="Require a checkpoint cosigned by K distinct witnesses among --witness "
        "(a witness's keys count once); an invalid cosignature by one is tampering.",
        show_default=False,
    ),
]
_MaxUnwitnessedOpt = Annotated[
    int | None,
    typer.Option(
        "--max-unwitnessed",
        metavar="N",
        help="With --quorum: at most N entries after the newest witnessed checkpoint "
        "(default: any number).",
        show_default=False,
    ),
]
_TrustedOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-checkpoint",
        metavar="FILE",
        help="A signed checkpoint kept from an earlier verification: catches "
        "truncation, rollback and forks. Repeatable: each log takes the one of its origin.",
        show_default=False,
    ),
]


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
    log: Annotated[
        str | None,
        typer.Option("--log", help="Verify only this log (default: every log in the database)."),
    ] = None,
    vkey: _VkeyOpt = None,
    trust_log_key: _TrustLogKeyOpt = False,
    trusted_checkpoint: _TrustedOpt = None,
    witness: _WitnessOpt = None,
    quorum: _QuorumOpt = None,
    max_unwitnessed: _MaxUnwitnessedOpt = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the report as JSON (several logs: {ok, logs: [...]})."),
    ] = False,
) -> None:
    """Re-hash every entry; check the chain, the checkpoints and the index columns.

    Checks every checkpoint's signature and root and (database) that each row's
    index columns agree with its entry bytes. Without --log, every log in the
    database, one report each. With --witness ... --quorum K, a checkpoint must
    also carry valid cosignatures by K of the witnesses (and at most
    --max-unwitnessed entries follow it). Exit 0 intact (and witnessed), 1
    tampering found (prints the first bad seq) or no quorum, 2 usage/IO error.
    """
    if bundle is not None and db is not None:
        _fail("give either BUNDLE_DIR or --db, not both", as_json=as_json)
    if not vkey and not trust_log_key:
        _fail(
            "no key to verify with: pass the log's published key with --vkey (one per log), "
            "or --trust-log-key to use the key stored with the log (only as trustworthy as "
            "the log itself)",
            as_json=as_json,
        )
    if vkey and trust_log_key:
        _fail("give either --vkey or --trust-log-key, not both", as_json=as_json)
    try:
        policy = _witness_policy(witness or [], quorum, max_unwitnessed)
        keys = _vkeys(vkey or [])
        trusted = _read_trusted(trusted_checkpoint or [])
        if bundle is not None:
            targets = [_verify_bundle(bundle, log, keys)]
            _assign_trusted(targets, trusted)
            results = _verify_targets(targets, as_json, policy)
        else:
            with _db_sources(db, log, every_log=True, as_json=as_json) as sources:
                targets = [_Target(s, s.log_name) for s in sources]
                if keys:
                    _assign_keys(targets, keys)
                _assign_trusted(targets, trusted)
                results = _verify_targets(targets, as_json, policy)
    except VerifyUsageError as e:
        _fail(str(e), as_json=as_json)
    _emit_reports(results, several=bundle is None and log is None, as_json=as_json)
    raise typer.Exit(EXIT_OK if all(r.ok for _, r in results) else EXIT_TAMPERED)


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


@dataclass(frozen=True)
class _ShowFilter:
    """``show``'s filters, applied to what the entry bytes say."""

    decision: str | None = None
    tenant: str | None = None
    agent: str | None = None
    run: str | None = None
    since_ms: int | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        from axid.audit.entry import parse_ts

        for name in ("decision", "tenant", "agent", "run"):
            want = getattr(self, name)
            if want is not None and entry[name] != want:
                return False
        return self.since_ms is None or parse_ts(entry["ts"]) >= self.since_ms


@dataclass
class _Listing:
    """What ``show`` read: the matching entries (each with what its row's index
    columns say that its bytes do not), and the rows that fail their bytes."""

    rows: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    tampered: int = 0  # rows read whose index columns disagree with their bytes
    tampered_hidden: int = 0  # of those, rows whose bytes do not match the filters
    malformed: int = 0  # rows whose bytes are no entry at all

    @property
    def clean(self) -> bool:
        return not self.tampered and not self.malformed


def _scan_show(source: DatabaseSource, want: _ShowFilter, limit: int) -> _Listing:
    """Read the log in order, parse every entry, keep those whose BYTES match."""
    from axid.audit.entry import EntryError, parse_entry
    from axid.audit.verify import index_disagreements

    out = _Listing()
    for _seq, data, _leaf, *index in source.entries():
        try:
            entry = parse_entry(data)
        except EntryError:
            out.malformed += 1
            continue
        wrong = index_disagreements(entry, index)
        shown = want.matches(entry)
        out.tampered += bool(wrong)
        out.tampered_hidden += bool(wrong) and not shown
        if shown:
            out.rows.append((entry, wrong))
            if limit and len(out.rows) >= limit:
                break
    return out


def _count(n: int, noun: str, nouns: str | None = None) -> str:
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def _show_warnings(listing: _Listing) -> None:
    if listing.tampered:
        hidden = listing.tampered_hidden
        typer.echo(
            "warning: index columns disagree with the entry bytes in "
            f"{_count(listing.tampered, 'row')} read (shown marked TAMPERED"
            + (f"; {hidden} of them do not match the filters, not shown" if hidden else "")
            + "): the database was edited; run `axid audit verify`",
            err=True,
        )
    if listing.malformed:
        typer.echo(
            f"warning: {_count(listing.malformed, 'stored entry', 'stored entries')} "
            "malformed (not shown); "
            "run `axid audit verify`",
            err=True,
        )


def _show_table(listing: _Listing, log: str | None, limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    marked = any(wrong for _, wrong in listing.rows)
    table = Table(title=_cell(f"decision log {log}"), show_lines=False)
    for col in (*_COLUMNS, "tampered") if marked else _COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("seq", "decision"))
    for entry, wrong in listing.rows:
        cells: list[Any] = [_show_cell(entry, c) for c in _COLUMNS]
        if marked:
            cells.append(_cell("TAMPERED: " + "; ".join(wrong)) if wrong else "")
            if wrong:
                cells[-1].stylize("bold red")
        table.add_row(*cells)
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    n = len(listing.rows)
    more = f" (limit {limit}; --limit 0 for all)" if limit and n == limit else ""
    console.print(f"{n} entries{more}")


def _show_cell(entry: dict[str, Any], col: str) -> Any:
    value = entry.get(col)
    if value is None:
        return ""
    if col == "decision":
        return "[green]allow[/]" if value == "allow" else "[red]deny[/]"
    return _cell(value)


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
    """List entries (oldest first) whose bytes match every filter given.

    Reads every entry in order (up to the --limit-th match) and filters on what
    its bytes say, never on the database's index columns. A row whose columns
    disagree with its bytes is marked TAMPERED (JSON: a "tampered" list) and
    the exit status is 1, as it is for a malformed entry; only `axid audit
    verify` says whether the log is authentic.
    """
    want = _ShowFilter(
        decision.value if decision is not None else None,
        tenant,
        agent,
        run,
        _parse_since(since) if since is not None else None,
    )
    with _db(db, log) as source:
        listing = _scan_show(source, want, limit)
    _show_warnings(listing)
    if as_json:
        docs = [{**e, "tampered": wrong} if wrong else e for e, wrong in listing.rows]
        typer.echo(json.dumps(docs, indent=2, ensure_ascii=False))
    else:
        _show_table(listing, source.log_name, limit)
    raise typer.Exit(EXIT_OK if listing.clean else EXIT_TAMPERED)


# C0 and C1 controls and DEL: shown as \xNN, never sent to the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _cell(value: object) -> Any:
    """A stored value as literal text: rich markup (``[/]``, ``[conceal]``), emoji
    codes and terminal control characters in it are shown, never interpreted."""
    from rich.text import Text

    return Text(_UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


# ------------------------------------------------------------------ proof, consistency, vkey

_SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        min=0,
        help="The size of a stored checkpoint to prove against (default: the latest).",
        show_default=False,
    ),
]


def _stored_failure(e: Exception) -> NoReturn:
    """A proof that cannot be made from what is stored: say so (exit 2)."""
    if isinstance(e, KeyError):
        _fail(f"the stored Merkle tree is incomplete (node {e}); run `axid audit verify`")
    _fail(f"the stored checkpoint is malformed ({e}); run `axid audit verify`")


@app.command()
def proof(
    seq: Annotated[int, typer.Argument(help="The entry's seq.", min=0)],
    size: _SizeOpt = None,
    db: _DbOpt = None,
    log: _LogOpt = None,
) -> None:
    """Print a C2SP tlog-proof: entry SEQ's inclusion in a signed checkpoint.

    The checkpoint of size N with --size N, else the latest; exit 2 when there
    is no checkpoint of that size or SEQ is not below it.
    """
    from axid.audit.store import NotFound, proof_text

    with _db(db, log) as source:
        try:
            hashes, note = source.store.inclusion_proof(seq, size)
        except NotFound as e:
            _fail(str(e))
        except KeyError as e:
            _stored_failure(e)
        try:
            text = proof_text(seq, hashes, note)
        except ValueError as e:
            _stored_failure(e)
    typer.echo(text, nl=False)


def _consistency(source: DatabaseSource, old: int, size: int | None) -> str:
    """The consistency proof from size ``old`` to the checkpoint of ``size``, as text."""
    from axid.audit.store import NotFound, consistency_text

    name = source.log_name
    if size is None:
        if source.max_cp < 0:
            _fail(f"log {name!r} has no checkpoint yet")
        size = source.max_cp
    note = source.store.checkpoint(size)
    if note is None:
        _fail(f"log {name!r} has no checkpoint at size {size}")
    if old > size:
        _fail(f"old size {old} is larger than the checkpoint's size {size}")
    try:
        hashes = source.store.consistency_proof(old, size)
    except NotFound as e:
        _fail(str(e))
    except KeyError as e:
        _stored_failure(e)
    try:
        return consistency_text(old, hashes, note)
    except ValueError as e:
        _stored_failure(e)


@app.command()
def consistency(
    old: Annotated[int, typer.Argument(help="The older tree size to prove from.", min=0)],
    size: _SizeOpt = None,
    db: _DbOpt = None,
    log: _LogOpt = None,
) -> None:
    """Print the consistency proof from tree size OLD to a signed checkpoint.

    The checkpoint of size N with --size N, else the latest, in the C2SP
    tlog-witness add-checkpoint request form: "old OLD", one base64 hash a
    line, an empty line, the signed checkpoint. OLD 0 and OLD = N give an
    empty proof; exit 2 when there is no checkpoint of that size or OLD > N.
    """
    with _db(db, log) as source:
        text = _consistency(source, old, size)
    typer.echo(text, nl=False)


# --------------------------------------------------------------------------- tree


def _tree_entries(sources: list[DatabaseSource], malformed: list[int]) -> Iterator[dict[str, Any]]:
    """Every parsed entry of the logs, log by log, in order; ``malformed[0]`` counts
    the rows whose bytes are no entry (skipped)."""
    from axid.audit.entry import EntryError, parse_entry

    for source in sources:
        for row in source.entries():
            try:
                yield parse_entry(row[1])
            except EntryError:
                malformed[0] += 1


def _tree_label(node: RunNode, run: str) -> Any:
    from rich.text import Text

    label = Text()
    label.append_text(_cell(node.run))
    label.stylize("bold cyan" if node.run == run else "bold")
    label.append(f"  agent {', '.join(node.agents) or '?'}", style="default")
    label.append(f"  workload {', '.join(node.workloads) or '?'}", style="dim")
    return label


def _decision_line(d: Any, with_log: bool) -> Any:
    from rich.text import Text

    line = Text()
    line.append_text(_cell(f"{d.ts}  {d.method or '-'} {d.path or '-'}  "))
    line.append(d.decision, style="green" if d.decision == "allow" else "red")
    line.append_text(_cell(f"  {d.reason}  seq {d.seq}" + (f"  ({d.log})" if with_log else "")))
    return line


def _render_tree(node: RunNode, run: str, with_log: bool, parent: Any = None) -> Any:
    from rich.tree import Tree

    label = _tree_label(node, run)
    branch = Tree(label) if parent is None else parent.add(label)
    for d in node.decisions:
        branch.add(_decision_line(d, with_log))
    for child in node.children:
        _render_tree(child, run, with_log, branch)
    return branch


@app.command()
def tree(
    run: Annotated[str, typer.Argument(help="A run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
    db: _DbOpt = None,
    log: Annotated[
        str | None,
        typer.Option("--log", help="Read only this log (default: every log in the database)."),
    ] = None,
) -> None:
    """Show the spawn tree RUN belongs to, from its root, with every decision.

    Each run with its agent and workload (the peer SPIFFE ID of its entries),
    and under it its decisions in time order: time, method and path, decision,
    reason, seq (and the log, when several are read). Built from what the entry
    bytes say; exit 2 when no entry names RUN, 1 when a stored entry is
    malformed (left out; run `axid audit verify`).
    """
    from axid.audit.tree import build_tree, find_root

    malformed = [0]
    with _db_sources(db, log, every_log=True) as sources:
        root = find_root(run, _tree_entries(sources, [0]))
        if root is None:
            _fail(f"no entries for run {run!r} in log(s) {', '.join(_names(sources))}")
        top = build_tree(root, _tree_entries(sources, malformed))
        names = _names(sources)
    if malformed[0]:
        typer.echo(
            f"warning: {_count(malformed[0], 'stored entry', 'stored entries')} malformed "
            "(left out); run `axid audit verify`",
            err=True,
        )
    if as_json:
        doc = {"run": run, "root": root, "logs": names, "tree": top.to_json()}
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        from rich.console import Console

        console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
        console.print(_render_tree(top, run, with_log=len(names) > 1))
    raise typer.Exit(EXIT_TAMPERED if malformed[0] else EXIT_OK)


def _names(sources: list[DatabaseSource]) -> list[str]:
    return [str(s.log_name) for s in sources]


@app.command("vkey")
def vkey_cmd(db: _DbOpt = None, log: _LogOpt = None) -> None:
    """Print the log's verifier key line (publish it; auditors pass it as --vkey)."""
    with _db(db, log) as source:
        v = source.vkey()
    typer.echo(v)


app.add_typer(receipt_app, name="receipt")
