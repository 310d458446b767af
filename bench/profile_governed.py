"""Where the time of one governed request goes (sequential client, microseconds at p50).

Run from a source checkout::

    python -m bench.profile_governed [--requests N] [--json FILE]

It serves the ``verifier.latency_p50`` set-up (the governed FastAPI route behind
:class:`~verifier.middleware.AxidVerifier`, decision log in SQLite with WAL and
``synchronous=FULL``, uvicorn with httptools and uvloop in its own process,
TCP_NODELAY) and the bare route, and sends ``N`` requests to each from one
keep-alive mTLS client, one at a time (:class:`bench.verifier.SeqClient`).

The server process installs timing wrappers before it builds the app; nothing of
``axid.audit`` or ``verifier`` is edited, only wrapped by name from outside (a
name that moved makes this script fail, not lie):

* ``app``: the whole ASGI call of the middleware (outermost wrapper);
* ``checks``: :meth:`verifier.pipeline.Pipeline.decide_with_undo` (steps 1-7,
  what the middleware calls);
* ``append``: :meth:`axid.audit.log.DecisionLog.append`, from the call to the
  receipt; of it ``batch`` is :meth:`axid.audit.store.LogStore.append_batch`
  on the log's worker thread (the whole transaction), of which ``sign`` is
  ``sign_checkpoint`` (one Ed25519 signature over the new checkpoint) and
  ``commit`` runs from SQLAlchemy's ``commit`` event to the end of the batch
  (SQLite's WAL write and fsync);
* ``route``: the FastAPI app behind the middleware;
* the head file writes (``write_head_file``, with its fsync), which run on
  their own thread after each commit: off the request's path, but on a
  sequential client each overlaps the next request's commit.

Derived per request, then the median of each: ``middleware = app - checks -
append - route`` (request parsing, rule match, the decision's fields, the
headers, the event-loop turns), ``log queue and thread hop = append - batch``,
``transaction rest = batch - sign - commit`` (lock, head reads, encoding,
inserts), ``server/TLS = client round trip - app`` (TLS records, uvicorn's
HTTP parsing and ASGI plumbing, the loopback). Medians do not add up exactly.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._harness import BenchError, Context
from bench.issuer import bench_pki, client_ssl, http_request, serving
from bench.verifier import (
    HEADER,
    PATH,
    SeqClient,
    _material,
    _token,
    governed_servers,
    percentile,
)

_RECORDS: list[dict[str, float]] = []
_HEAD_WRITES: list[float] = []  # seconds per head file write (its own thread, off the path)
_CURRENT: dict[str, float] | None = None  # the request being served (one at a time)
_TLS = threading.local()  # the audit thread's commit start


def _add(key: str, seconds: float) -> None:
    if _CURRENT is not None:
        _CURRENT[key] = _CURRENT.get(key, 0.0) + seconds


def _time_async(owner: type, name: str, key: str) -> None:
    orig = getattr(owner, name)  # AttributeError: the name moved, the profile would lie

    @functools.wraps(orig)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await orig(*args, **kwargs)
        finally:
            _add(key, time.perf_counter() - t0)

    setattr(owner, name, timed)


def _install(*, head_file: bool = True) -> None:
    """The timing wrappers (server process only, before the app is built); without
    ``head_file`` the head file is not written (a diagnostic, never a deployment)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    import axid.audit._store_append as store_append  # the append path signs there
    import axid.audit.store as store
    from axid.audit.log import DecisionLog
    from verifier.pipeline import Pipeline

    _time_async(Pipeline, "decide_with_undo", "checks")  # what the middleware calls
    _time_async(DecisionLog, "append", "append")

    batch = store.LogStore.append_batch

    @functools.wraps(batch)
    def append_batch(*args: Any, **kwargs: Any) -> Any:
        _TLS.commit_at = None
        t0 = time.perf_counter()
        try:
            return batch(*args, **kwargs)
        finally:
            end = time.perf_counter()
            _add("batch", end - t0)
            if _TLS.commit_at is not None:
                _add("commit", end - _TLS.commit_at)

    store.LogStore.append_batch = append_batch  # type: ignore[method-assign]

    sign = store_append.sign_checkpoint

    @functools.wraps(sign)
    def sign_checkpoint(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return sign(*args, **kwargs)
        finally:
            _add("sign", time.perf_counter() - t0)

    store_append.sign_checkpoint = sign_checkpoint

    import axid.audit.log as log_module

    write_head = log_module.write_head_file

    @functools.wraps(write_head)
    def write_head_file(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return write_head(*args, **kwargs) if head_file else None
        finally:
            _HEAD_WRITES.append(time.perf_counter() - t0)

    log_module.write_head_file = write_head_file

    @event.listens_for(Engine, "commit")
    def on_commit(conn: Any) -> None:
        if hasattr(_TLS, "commit_at"):  # the audit thread, inside append_batch
            _TLS.commit_at = time.perf_counter()


_Asgi = Callable[[Any, Any, Any], Awaitable[None]]


def _outer(app: _Asgi, stats: Path) -> _Asgi:
    async def call(scope: Any, receive: Any, send: Any) -> None:
        global _CURRENT
        if scope["type"] == "lifespan":
            # Written at shutdown: uvicorn re-raises SIGTERM afterwards (no atexit).
            async def send_dumping(message: Any) -> None:
                if message["type"] == "lifespan.shutdown.complete":
                    stats.write_text(json.dumps({"requests": _RECORDS, "head": _HEAD_WRITES}))
                await send(message)

            return await app(scope, receive, send_dumping)
        if scope["type"] != "http" or scope["path"] != PATH:
            return await app(scope, receive, send)
        _CURRENT = rec = {}
        t0 = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            rec["app"] = time.perf_counter() - t0
            _CURRENT = None
            _RECORDS.append(rec)

    return call


def _inner(app: _Asgi) -> _Asgi:
    async def call(scope: Any, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                _add("route", time.perf_counter() - t0)

    return call


def profiled_app(args: dict[str, Any]) -> tuple[Any, Any]:
    """Server factory: :func:`bench.verifier.governed_app` with the timing wrappers;
    the records go to ``args["stats"]`` (JSON) when the app shuts down."""
    from bench.issuer import bare_fastapi
    from mtls.sources import FileSource
    from verifier.config import VerifierConfig
    from verifier.middleware import AxidVerifier

    _install(head_file=not args.get("without_head_file"))
    app = AxidVerifier(_inner(bare_fastapi()), VerifierConfig.from_file(args["config"]))
    return _outer(app, Path(args["stats"])), FileSource(args["cert"], args["key"], args["bundle"])


# --------------------------------------------------------------------------- the client


def _split(records: list[dict[str, float]], rtt: list[float]) -> dict[str, float]:
    """Median microseconds of each part (see the module docstring)."""
    parts: dict[str, list[float]] = {}
    for rec, total in zip(records, rtt, strict=True):
        missing = {"app", "checks", "append", "batch", "commit", "sign", "route"} - set(rec)
        if missing:  # a wrapped name is no longer on the request's path
            raise BenchError(f"a request without the parts {sorted(missing)}: {rec}")
        got = {
            "client round trip": total,
            "server/TLS (round trip - app)": total - rec["app"],
            "middleware (app - checks - append - route)": rec["app"]
            - rec["checks"]
            - rec["append"]
            - rec["route"],
            "checks (Pipeline.decide_with_undo, steps 1-7)": rec["checks"],
            "log append (DecisionLog.append, to the receipt)": rec["append"],
            "  queue and thread hop (append - batch)": rec["append"] - rec["batch"],
            "  transaction (LogStore.append_batch)": rec["batch"],
            "    commit: WAL write + fsync": rec["commit"],
            "    checkpoint signature (Ed25519)": rec["sign"],
            "    rest: lock, head reads, encode, inserts": rec["batch"]
            - rec["sign"]
            - rec["commit"],
            "route (FastAPI app)": rec["route"],
        }
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    return {k: statistics.median(v) * 1e6 for k, v in parts.items()}


def profile(requests: int, warmup: int = 200, *, head_file: bool = True) -> dict[str, Any]:
    """Serve, measure, stop; the medians (µs) of the governed request's parts."""
    ctx = Context()
    try:
        pki = bench_pki(ctx)
        m = _material(ctx, pki)
        d, (label, _, args), bare = governed_servers(ctx, "profile")
        stats = d / "stats.json"
        args = {**args, "stats": str(stats), "without_head_file": not head_file}
        governed = (label, "bench.profile_governed:profiled_app", args)
        token = _token(m, "bench-profile")
        ssl_ctx = client_ssl(pki, client="planner", server="payments")
        rtt: dict[str, list[float]] = {"governed": [], "bare": []}
        with serving(d, governed, bare) as ports:
            clients = [
                SeqClient(name, port, ssl_ctx, http_request("GET", PATH, port, [(HEADER, token)]))
                for name, port in zip(rtt, ports, strict=True)
            ]
            try:
                for c in clients:
                    for _ in range(warmup):
                        c.once()
                done = 0
                while done < requests:
                    k = min(100, requests - done)
                    for c in clients:
                        c.timed(k, rtt[c.label])
                    done += k
            finally:
                for c in clients:
                    c.close()
        got = json.loads(stats.read_text())
        records = got["requests"]
        if len(records) != warmup + requests:
            raise BenchError(f"{len(records)} server records for {warmup + requests} requests")
        split = _split(records[warmup:], rtt["governed"])
        split["head file write (own thread, off the path)"] = percentile(got["head"], 50)
        split["bare route: client round trip"] = percentile(rtt["bare"], 50)
        return split
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_governed")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests (each route)")
    parser.add_argument("--json", type=Path, help="also write the medians as JSON")
    parser.add_argument(
        "--without-head-file",
        action="store_true",
        help="diagnostic only: skip the head file writes, to see what they cost "
        "(an unsupported configuration: it drops the rollback check)",
    )
    ns = parser.parse_args(argv)
    split = profile(ns.requests, head_file=not ns.without_head_file)
    width = max(map(len, split))
    print(f"one governed GET {PATH}, 1 sequential keep-alive mTLS client, p50 in µs")
    for k, v in split.items():
        print(f"{k:<{width}}  {v:>9,.0f}")
    if ns.json is not None:
        ns.json.write_text(json.dumps(split, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
