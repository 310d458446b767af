"""`axid bench`: the README's performance figures, each beside its baseline.

The benchmarks live in ``bench/`` at the root of a source checkout, next to
the ``axid`` package; an installed wheel has none, and then this command says
so and exits 2. ``--json FILE`` writes ``{"machine": {...}, "results": [...],
"skipped": [...]}`` (see ``bench/_harness.py``).

Exit codes: 0 every selected benchmark ran or was skipped (its module absent),
1 a benchmark failed, 2 usage error or no ``bench/`` directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def bench_dir() -> Path | None:
    """``bench/`` next to the ``axid`` package, if this is a source checkout."""
    import axid

    d = Path(axid.__file__).resolve().parent.parent / "bench"
    if (d / "__init__.py").is_file() and (d / "_harness.py").is_file():
        return d
    return None


def _load_harness(d: Path) -> ModuleType:
    """Import ``d`` as the package ``bench`` and return ``bench._harness``."""
    init = d / "__init__.py"
    existing = sys.modules.get("bench")
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() != init.resolve():
            raise ImportError(f"another 'bench' package is already imported ({existing!r})")
    else:
        spec = importlib.util.spec_from_file_location(
            "bench", init, submodule_search_locations=[str(d)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {init}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["bench"]
            raise
    return importlib.import_module("bench._harness")


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:,.2f}"
    return f"{v:.3g}"


def _print_report(machine: dict[str, Any], outcomes: list[Any], quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped or captured output gets rich's 80 columns otherwise: too narrow here.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    mem = machine.get("memory_bytes")
    console.print(
        f"[bold]axid bench[/bold]{' --quick' if quick else ''}  {machine['date']}\n"
        f"{machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable)"
        + (f", {mem / 2**30:.1f} GiB" if mem else "")
        + f"\n{machine['python']} on {machine['os']}\n"
        f"cryptography {machine['cryptography']}, {machine['openssl']}, "
        f"SQLite {machine['sqlite']}"
    )
    table = Table(show_lines=False)
    table.add_column("name", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("baseline")
    table.add_column("baseline value", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("notes")
    for o in outcomes:
        r = o.result
        if r is not None:
            table.add_row(
                r.name,
                _fmt(r.value),
                r.unit,
                r.baseline,
                _fmt(r.baseline_value),
                f"{r.ratio:.3g}",
                o.detail or "",
            )
        elif o.skipped is not None:
            table.add_row(o.name, "-", "", "", "", "", f"[yellow]skipped: {o.skipped}[/yellow]")
        else:
            table.add_row(o.name, "-", "", "", "", "", f"[red]error: {o.error}[/red]")
    console.print(table)


def _harness() -> ModuleType:
    """The checkout's ``bench._harness`` (exit 2 when there is none, or it does not load)."""
    d = bench_dir()
    if d is None:
        typer.echo(
            "error: no bench/ directory next to the axid package: `axid bench` runs from a "
            "source checkout (an installed wheel does not ship the benchmarks)",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    try:
        return _load_harness(d)
    except ImportError as e:
        typer.echo(f"error: cannot load the benchmarks from {d}: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _progress(name: str, outcome: Any) -> None:
    if outcome is None:
        typer.echo(f"running {name} ...", err=True)
    elif outcome.skipped is not None:
        typer.echo(f"skipped {name}: {outcome.skipped}", err=True)
    elif outcome.error is not None:
        typer.echo(f"FAILED {name}: {outcome.error}", err=True)


def _write_json(json_file: Path, doc: Any) -> None:
    """The report, written whole or not at all (exit 2 when it cannot be)."""
    try:
        tmp = json_file.with_name(f".{json_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(json_file)
    except OSError as e:
        typer.echo(f"error: cannot write {json_file}: {e.strerror or e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Smaller sizes and fewer repeats (< 60 s in all).")
    ] = False,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the results as JSON to FILE.", metavar="FILE"),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option("--only", help="Comma-separated benchmark names, e.g. token.mint,log.append."),
    ] = None,
    iterations: Annotated[
        int | None,
        typer.Option(
            "--iterations",
            min=1,
            envvar="AXID_BENCH_ITERATIONS",
            help="Operations per measurement, overriding every default (smoke tests).",
        ),
    ] = None,
    log_size: Annotated[
        int | None,
        typer.Option(
            "--log-size",
            min=1,
            help="Entries in the log log.verify and log.proof build "
            "(default 1,000,000; with --quick 100,000).",
        ),
    ] = None,
) -> None:
    """Measure the README's performance figures, each beside a baseline from the same run."""
    h = _harness()
    h.discover()
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    try:
        selected = h.plan(names)
    except h.UnknownBench as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    machine = h.machine_info()
    ctx = h.Context(quick=quick, iterations=iterations, log_size=log_size)
    outcomes = h.run(selected, ctx, progress=_progress)
    _print_report(machine, outcomes, quick)
    if json_file is not None:
        _write_json(json_file, h.report(machine, outcomes))
    if any(o.error is not None for o in outcomes):
        raise typer.Exit(EXIT_FAILED)
