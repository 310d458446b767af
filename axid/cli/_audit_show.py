"""`axid audit show` and `axid audit tree`: the log's entries, filtered or as the
spawn tree of a run, from what the entry bytes say."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from axid.audit.verify import DatabaseSource
from axid.cli._audit_common import (
    EXIT_OK,
    EXIT_TAMPERED,
    DbOpt,
    LogOpt,
    cell,
    counted,
    fail,
    log_names,
    open_log,
    open_logs,
)

if TYPE_CHECKING:
    from axid.audit.tree import RunNode


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


def _show_warnings(listing: _Listing) -> None:
    if listing.tampered:
        hidden = listing.tampered_hidden
        typer.echo(
            "warning: index columns disagree with the entry bytes in "
            f"{counted(listing.tampered, 'row')} read (shown marked TAMPERED"
            + (f"; {hidden} of them do not match the filters, not shown" if hidden else "")
            + "): the database was edited; run `axid audit verify`",
            err=True,
        )
    if listing.malformed:
        typer.echo(
            f"warning: {counted(listing.malformed, 'stored entry', 'stored entries')} "
            "malformed (not shown); "
            "run `axid audit verify`",
            err=True,
        )


def _show_table(listing: _Listing, log: str | None, limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    marked = any(wrong for _, wrong in listing.rows)
    table = Table(title=cell(f"decision log {log}"), show_lines=False)
    for col in (*_COLUMNS, "tampered") if marked else _COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("seq", "decision"))
    for entry, wrong in listing.rows:
        cells: list[Any] = [_show_cell(entry, c) for c in _COLUMNS]
        if marked:
            cells.append(cell("TAMPERED: " + "; ".join(wrong)) if wrong else "")
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
    return cell(value)


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
    db: DbOpt = None,
    log: LogOpt = None,
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
    with open_log(db, log) as source:
        listing = _scan_show(source, want, limit)
    _show_warnings(listing)
    if as_json:
        docs = [{**e, "tampered": wrong} if wrong else e for e, wrong in listing.rows]
        typer.echo(json.dumps(docs, indent=2, ensure_ascii=False))
    else:
        _show_table(listing, source.log_name, limit)
    raise typer.Exit(EXIT_OK if listing.clean else EXIT_TAMPERED)


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
    label.append_text(cell(node.run))
    label.stylize("bold cyan" if node.run == run else "bold")
    label.append(f"  agent {', '.join(node.agents) or '?'}", style="default")
    label.append(f"  workload {', '.join(node.workloads) or '?'}", style="dim")
    return label


def _decision_line(d: Any, with_log: bool) -> Any:
    from rich.text import Text

    line = Text()
    line.append_text(cell(f"{d.ts}  {d.method or '-'} {d.path or '-'}  "))
    line.append(d.decision, style="green" if d.decision == "allow" else "red")
    line.append_text(cell(f"  {d.reason}  seq {d.seq}" + (f"  ({d.log})" if with_log else "")))
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


def tree(
    run: Annotated[str, typer.Argument(help="A run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
    db: DbOpt = None,
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
    with open_logs(db, log, every_log=True) as sources:
        root = find_root(run, _tree_entries(sources, [0]))
        if root is None:
            fail(f"no entries for run {run!r} in log(s) {', '.join(log_names(sources))}")
        top = build_tree(root, _tree_entries(sources, malformed))
        names = log_names(sources)
    if malformed[0]:
        typer.echo(
            f"warning: {counted(malformed[0], 'stored entry', 'stored entries')} malformed "
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
