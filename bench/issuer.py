"""Issuer benchmark ``issuer.mint_http``, and the loopback HTTP machinery it shares
with :mod:`bench.verifier`.

- ``issuer.mint_http``: tokens/s of ``POST /v1/tokens`` against a real issuer
  (:func:`axid.issuer.app.create_app`: registry, keyring, SQLite store and the
  issuer's own decision log, all in a temporary directory) served by uvicorn
  over mTLS. Every answer is a 201 whose mint was bound in the store and
  committed to the issuer's decision log before it was sent. Baseline: a bare
  FastAPI ``POST /v1/tokens`` that reads the JSON body and answers a small
  JSON, served the same way.

How an HTTP figure is taken (the same for a figure and its baseline, so the
ratio compares the servers alone):

* each server runs in its own process (``python -c ... serve_child``), so
  client and server do not share a GIL: uvicorn with the ``httptools`` parser,
  uvloop, :func:`mtls.uvicorn.uvicorn_config` (the TLS extension protocol
  class, client certificate required), one worker, no access log;
* the benchmark process is the client: N keep-alive mTLS connections
  (:func:`mtls.tlsconfig.client_context` with an agent SVID), each an
  :class:`asyncio.Protocol` writing one pre-built HTTP/1.1 request, reading
  the answer (``Content-Length`` framed), checking its status and writing the
  next one at once: one request in flight per connection, no pipelining.
  Handshakes and a warm-up round are not timed;
* measurement rounds of the figure and of its baseline alternate, the best
  round of each counts (as :func:`bench._harness.compare_rates`);
* loopback only; the servers are killed when the benchmark ends, also on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import sqlite3
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from bench._harness import BenchError, Context, Result, register
from bench._http import AnswerProtocol, child_env, first_line, stderr_tail, stop_child

HOST: Final = "127.0.0.1"
ISS: Final = "https://issuer.bench.axid.test"
AUDIENCE: Final = "payments"
MINT_CLIENTS: Final = 16
SERVER_START_TIMEOUT: Final = 60.0
_KEEP_ALIVE: Final = 120  # s: an idle pool waits while the other pool's round runs
_CHILD: Final = "import sys\nfrom bench.issuer import serve_child\nserve_child(sys.argv[1:])\n"
_MAX_ANSWER: Final = 1 << 20

T = TypeVar("T")


# --------------------------------------------------------------------------- dev PKI


@dataclass(frozen=True)
class BenchPki:
    """The dev PKI of the run (``axid certs init`` layout), shared by the HTTP benches."""

    directory: Path
    trust_domain: str

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{'axid' if name == 'issuer' else _KIND[name]}/{name}"


_KIND: Final = {"payments": "svc", "planner": "agent", "worker": "agent"}


def bench_pki(ctx: Context) -> BenchPki:
    """The run's dev PKI (created once, in the run's temporary directory)."""
    pki = ctx.shared.get("http.pki")
    if pki is None:
        from mtls.devpki import init_dev_pki

        dev = init_dev_pki(ctx.tempdir("pki-"), "example.org")
        pki = BenchPki(dev.directory, dev.trust_domain.name)
        for name in ("issuer", "payments", "planner"):  # the layout this module assumes
            if str(dev.spiffe_id(name)) != pki.spiffe_id(name):
                raise BenchError(f"unexpected dev PKI SPIFFE ID for {name}: {dev.spiffe_id(name)}")
        ctx.shared["http.pki"] = pki
    return pki


def client_ssl(pki: BenchPki, *, client: str, server: str) -> Any:
    """An mTLS client context presenting ``client``'s SVID, expecting ``server``."""
    from mtls.sources import FileSource
    from mtls.spiffeid import SpiffeId
    from mtls.tlsconfig import client_context

    source = FileSource(pki.cert(client), pki.key(client), pki.bundle)
    return client_context(source, server_id=SpiffeId.parse(pki.spiffe_id(server)))


# --------------------------------------------------------------------------- servers


def serve_child(argv: Sequence[str]) -> None:
    """Entry point of a server process: ``argv[0]`` is the JSON spec ``{"factory":
    "bench.MODULE:FUNCTION", "args": {...}}``; the factory returns ``(asgi_app,
    x509_source)``. Prints ``PORT <n>`` once serving; exits on SIGTERM/SIGINT or
    when stdin closes (the benchmark process went away)."""
    import threading

    import uvicorn

    from mtls.uvicorn import uvicorn_config

    spec = json.loads(argv[0])
    module, _, name = str(spec["factory"]).partition(":")
    if not module.startswith("bench.") or not name.isidentifier():
        raise SystemExit(f"refusing factory {spec['factory']!r}")
    app, source = getattr(importlib.import_module(module), name)(spec["args"])
    config = uvicorn_config(
        app,
        host=HOST,
        port=0,
        source=source,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=_KEEP_ALIVE,
    )
    server = uvicorn.Server(config)

    def watch_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"PORT {port}", flush=True)
        await task

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(main())
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class ServerProcess:
    """One server subprocess (see :func:`serve_child`); :meth:`stop` always kills it."""

    def __init__(self, label: str, factory: str, args: dict[str, Any], workdir: Path) -> None:
        self.label = label
        self.port: int | None = None
        self._stderr_path = workdir / f"{label}.stderr"
        env = child_env()
        spec = json.dumps({"factory": factory, "args": args})
        with self._stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, spec],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
                env=env,
            )

    def wait_port(self, deadline: float) -> int:
        """The port, once the server printed it (BenchError on exit or timeout)."""
        line = first_line(self._proc, deadline, f"{self.label} server", self._stderr_path)
        if not line.startswith("PORT ") or not line[5:].isdigit():
            tail = stderr_tail(self._stderr_path)
            raise BenchError(f"{self.label} server said {line[:80]!r}{tail}")
        self.port = int(line[5:])
        return self.port

    def stop(self) -> None:
        """Graceful stop (stdin closed, SIGTERM), then a kill if it lingers."""
        stop_child(self._proc)


@contextlib.contextmanager
def serving(workdir: Path, *specs: tuple[str, str, dict[str, Any]]) -> Iterator[list[int]]:
    """Start servers ``(label, factory, args)`` side by side; yield their ports; stop
    every one of them on the way out, whatever happened."""
    procs: list[ServerProcess] = []
    try:
        for label, factory, args in specs:
            procs.append(ServerProcess(label, factory, args, workdir))
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        yield [p.wait_port(deadline) for p in procs]
    finally:
        for p in procs:
            p.stop()


# --------------------------------------------------------------------------- the client


class _Conn(AnswerProtocol):
    """One keep-alive connection sending the same request again and again."""

    def __init__(self, pool: LoadPool, request: bytes) -> None:
        super().__init__(pool.label, _MAX_ANSWER)
        self.pool = pool
        self.request = request
        self.left = 0
        self.count = 0  # good answers in the current round
        self.last_body = b""
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(BenchError(f"{self.pool.label}: the server closed a connection"))

    def start(self, done: asyncio.Future[None], left: int) -> None:
        assert self.transport is not None
        self.done, self.left, self.count = done, left, 0
        if self.lost:  # closed while idle between rounds
            self._fail(BenchError(f"{self.pool.label}: the server closed a connection"))
            return
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        answer = self._answer(data)
        if answer is None:
            return
        status, body, extra = answer
        if extra:
            self._fail(BenchError(f"{self.pool.label}: more bytes than one answer"))
            return
        if status != self.pool.expect:
            self._fail(
                BenchError(
                    f"{self.pool.label}: HTTP {status.decode('ascii', 'replace')} "
                    f"{body[:300].decode('utf-8', 'replace')}"
                )
            )
            return
        self.count += 1
        self.pool.answered += 1
        self.last_body = body
        self.left -= 1
        assert self.done is not None and self.transport is not None
        if self.left > 0 and self.pool.loop.time() < self.pool.deadline:
            self.transport.write(self.request)
        elif not self.done.done():
            self.done.set_result(None)


class LoadPool:
    """N keep-alive mTLS connections to one server, each with its own request."""

    def __init__(self, label: str, expect: int, loop: asyncio.AbstractEventLoop) -> None:
        self.label = label
        self.expect = str(expect).encode("ascii")
        self.loop = loop
        self.deadline = math.inf
        self.answered = 0  # good answers over the pool's life (warm-up included)
        self.conns: list[_Conn] = []

    @classmethod
    async def open(
        cls, label: str, port: int, ssl_ctx: Any, requests: Sequence[bytes], *, expect: int
    ) -> LoadPool:
        loop = asyncio.get_running_loop()
        pool = cls(label, expect, loop)

        async def connect(request: bytes) -> _Conn:
            _, conn = await loop.create_connection(
                lambda: _Conn(pool, request), HOST, port, ssl=ssl_ctx, ssl_handshake_timeout=30
            )
            return conn

        try:
            for i in range(0, len(requests), 8):  # a few handshakes at a time
                pool.conns += await asyncio.gather(*map(connect, requests[i : i + 8]))
        except BaseException:
            pool.close()
            raise
        return pool

    async def round(self, *, seconds: float | None = None, per_conn: int | None = None) -> float:
        """Answers/s over one round: until ``seconds`` passed or ``per_conn`` answers
        each; the clock runs from the first request to the last answer."""
        if seconds is None and per_conn is None:
            raise ValueError("a round needs seconds or per_conn")
        self.deadline = self.loop.time() + seconds if seconds is not None else math.inf
        left = per_conn if per_conn is not None else 1 << 62
        futures = [self.loop.create_future() for _ in self.conns]
        t0 = time.perf_counter()
        for conn, fut in zip(self.conns, futures, strict=True):
            conn.start(fut, left)
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=(seconds or 0) + 120)
        except TimeoutError:
            raise BenchError(f"{self.label}: the server stopped answering") from None
        elapsed = time.perf_counter() - t0
        count = sum(c.count for c in self.conns)
        if count <= 0 or elapsed <= 0:
            raise BenchError(f"{self.label}: no answers")
        return count / elapsed

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.done = None  # closing is not a failure
                conn.transport.close()


@dataclass(frozen=True)
class Plan:
    """Round sizes of an HTTP comparison."""

    warmup_seconds: float | None
    seconds: float | None
    per_conn: int | None
    rounds: int


def http_plan(ctx: Context, clients: int) -> Plan:
    """Timed rounds normally; ``--iterations N``: one round of about N requests."""
    if ctx.iterations is not None:
        return Plan(None, None, max(1, -(-ctx.iterations // clients)), 1)
    if ctx.quick:
        return Plan(0.3, 1.0, None, 2)
    return Plan(1.0, 3.0, None, ctx.repeats(full=3))


async def compare_pools(value: LoadPool, base: LoadPool, plan: Plan) -> tuple[float, float]:
    """Best answers/s of each pool, their rounds alternating after a warm-up each."""
    for pool in (value, base):
        await pool.round(seconds=plan.warmup_seconds, per_conn=1 if plan.per_conn else None)
    best_value = best_base = 0.0
    size = {"seconds": plan.seconds, "per_conn": plan.per_conn}
    for _ in range(plan.rounds):
        best_value = max(best_value, await value.round(**size))
        best_base = max(best_base, await base.round(**size))
    return best_value, best_base


async def fetch(label: str, port: int, ssl_ctx: Any, request: bytes, *, expect: int) -> bytes:
    """One request on a fresh connection; the answer's body."""
    pool = await LoadPool.open(label, port, ssl_ctx, [request], expect=expect)
    try:
        await pool.round(per_conn=1)
        return pool.conns[0].last_body
    finally:
        pool.close()


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run the client on uvloop when installed (the cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def http_request(
    method: str, path: str, port: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """A pre-built HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def log_entries(db_file: Path, log: str) -> int:
    """Entries of decision log ``log`` in a SQLite file (read after its server stopped)."""
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT COUNT(*) FROM axid_audit_entry WHERE log = ?", (log,)).fetchone()
    finally:
        conn.close()
    return int(row[0])


# --------------------------------------------------------------------------- apps


def bare_fastapi() -> Any:
    """The bare routes, without any AXID part: ``POST /v1/tokens`` (reads the JSON
    body, answers 201 with a small JSON) and ``GET /payments/{pid}``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v1/tokens")
    async def tokens(request: Request) -> JSONResponse:
        doc = await request.json()
        return JSONResponse({"ok": True, "run": doc.get("run")}, status_code=201)

    @app.get("/payments/{pid}")
    async def payment(pid: str) -> dict[str, Any]:
        return {"pid": pid, "amount": 12500, "currency": "EUR"}

    return app


def bare_app(args: dict[str, Any]) -> tuple[Any, Any]:
    """Server factory: the bare routes with the SVID ``args["cert"]``/``["key"]``."""
    from mtls.sources import FileSource

    return bare_fastapi(), FileSource(args["cert"], args["key"], args["bundle"])


def issuer_app(args: dict[str, Any]) -> tuple[Any, Any]:
    """Server factory: the real issuer app from an :class:`IssuerConfig` (it opens
    and closes its components itself)."""
    from axid.issuer.app import create_app
    from axid.issuer.config import IssuerConfig

    config = IssuerConfig(
        registrations=Path(args["registrations"]),
        issuer=ISS,
        host=HOST,
        port=0,
        http="httptools",
        cert=Path(args["cert"]),
        key=Path(args["key"]),
        bundle=Path(args["bundle"]),
        keys_dir=Path(args["keys_dir"]),
        database_url=args["database_url"],
        log_key=Path(args["log_key"]),
    )
    app = create_app(config)
    return app, app.state.components.source


def _svid_args(pki: BenchPki, name: str) -> dict[str, Any]:
    return {"cert": str(pki.cert(name)), "key": str(pki.key(name)), "bundle": str(pki.bundle)}


# --------------------------------------------------------------------------- issuer.mint_http


def _registrations(pki: BenchPki) -> str:
    return json.dumps(  # JSON is YAML
        {
            "registrations": [
                {
                    "spiffe_id": pki.spiffe_id("planner"),
                    "tenant": "acme",
                    "agents": ["planner"],
                    "audiences": [AUDIENCE],
                    "scope": "payments:read payments:refund",
                }
            ]
        }
    )


def _mint_request(port: int, client: int) -> bytes:
    body = json.dumps(
        {
            "agent": "planner",
            "run": f"bench-run-{client:02d}",  # one run per client: a run mints many tokens
            "audience": AUDIENCE,
            "scope": "payments:read",
        },
        separators=(",", ":"),
    ).encode()
    return http_request(
        "POST", "/v1/tokens", port, [("Content-Type", "application/json")], body=body
    )


async def _mint_pool(label: str, port: int, ssl_ctx: Any) -> LoadPool:
    """``MINT_CLIENTS`` connections to ``port``, each minting for its own run."""
    requests = [_mint_request(port, i) for i in range(MINT_CLIENTS)]
    return await LoadPool.open(label, port, ssl_ctx, requests, expect=201)


def _check_minted(body: bytes, jwks: bytes, pki: BenchPki) -> None:
    """A benchmark answer must hold a token that verifies against the issuer's JWKS."""
    from axid import tokens
    from axid.keys import KeySet

    try:
        token = json.loads(body)["token"]
        claims = tokens.verify(token, KeySet.from_jwks(jwks), issuer=ISS, audience=AUDIENCE)
    except (ValueError, KeyError, TypeError, tokens.TokenError) as exc:
        raise BenchError(f"issuer.mint_http: a minted token did not verify ({exc})") from None
    if claims.sub != pki.spiffe_id("planner"):
        raise BenchError("issuer.mint_http: the token's sub is not the client's SPIFFE ID")


@register("issuer.mint_http")
def issuer_mint_http(ctx: Context) -> Result:
    """``POST /v1/tokens`` answered 201 per second, 16 keep-alive mTLS clients.

    Measured: the issuer app (``axid.issuer.app.create_app``) under uvicorn
    (httptools, uvloop) in its own process, state and its decision log in one
    SQLite file (WAL, ``synchronous=FULL``) in a temporary directory. Each
    request: peer SVID check (cached per chain), body validation, registration
    match, revocation lookup, run binding (a SQLite write), Ed25519 signing, the
    decision-log append (group commit, waited for), the JSON answer. 16 clients
    in the benchmark process, each with its own run id, one request in flight
    each. Baseline: :func:`bare_fastapi`'s ``POST /v1/tokens`` (same request
    bytes, same server set-up). Self-checks: a minted token verifies against the
    issuer's JWKS, and the decision log holds exactly one entry per 201.
    """
    pki = bench_pki(ctx)
    d = ctx.tempdir("issuer-")
    (d / "registrations.yaml").write_text(_registrations(pki))
    issuer_args = {
        **_svid_args(pki, "issuer"),
        "registrations": str(d / "registrations.yaml"),
        "keys_dir": str(d / "keys"),
        "database_url": f"sqlite:///{d}/issuer.db",
        "log_key": str(d / "keys" / "log.pem"),
    }
    plan = http_plan(ctx, MINT_CLIENTS)
    ssl_ctx = client_ssl(pki, client="planner", server="issuer")
    answered = 0

    with serving(
        d,
        ("issuer", "bench.issuer:issuer_app", issuer_args),
        ("bare", "bench.issuer:bare_app", _svid_args(pki, "issuer")),
    ) as (issuer_port, bare_port):

        async def main() -> tuple[float, float]:
            nonlocal answered
            value = await _mint_pool("issuer", issuer_port, ssl_ctx)
            try:
                base = await _mint_pool("bare", bare_port, ssl_ctx)
                try:
                    rates = await compare_pools(value, base, plan)
                finally:
                    base.close()
                jwks = await fetch(
                    "issuer",
                    issuer_port,
                    ssl_ctx,
                    http_request("GET", "/.well-known/jwks.json", issuer_port),
                    expect=200,
                )
                _check_minted(value.conns[0].last_body, jwks, pki)
                answered = value.answered
                return rates
            finally:
                value.close()

        rate, base_rate = run_client(main())
    # The server stopped (its log closed): every 201 must be a committed entry.
    entries = log_entries(d / "issuer.db", "issuer")
    if entries != answered:
        raise BenchError(f"issuer.mint_http: {answered} tokens minted, {entries} log entries")
    ctx.detail("issuer.mint_http", f"{MINT_CLIENTS} keep-alive mTLS clients, {entries:,} mints")
    return Result.of(
        "issuer.mint_http",
        rate,
        "ops/s",
        "bare FastAPI POST route, same uvicorn + mTLS",
        base_rate,
    )
