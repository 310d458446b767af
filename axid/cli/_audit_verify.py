"""`axid audit verify`: re-hash a log (the database's logs, or an export bundle)
and check it against the keys, trusted checkpoints and witnesses given."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from axid.audit.quorum import QuorumError, WitnessPolicy
from axid.audit.verify import (
    ExportDirSource,
    VerifyReport,
    VerifyUsageError,
    load_vkey_arg,
    load_witness_arg,
    verify_log,
)
from axid.cli._audit_common import (
    EXIT_OK,
    EXIT_TAMPERED,
    DbOpt,
    WitnessOpt,
    counted,
    fail,
    open_logs,
)

PROGRESS_THRESHOLD = 10_000  # entries; smaller logs verify before a bar would help
_MAX_TRUSTED_CP = (1 << 20) + 1
_ORIGIN_PREFIX = "axid/"


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
        f"{counted(report.unwitnessed or 0, 'entry', 'entries')} after it"
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


def _check_bundle_log(source: ExportDirSource, log: str) -> None:
    """``--log`` with a bundle asserts which log it holds (its first entry says): a
    mismatch is a usage error. Verification then holds every entry to it."""
    try:
        with (source.path / "entries.jsonl").open("rb") as f:
            first = json.loads(f.readline(_MAX_TRUSTED_CP))
    except (OSError, ValueError):
        return  # verification reports what is wrong with the bundle
    name = first.get("log") if isinstance(first, dict) else None
    if isinstance(name, str) and name != log:
        raise VerifyUsageError(f"the bundle holds log {name!r}, not {log!r}")


def _bundle_origin(source: ExportDirSource) -> str | None:
    """The origin a bundle's own vkey file names (to pick the right ``--vkey`` and
    ``--trusted-checkpoint``, which verification then holds the bundle to)."""
    from axid.audit.verify import SourceFormatError

    try:
        stored = source.vkey()
    except SourceFormatError:
        return None  # verification reports the malformed vkey file
    return None if stored is None else _key_name(stored.strip())


@dataclass
class _Target:
    """One log to verify and what to verify it with."""

    source: Any  # DatabaseSource | ExportDirSource
    log: str | None  # its name, when known before verifying
    origin: str | None  # the origin stored with it (a bundle: its vkey's name)
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
    """Each log takes the ``--vkey`` named after its stored origin; a single log and
    a single key are paired as given (verification says if they do not match)."""
    for t in targets:
        origin = t.origin
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
        mine = None if t.origin is None else by_origin.pop(t.origin, None)
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
        typer.echo(f"\n{counted(len(results), 'log')}: {verdict}")


def _verify_bundle(bundle: Path, log: str | None, keys: dict[str, str]) -> _Target:
    """A bundle, its log named by ``--log`` (its entries must say so), else by its
    default origin ``axid/<log>``, else by its first entry."""
    source = ExportDirSource(bundle)
    origin = _bundle_origin(source)
    name = log
    if name is None and origin is not None and origin.startswith(_ORIGIN_PREFIX):
        name = origin.removeprefix(_ORIGIN_PREFIX)
    target = _Target(source, name, origin)
    if keys:
        _assign_keys([target], keys)
    if log is not None:
        _check_bundle_log(source, log)
        source.log_name = log
    return target


def _check_sources_and_keys(
    bundle: Path | None,
    db: str | None,
    vkey: list[str] | None,
    trust_log_key: bool,
    *,
    as_json: bool,
) -> None:
    """One place to read from, and exactly one way to get the key (exit 2 otherwise)."""
    if bundle is not None and db is not None:
        fail("give either BUNDLE_DIR or --db, not both", as_json=as_json)
    if not vkey and not trust_log_key:
        fail(
            "no key to verify with: pass the log's published key with --vkey (one per log), "
            "or --trust-log-key to use the key stored with the log (only as trustworthy as "
            "the log itself)",
            as_json=as_json,
        )
    if vkey and trust_log_key:
        fail("give either --vkey or --trust-log-key, not both", as_json=as_json)


_VkeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vkey",
        metavar="VKEY_OR_FILE",
        help="A log's published verifier key (or a file holding it), obtained out of band. "
        "Repeatable: each log takes the key named after its origin (log.origin, "
        "default axid/<log>).",
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


def verify(
    bundle: Annotated[
        Path | None,
        typer.Argument(
            help="An export bundle directory to verify instead of the database.",
            show_default=False,
        ),
    ] = None,
    db: DbOpt = None,
    log: Annotated[
        str | None,
        typer.Option("--log", help="Verify only this log (default: every log in the database)."),
    ] = None,
    vkey: _VkeyOpt = None,
    trust_log_key: _TrustLogKeyOpt = False,
    trusted_checkpoint: _TrustedOpt = None,
    witness: WitnessOpt = None,
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
    _check_sources_and_keys(bundle, db, vkey, trust_log_key, as_json=as_json)
    try:
        policy = _witness_policy(witness or [], quorum, max_unwitnessed)
        keys = _vkeys(vkey or [])
        trusted = _read_trusted(trusted_checkpoint or [])
        if bundle is not None:
            targets = [_verify_bundle(bundle, log, keys)]
            _assign_trusted(targets, trusted)
            results = _verify_targets(targets, as_json, policy)
        else:
            with open_logs(db, log, every_log=True, as_json=as_json) as sources:
                targets = [_Target(s, s.log_name, s.origin) for s in sources]
                if keys:
                    _assign_keys(targets, keys)
                _assign_trusted(targets, trusted)
                results = _verify_targets(targets, as_json, policy)
    except VerifyUsageError as e:
        fail(str(e), as_json=as_json)
    _emit_reports(results, several=bundle is None and log is None, as_json=as_json)
    raise typer.Exit(EXIT_OK if all(r.ok for _, r in results) else EXIT_TAMPERED)
