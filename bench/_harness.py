"""The benchmark harness: registry, run context, timing helpers, machine info, JSON.

A benchmark is a function ``(ctx: Context) -> Result`` registered under its
public name (DESIGN.md, "Commands and set-up")::

    from bench._harness import Context, Result, register

    @register("token.mint")
    def token_mint(ctx: Context) -> Result:
        ...
        return Result.of("token.mint", value, "ops/s", "Ed25519 sign", baseline_value)

Every figure is reported beside a baseline measured in the same run, and
``ratio = value / baseline_value``. Throughputs are in ops/s (or entries/s);
latencies say their unit (``µs/op``).

Modules are discovered by name (:data:`MODULES`); a known benchmark whose
module is absent, or failed to import, is reported as skipped with the reason.
More benchmarks can be added by registering new names from any module in
:data:`MODULES`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "KNOWN_BENCHES",
    "MODULES",
    "Bench",
    "BenchError",
    "BenchSkipped",
    "Context",
    "Outcome",
    "Result",
    "UnknownBench",
    "best_of",
    "compare_rates",
    "discover",
    "machine_info",
    "ops_per_s",
    "plan",
    "rate",
    "register",
    "registry",
    "report",
    "run",
    "time_calls",
    "timed",
]

# The public benchmark names, in report order, with the module expected to
# provide each (only used to explain a skip: any module may register any name).
KNOWN_BENCHES: tuple[tuple[str, str], ...] = (
    ("token.mint", "tokens"),
    ("token.verify", "tokens"),
    ("token.verify_cached", "verifier"),
    ("issuer.mint_http", "issuer"),
    ("log.append", "log"),
    ("log.append_pg", "log"),
    ("log.append_witnessed_async_p50", "witness"),
    ("log.append_witnessed_sync_p50", "witness"),
    ("log.verify", "log"),
    ("log.proof", "log"),
    ("verifier.governed_rps", "verifier"),
    ("verifier.latency_p50", "verifier"),
    ("verifier.latency_p99", "verifier"),
    ("verifier.check_cached", "verifier"),
    ("witness.add_checkpoint", "witness"),
)
MODULES: tuple[str, ...] = ("tokens", "log", "issuer", "verifier", "witness")
_PACKAGE = __name__.rpartition(".")[0] or "bench"


class BenchError(Exception):
    """A benchmark could not produce a trustworthy figure (e.g. its self-check failed)."""


class BenchSkipped(Exception):
    """A benchmark cannot run here (e.g. no database configured): reported as skipped
    with this message as its reason, not as a failure."""


class UnknownBench(ValueError):
    """``--only`` named a benchmark that is neither known nor registered."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One figure beside its baseline: exactly the fields of a JSON result."""

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float

    @classmethod
    def of(cls, name: str, value: float, unit: str, baseline: str, baseline_value: float) -> Result:
        """Build a result; ``ratio`` is ``value / baseline_value``."""
        if not (value > 0 and baseline_value > 0):
            raise BenchError(f"{name}: non-positive measurement ({value}, {baseline_value})")
        return cls(
            name, float(value), unit, baseline, float(baseline_value), value / baseline_value
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """What running one benchmark gave: a result, or why there is none."""

    name: str
    result: Result | None = None
    skipped: str | None = None
    error: str | None = None
    detail: str | None = None  # human table only (e.g. the log size used)
    seconds: float = 0.0


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Run-wide settings and shared state handed to every benchmark.

    ``iterations`` (``--iterations``) overrides the operation counts of every
    benchmark, for smoke tests; ``log_size`` overrides the size of the log
    that ``log.verify``/``log.proof`` build.
    """

    quick: bool = False
    iterations: int | None = None
    log_size: int | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    _details: dict[str, str] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _tmp: Path | None = None

    def n(self, *, full: int, quick: int) -> int:
        """The operation count to use: ``--iterations``, else the quick or full default."""
        if self.iterations is not None:
            return self.iterations
        return quick if self.quick else full

    def repeats(self, *, full: int = 5, quick: int = 3) -> int:
        """How many times to repeat a measurement (the best one counts)."""
        if self.iterations is not None:
            return 1
        return quick if self.quick else full

    def detail(self, name: str, text: str) -> None:
        """A human-only remark for the table (never in the JSON)."""
        self._details[name] = text

    def tempdir(self, prefix: str) -> Path:
        """A fresh directory under the run's temporary directory (removed at the end)."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="axid-bench-"))
            self._stack.callback(shutil.rmtree, self._tmp, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self._tmp))

    def on_close(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the run ends (before the temporary directory goes)."""
        self._stack.callback(fn)

    def close(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- registry


BenchFunc = Callable[[Context], Result]
F = TypeVar("F", bound=BenchFunc)


@dataclass(frozen=True)
class Bench:
    name: str
    func: BenchFunc
    module: str


_REGISTRY: dict[str, Bench] = {}
_IMPORT_PROBLEMS: dict[str, str] = {}


def register(name: str) -> Callable[[F], F]:
    """Register a benchmark function under its public name."""

    def deco(func: F) -> F:
        if name in _REGISTRY and _REGISTRY[name].func is not func:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = Bench(name, func, func.__module__)
        return func

    return deco


def registry() -> dict[str, Bench]:
    return dict(_REGISTRY)


def discover(modules: Sequence[str] = MODULES) -> dict[str, str]:
    """Import the benchmark modules; return ``{module: why it is unavailable}``."""
    for mod in modules:
        qual = f"{_PACKAGE}.{mod}"
        if mod in _IMPORT_PROBLEMS or qual in sys.modules:
            continue
        try:
            importlib.import_module(qual)
        except ModuleNotFoundError as e:
            if e.name == qual:
                _IMPORT_PROBLEMS[mod] = f"bench/{mod}.py is not there"
            else:
                _IMPORT_PROBLEMS[mod] = f"bench/{mod}.py needs {e.name!r}, not installed"
        except Exception as e:  # a broken module must not hide the others' figures
            _IMPORT_PROBLEMS[mod] = f"bench/{mod}.py failed to import: {type(e).__name__}: {e}"
    return dict(_IMPORT_PROBLEMS)


def plan(only: Sequence[str] | None = None) -> list[str]:
    """The benchmark names to run, in report order (known names first)."""
    known = [n for n, _ in KNOWN_BENCHES]
    every = known + sorted(set(_REGISTRY) - set(known))
    if not only:
        return every
    unknown = [n for n in only if n not in every]
    if unknown:
        raise UnknownBench(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(every)}")
    wanted = set(only)
    return [n for n in every if n in wanted]


def _skip_reason(name: str) -> str:
    module = dict(KNOWN_BENCHES).get(name)
    if module is not None and module in _IMPORT_PROBLEMS:
        return _IMPORT_PROBLEMS[module]
    where = f" (expected in bench/{module}.py)" if module else ""
    return f"no benchmark registered under this name{where}"


def run(
    names: Sequence[str],
    ctx: Context,
    *,
    progress: Callable[[str, Outcome | None], None] | None = None,
) -> list[Outcome]:
    """Run the named benchmarks one after the other; never raises for one failing."""
    out: list[Outcome] = []
    try:
        for name in names:
            b = _REGISTRY.get(name)
            if b is None:
                o = Outcome(name, skipped=_skip_reason(name))
                out.append(o)
                if progress:
                    progress(name, o)
                continue
            if progress:
                progress(name, None)
            gc.collect()
            t0 = time.perf_counter()
            try:
                res = b.func(ctx)
                if not isinstance(res, Result) or res.name != name:
                    raise BenchError(f"{name}: the benchmark returned {res!r}")
                o = Outcome(name, result=res, detail=ctx._details.get(name))
            except BenchSkipped as e:
                o = Outcome(name, skipped=str(e))
            except Exception as e:
                o = Outcome(name, error=f"{type(e).__name__}: {e}")
            o = replace(o, seconds=time.perf_counter() - t0)
            out.append(o)
            if progress:
                progress(name, o)
    finally:
        ctx.close()
    return out


def report(machine: dict[str, Any], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The JSON document: ``{"machine", "results", "skipped"}``.

    ``results`` holds measured figures only (exactly the :class:`Result`
    fields); benchmarks that were skipped or failed are listed, with why, in
    ``skipped``.
    """
    return {
        "machine": machine,
        "results": [o.result.to_json() for o in outcomes if o.result is not None],
        "skipped": [
            {"name": o.name, "reason": o.skipped or f"error: {o.error}"}
            for o in outcomes
            if o.result is None
        ],
    }


# --------------------------------------------------------------------------- timing


def ops_per_s(count: int, seconds: float) -> float:
    if seconds <= 0:
        raise BenchError("a timed section took no measurable time")
    return count / seconds


def time_calls(fn: Callable[[], object], n: int) -> float:
    """Seconds taken by ``n`` calls of ``fn`` (garbage collection paused)."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()


def _calls_for(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds`` (calibrated, at least 1)."""
    n = 1
    while True:
        took = time_calls(fn, n)
        if took >= 0.02 or n >= 1 << 24:
            return max(1, int(n * seconds / max(took, 1e-9)))
        n *= 4


def rate(
    fn: Callable[[], object],
    *,
    n: int | None = None,
    seconds: float = 0.5,
    repeat: int = 3,
) -> float:
    """Best calls/s of ``fn`` over ``repeat`` timed runs of ``n`` calls (or about ``seconds``)."""
    count = n if n is not None else _calls_for(fn, seconds)
    return best_of(repeat, lambda: ops_per_s(count, time_calls(fn, count)))


def compare_rates(
    fn: Callable[[], object],
    base: Callable[[], object],
    *,
    n: int | None = None,
    seconds: float = 0.5,
    repeat: int = 3,
) -> tuple[float, float]:
    """Best calls/s of ``fn`` and of ``base``, their runs interleaved.

    Interleaving spreads the noise of a shared machine over both figures
    instead of over whichever ran during a busy moment.
    """
    n_fn = n if n is not None else _calls_for(fn, seconds)
    n_base = n if n is not None else _calls_for(base, seconds)
    best_fn = best_base = 0.0
    for _ in range(max(1, repeat)):
        best_fn = max(best_fn, ops_per_s(n_fn, time_calls(fn, n_fn)))
        best_base = max(best_base, ops_per_s(n_base, time_calls(base, n_base)))
    return best_fn, best_base


def best_of(k: int, measure: Callable[[], float], *, lower_is_better: bool = False) -> float:
    """The best of ``k`` measurements (highest rate, or lowest latency)."""
    values = [measure() for _ in range(max(1, k))]
    return min(values) if lower_is_better else max(values)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, Python, OS, crypto and SQLite versions, and the date."""
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": _usable_cpus(),
        "memory_bytes": _memory_bytes(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "sqlite": sqlite3.sqlite_version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)
