"""Reliability under failure (issue 6, item 3): real processes, sockets, files and servers.

Every test runs the real issuer (axid.issuer under uvicorn, mTLS) and a governed
"payments" service (AxidVerifier under uvicorn, mTLS) on 127.0.0.1; agents use
tokens minted by that issuer over mTLS. Each test is bounded in time (every wait
has a deadline) and in request count (every client has a request budget), and
its assertions are the fail-closed contract, never a timing threshold:

* SIGKILL: the service runs in a separate process (tests/_verifier_worker.py)
  with its decision log in a SQLite file; 32 concurrent clients load it, the
  process is killed with SIGKILL mid-load and restarted on the same file. Every
  2xx a client received has its committed allow entry, the log verifies, and
  the restarted service allows and records.
* PostgreSQL restarted mid-load (``pg_ctlcluster ... restart``): answers in the
  gap are 503 ``audit_unavailable`` (never a 2xx without its entry), and the
  same service process allows again by itself once the server is back.
* Disk full: the SQLite log lives on a size-limited tmpfs that is then filled;
  see :func:`test_disk_full_sqlite_log`.
* Issuer down: the verifier keeps verifying with its cached JWKS until
  ``jwks.max_stale``, then answers 503 ``jwks_unavailable``; the revocation
  poller likewise answers 503 ``revocation_unavailable`` after
  ``revocations.max_stale``; both recover when the issuer is back on its port.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from _pg import unavailable
from _tls_helpers import ServerThread
from _verifier_helpers import PG_URL, Pki, log_entries, make_pki, require_pg
from fastapi import FastAPI, Request

from axid.audit.note import NoteSigner
from axid.audit.store import load_log_key, origin_for
from axid.audit.verify import DatabaseSource, verify_log
from axid.issuer.app import create_app
from axid.issuer.client import IssuerClient
from axid.issuer.config import IssuerConfig
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeIdPattern
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import VerifierConfig
from verifier.middleware import AxidVerifier

pytestmark = pytest.mark.timeout(120)

ISS: Final = "https://issuer.axid.test"
HEADER: Final = "X-Waxell-AXID"
WORKER_SCRIPT: Final = str(Path(__file__).parent / "_verifier_worker.py")
CLIENTS: Final = 32  # concurrent clients of the load tests
REQUEST_TIMEOUT: Final = 10.0  # per HTTP request
START_TIMEOUT: Final = 30.0  # a worker process importing and binding, on a busy machine
WAIT: Final = 20.0  # upper bound of every other wait in this module


def uid() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- the world


@dataclass
class Stack:
    """Dev PKI, the issuer (restartable on its port) and minted tokens."""

    tmp: Path
    pki: Pki
    issuer: ServerThread | None = None
    issuer_port: int = 0
    _issuer_clients: dict[str, IssuerClient] = field(default_factory=dict)

    @property
    def issuer_url(self) -> str:
        return f"https://127.0.0.1:{self.issuer_port}"

    @property
    def issuer_db(self) -> str:
        return f"sqlite:///{self.tmp}/issuer.db"

    def source(self, name: str) -> FileSource:
        return FileSource(self.pki.cert(name), self.pki.key(name), self.pki.dev.bundle)

    def start_issuer(self) -> None:
        """Serve the issuer on ``issuer_port`` (0 the first time: any free port).

        Restarting reuses the keys directory and the database, so the keys (and
        the tokens they signed) and the revocations are the same as before.
        """
        td = self.pki.dev.trust_domain.name
        registrations = self.tmp / "registrations.yaml"
        if not registrations.exists():
            registrations.write_text(
                json.dumps(
                    {
                        "registrations": [
                            {
                                "spiffe_id": f"spiffe://{td}/agent/planner",
                                "tenant": "acme",
                                "agents": ["planner"],
                                "audiences": ["payments"],
                                "scope": "payments:read",
                            }
                        ]
                    }
                )
            )
        config = IssuerConfig(
            registrations=registrations,
            issuer=ISS,
            port=0,
            cert=self.pki.cert("issuer"),
            key=self.pki.key("issuer"),
            bundle=self.pki.dev.bundle,
            keys_dir=self.tmp / "issuer-keys",
            database_url=self.issuer_db,
            admins=(SpiffeIdPattern.parse(f"spiffe://{td}/admin/*"),),
            log_key=self.tmp / "issuer-log.pem",
        )
        app = create_app(config)
        uv = uvicorn_config(
            app,
            source=app.state.components.source,
            port=self.issuer_port,
            log_level="warning",
        )
        self.issuer = ServerThread(uv).start()
        self.issuer_port = self.issuer.port

    def stop_issuer(self) -> None:
        self.close_issuer_clients()
        if self.issuer is not None:
            issuer, self.issuer = self.issuer, None
            issuer.stop()

    def issuer_client(self, name: str) -> IssuerClient:
        c = self._issuer_clients.get(name)
        if c is None:
            c = IssuerClient(self.issuer_url, self.source(name))
            self._issuer_clients[name] = c
        return c

    def close_issuer_clients(self) -> None:
        for c in self._issuer_clients.values():
            c.close()
        self._issuer_clients.clear()

    def mint(self, run: str | None = None) -> str:
        """A planner token for ``GET /payments/*`` (not single use: reusable)."""
        return (
            self.issuer_client("planner")
            .mint(
                agent="planner",
                run=run or f"run-{uid()[:12]}",
                audience="payments",
                scope="payments:read",
            )
            .token
        )

    def agent_context(self) -> ssl.SSLContext:
        """The planner's mTLS client context, accepting only the payments SVID."""
        return client_context(self.source("planner"), server_id=self.pki.dev.spiffe_id("payments"))

    def verifier_doc(
        self,
        log_url: str,
        log_name: str,
        *,
        jwks: dict[str, Any] | None = None,
        revocations: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A verifier config: JWKS and revocations from the issuer over mTLS by default."""
        d = self.pki.dev.directory
        return {
            "service": "payments",
            "issuer": ISS,
            "tenants": ["acme"],
            "identity": {
                "bundle": str(self.pki.dev.bundle),
                "cert": str(d / "payments.pem"),
                "key": str(d / "payments.key"),
            },
            "jwks": jwks or {"url": f"{self.issuer_url}/.well-known/jwks.json"},
            "revocations": revocations
            or {"url": f"{self.issuer_url}/v1/revocations", "interval": 1, "max_stale": 60},
            "log": {
                "url": log_url,
                "name": log_name,
                "key": str(self.tmp / f"{log_name}.pem"),
                "lock_timeout": 2,
            },
            "rules": [{"methods": ["GET"], "path": "/payments/*", "scope": "payments:read"}],
        }

    def vkey(self, log_name: str) -> str:
        """The log's verifier key, from its key file (the auditor's trusted copy)."""
        key = load_log_key(self.tmp / f"{log_name}.pem")
        return NoteSigner(origin_for(log_name), key).vkey()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, make_pki(tmp_path))
    s.start_issuer()
    try:
        yield s
    finally:
        s.stop_issuer()


def assert_log_verifies(stack: Stack, url: str, log_name: str) -> int:
    """The whole log verifies against the log key; returns its size."""
    source = DatabaseSource(url, log_name)
    try:
        report = verify_log(source, vkey=stack.vkey(log_name))
    finally:
        source.close()
    assert report.ok, f"decision log does not verify: {report.first_bad}"
    return report.entries


def entries_by_path(url: str, log_name: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in log_entries(url, log_name):
        out.setdefault(e["path"], []).append(e)
    return out


def assert_every_2xx_recorded(oks: list[Outcome], entries: dict[str, list[dict[str, Any]]]) -> None:
    """Each 2xx path (unique per request) has exactly one entry, an allow ``ok``."""
    missing = [o.path for o in oks if o.path not in entries]
    assert not missing, f"{len(missing)} 2xx answers have no log entry, e.g. {missing[:3]}"
    for o in oks:
        found = entries[o.path]
        assert len(found) == 1, (o.path, found)
        assert found[0]["decision"] == "allow" and found[0]["reason"] == "ok", found[0]


# --------------------------------------------------------------------------- a service process


class Worker:
    """tests/_verifier_worker.py: the governed service in its own process."""

    def __init__(self, stack: Stack, config: Path, name: str) -> None:
        self.stderr_path = stack.tmp / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")  # a file: a full pipe would block the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                WORKER_SCRIPT,
                str(config),
                str(stack.pki.cert("payments")),
                str(stack.pki.key("payments")),
                str(stack.pki.dev.bundle),
                "0",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(stack.tmp),
        )
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)  # bounded: readline alone would block forever
        line = box[0].decode() if box else ""
        if not line.startswith("PORT "):
            raise AssertionError(f"worker did not start: {line!r}\n{self.stderr_tail()}")
        return int(line.split()[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed or closed."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                with suppress(OSError):
                    self.proc.stdin.close()  # the worker exits when stdin closes
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=WAIT)
                except subprocess.TimeoutExpired:  # pragma: no cover - a hung child
                    self.proc.kill()
                    self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()

    def stderr_tail(self) -> str:
        with suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-3000:]
        return ""


@contextmanager
def worker(stack: Stack, config: Path, name: str) -> Iterator[Worker]:
    w = Worker(stack, config, name)
    try:
        yield w
    finally:
        w.stop()


def write_config(stack: Stack, doc: dict[str, Any], name: str) -> Path:
    path = stack.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    """One request: its unique path, and the status + reason, or the transport error."""

    path: str
    sent: float  # time.monotonic()
    status: int | None = None
    reason: str | None = None
    error: str | None = None


def _reason_of(response: httpx.Response) -> str | None:
    if response.headers.get("content-type") != "application/problem+json":
        return None
    try:
        return json.loads(response.content).get("reason")
    except ValueError:
        return None


async def _client(
    url: str,
    ctx: ssl.SSLContext,
    token: str,
    stop: asyncio.Event,
    out: list[Outcome],
    budget: int,
) -> None:
    """One agent sending ``GET /payments/<unique id>`` until stopped or out of budget."""
    async with httpx.AsyncClient(verify=ctx, timeout=REQUEST_TIMEOUT, trust_env=False) as c:
        for _ in range(budget):
            if stop.is_set():
                return
            path = f"/payments/{uid()}"
            sent = time.monotonic()
            try:
                r = await c.get(url + path, headers={HEADER: token})
            except httpx.TransportError as exc:
                out.append(Outcome(path, sent, error=type(exc).__name__))
                await asyncio.sleep(0.05)  # the server is away: do not spin
                continue
            out.append(Outcome(path, sent, r.status_code, _reason_of(r)))
            if r.status_code != 200:
                await asyncio.sleep(0.02)  # a 503 is cheap: keep the count bounded


@dataclass
class Load:
    """CLIENTS concurrent clients on one event loop."""

    url: str
    ctx: ssl.SSLContext
    tokens: list[str]
    budget: int
    out: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(CLIENTS):
            token = self.tokens[i % len(self.tokens)]
            coro = _client(self.url, self.ctx, token, self.stop, self.out, self.budget)
            self.tasks.append(asyncio.create_task(coro))
        return self

    def oks(self, after: float = -float("inf")) -> list[Outcome]:
        return [o for o in self.out if o.status == 200 and o.sent > after]

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.summary()}")
            if all(t.done() for t in self.tasks):
                raise AssertionError(f"clients ran out of budget before {what}: {self.summary()}")
            await asyncio.sleep(0.05)

    async def finish(self) -> None:
        self.stop.set()
        done, pending = await asyncio.wait(self.tasks, timeout=REQUEST_TIMEOUT + 5)
        for t in pending:  # pragma: no cover - a request stuck past its timeout
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for o in self.out:
            key = o.error or f"{o.status} {o.reason or ''}".strip()
            counts[key] = counts.get(key, 0) + 1
        return json.dumps(counts, sort_keys=True)


# --------------------------------------------------------------------------- 1. SIGKILL


async def test_sigkill_mid_load_loses_no_answered_decision(stack: Stack) -> None:
    """SIGKILL the service process under 32 concurrent clients, restart it on the
    same SQLite file: every 2xx answered before the kill has its committed allow
    entry (the entry is committed before the app runs), the log verifies, and the
    restarted process serves and records."""
    log_url = f"sqlite:///{stack.tmp}/payments-log.db"
    log_name = f"payments-{uid()[:8]}"
    config = write_config(stack, stack.verifier_doc(log_url, log_name), "verifier")
    tokens = [stack.mint() for _ in range(4)]
    ctx = stack.agent_context()

    with worker(stack, config, "first") as first:
        load = Load(first.url, ctx, tokens, budget=400).start()
        try:
            began = time.monotonic()
            # Load for a while (~1.5 s) with answers flowing, then kill mid-load.
            await load.until(
                lambda: len(load.oks()) >= CLIENTS and time.monotonic() - began > 1.5,
                "answers under load",
            )
            # From another thread, so the clients keep sending while it lands.
            await asyncio.to_thread(first.kill)
            # The clients go on until the dead server shows (reset, refused).
            await load.until(lambda: any(o.error for o in load.out), "transport errors")
        finally:
            await load.finish()
        assert not first.alive()
    oks = load.oks()
    others = [o for o in load.out if o.status not in (200, None)]
    assert not others, f"unexpected answers under load: {load.summary()}"

    # A new process on the same database: the log reopens (WAL recovery) and works.
    with worker(stack, config, "second") as second:
        path = f"/payments/after-restart-{uid()}"
        with httpx.Client(verify=ctx, timeout=REQUEST_TIMEOUT, trust_env=False) as c:
            r = c.get(second.url + path, headers={HEADER: tokens[0]})
        assert r.status_code == 200, (r.status_code, r.text, second.stderr_tail())
        assert r.json()["pid"] == path.rsplit("/", 1)[1]

    entries = entries_by_path(log_url, log_name)
    assert_every_2xx_recorded(oks, entries)
    assert [e["decision"] for e in entries[path]] == ["allow"]
    size = assert_log_verifies(stack, log_url, log_name)
    assert size >= len(oks) + 1


# --------------------------------------------------------------------------- 2. PostgreSQL


def _pg_target() -> tuple[str, str, str, int]:
    """(version, cluster, host, port) of the local test server, or skip saying why."""
    assert PG_URL is not None
    parts = urlsplit(PG_URL)
    host, port = parts.hostname or "", parts.port or 5432
    if host not in ("127.0.0.1", "localhost", "::1"):
        unavailable(f"AXID_TEST_DATABASE_URL names {host!r}: only a loopback server is restarted")
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_isready") is None:
        unavailable("pg_ctlcluster/pg_isready (postgresql-common) are not installed")
    if os.geteuid() != 0:
        unavailable("restarting the PostgreSQL cluster needs root (pg_ctlcluster)")
    versions = sorted(
        (p.name for p in Path("/etc/postgresql").glob("*") if (p / "main").is_dir()),
        key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")],
    )
    if not versions:
        unavailable("no PostgreSQL cluster 'main' under /etc/postgresql")
    return versions[-1], "main", host, port


def _pg_ready(host: str, port: int) -> bool:
    r = subprocess.run(
        ["pg_isready", "-q", "-h", host, "-p", str(port)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return r.returncode == 0


def _pg_ctl(version: str, cluster: str, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, action],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _pg_ensure_up(version: str, cluster: str, host: str, port: int) -> None:
    """Never leave the shared server down: start it if needed, wait until ready."""
    deadline = time.monotonic() + 60
    started = False
    while not _pg_ready(host, port):
        if not started:
            _pg_ctl(version, cluster, "start")  # fails harmlessly if it is starting
            started = True
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back within 60 s")
        time.sleep(0.2)


async def test_postgresql_restart_mid_load(stack: Stack) -> None:
    """The decision log on PostgreSQL; the server is restarted (fast shutdown:
    sessions terminated, connections refused until it is back) under 32 clients.
    In the gap the answer is 503 ``audit_unavailable``, never a 2xx without its
    committed entry; the same service process allows again by itself (its pool
    re-connects); the log verifies."""
    require_pg()
    version, cluster, host, port = _pg_target()
    assert PG_URL is not None
    log_name = f"rel-pg-{uid()[:10]}"
    config = write_config(stack, stack.verifier_doc(PG_URL, log_name), "verifier")
    tokens = [stack.mint() for _ in range(4)]
    ctx = stack.agent_context()

    try:
        with worker(stack, config, "pg") as service:
            load = Load(service.url, ctx, tokens, budget=1500).start()
            try:
                began = time.monotonic()
                await load.until(
                    lambda: len(load.oks()) >= CLIENTS and time.monotonic() - began > 1.0,
                    "answers before the restart",
                )
                restarted = await asyncio.to_thread(_pg_ctl, version, cluster, "restart")
                assert restarted.returncode == 0, restarted.stderr[-2000:]
                await asyncio.to_thread(_pg_ensure_up, version, cluster, host, port)
                back = time.monotonic()
                # The same process resumes by itself: answers sent after the server is back.
                await load.until(lambda: len(load.oks(after=back)) >= CLIENTS, "resumed service")
            finally:
                await load.finish()
            assert service.alive(), service.stderr_tail()  # never restarted
    finally:
        _pg_ensure_up(version, cluster, host, port)

    for o in load.out:
        assert o.status in (200, 503, None), load.summary()
        if o.status == 503:
            assert o.reason == "audit_unavailable", load.summary()
    gap = [o for o in load.out if o.status == 503]
    assert gap, f"no request fell in the restart gap: {load.summary()}"
    oks = load.oks()
    assert_every_2xx_recorded(oks, entries_by_path(PG_URL, log_name))
    assert assert_log_verifies(stack, PG_URL, log_name) >= len(oks)


# --------------------------------------------------------------------------- 3. disk full


@contextmanager
def _small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``directory`` (root/CAP_SYS_ADMIN), or skip saying why."""
    directory.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError:
        unavailable("no mount(8) here: cannot make a small filesystem for the disk-full test")
    if r.returncode != 0:
        unavailable(
            "cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN): "
            + (r.stderr.strip() or f"mount exited {r.returncode}")
        )
    try:
        yield directory
    finally:
        u = subprocess.run(
            ["umount", str(directory)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if u.returncode != 0:  # still busy: detach it now, it goes when released
            subprocess.run(["umount", "-l", str(directory)], timeout=10, check=False)


def _fill(directory: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            block = bytes(size)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def _in_process_service(
    stack: Stack, doc: dict[str, Any], handled: list[str]
) -> tuple[AxidVerifier, ServerThread]:
    app = FastAPI()

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        handled.append(f"/payments/{pid}")
        return {"pid": pid, "run": request.state.axid.run}

    verifier = AxidVerifier(app, VerifierConfig.from_dict(doc))
    server = ServerThread(
        uvicorn_config(
            verifier, source=stack.source("payments"), log_level="warning", lifespan="on"
        )
    ).start()
    return verifier, server


def _get(client: httpx.Client, url: str, token: str) -> Outcome:
    path = f"/payments/{uid()}"
    sent = time.monotonic()
    r = client.get(url + path, headers={HEADER: token})
    return Outcome(path, sent, r.status_code, _reason_of(r))


def test_disk_full_sqlite_log(stack: Stack) -> None:
    """The SQLite log's filesystem fills up; the service then answers 503
    ``audit_unavailable`` and the app never runs; space freed -> it resumes by itself.

    How the disk is filled: a real, size-limited filesystem, a 4 MiB tmpfs mounted
    at a test directory (``mount -t tmpfs -o size=4m``: root or CAP_SYS_ADMIN;
    skipped, saying why, where mounting is not permitted). The decision log's
    database (and its -wal and -shm files) lives there; once the service has
    recorded some decisions, a filler file takes every remaining byte, so the next
    commit that needs the WAL file to grow fails with SQLITE_FULL. No component is
    changed or hooked. A commit may still fit in WAL space already allocated (for
    instance by an earlier failed batch): what is asserted is the contract, never
    a count -- each 2xx has its committed entry and ran the app; each 503 is
    ``audit_unavailable`` and did not run it.
    """
    with _small_tmpfs(stack.tmp / "small", "4m") as small:
        log_url = f"sqlite:///{small}/payments-log.db"
        log_name = f"payments-{uid()[:8]}"
        handled: list[str] = []
        verifier, server = _in_process_service(
            stack, stack.verifier_doc(log_url, log_name), handled
        )
        token = stack.mint()
        outcomes: list[Outcome] = []
        try:
            url = f"https://127.0.0.1:{server.port}"
            with httpx.Client(
                verify=stack.agent_context(), timeout=REQUEST_TIMEOUT, trust_env=False
            ) as client:
                for _ in range(20):
                    o = _get(client, url, token)
                    assert o.status == 200, o
                    outcomes.append(o)

                filler = _fill(small)
                assert shutil.disk_usage(small).free == 0
                full: list[Outcome] = []
                # Bounded: until 3 answers in a row are 503, at most 300 requests.
                for _ in range(300):
                    full.append(_get(client, url, token))
                    if len(full) >= 3 and all(o.status == 503 for o in full[-3:]):
                        break
                outcomes += full
                assert [o.status for o in full[-3:]] == [503] * 3, [o.status for o in full]
                for o in full:
                    assert o.status in (200, 503), o
                    if o.status == 503:
                        assert o.reason == "audit_unavailable", o

                filler.unlink()  # space is back: the same process resumes
                deadline = time.monotonic() + WAIT
                while True:
                    o = _get(client, url, token)
                    outcomes.append(o)
                    if o.status == 200:
                        break
                    assert o.status == 503 and o.reason == "audit_unavailable", o
                    assert time.monotonic() < deadline, "the service did not resume"
                    time.sleep(0.1)
                for _ in range(5):
                    o = _get(client, url, token)
                    assert o.status == 200, o
                    outcomes.append(o)
        finally:
            server.stop()

        oks = [o for o in outcomes if o.status == 200]
        denied = {o.path for o in outcomes if o.status == 503}
        assert sorted(handled) == sorted(o.path for o in oks)  # the app ran exactly for 2xx
        assert not denied & set(handled)
        assert_every_2xx_recorded(oks, entries_by_path(log_url, log_name))
        assert assert_log_verifies(stack, log_url, log_name) >= len(oks)
        assert verifier.started is False  # shut down: the tmpfs can be unmounted


# --------------------------------------------------------------------------- 4. issuer down


@dataclass(frozen=True)
class Probe:
    """One request and the age of a verifier source before and after it."""

    status: int
    reason: str | None
    age_before: float
    age_after: float


def _probe(client: httpx.Client, url: str, token: str, age: Callable[[], float]) -> Probe:
    before = age()
    o = _get(client, url, token)
    assert o.status is not None
    return Probe(o.status, o.reason, before, age())


def _issuer_down_scenario(
    stack: Stack,
    doc: dict[str, Any],
    age_of: Callable[[AxidVerifier], float],
    max_stale: float,
    reason: str,
    *,
    token: str,
    after: Callable[[httpx.Client, str, AxidVerifier], None] | None = None,
) -> list[Probe]:
    """Stop the issuer under a running verifier, probe until ``reason`` is answered,
    restart the issuer on the same port, probe until allowed again, then ``after``.

    Returns the probes made while the issuer was down. They are classified by the
    source's age around each request, never by wall time: an age <= max_stale
    after the answer means the source was fresh when the request was decided
    (must be allowed); an age > max_stale before it means it was stale (must be
    refused with ``reason``); in between either answer is right.
    """
    handled: list[str] = []
    verifier, server = _in_process_service(stack, doc, handled)
    url = f"https://127.0.0.1:{server.port}"
    down: list[Probe] = []
    recovering: list[Probe] = []

    def age() -> float:
        return age_of(verifier)

    try:
        with httpx.Client(
            verify=stack.agent_context(), timeout=REQUEST_TIMEOUT, trust_env=False
        ) as client:
            assert _get(client, url, token).status == 200
            stack.stop_issuer()  # returns once the server has stopped answering
            deadline = time.monotonic() + max_stale + WAIT
            while not (down and down[-1].status == 503):
                assert time.monotonic() < deadline, f"never refused: {down}"
                down.append(_probe(client, url, token, age))
                time.sleep(0.1)

            stack.start_issuer()  # the same port: the verifier's configured URL
            deadline = time.monotonic() + WAIT
            while not (recovering and recovering[-1].status == 200):
                assert time.monotonic() < deadline, f"never recovered: {recovering}"
                recovering.append(_probe(client, url, token, age))
                time.sleep(0.1)
            if after is not None:
                after(client, url, verifier)
    finally:
        server.stop()
    for p in down:
        assert p.status == 200 or (p.status, p.reason) == (503, reason), p
        if p.age_after <= max_stale:  # fresh the whole time: must be allowed
            assert p.status == 200, p
        if p.age_before > max_stale:  # stale before the request: must be refused
            assert p.status == 503, p
    # Kept verifying while the issuer was away (its cached state fresh enough) ...
    assert down[0].status == 200, down
    # ... then refused, failing closed; and refused until it recovered.
    assert (down[-1].status, down[-1].reason) == (503, reason)
    for p in recovering[:-1]:
        assert (p.status, p.reason) == (503, reason), p
    return down


def test_issuer_down_cached_jwks_then_jwks_unavailable(stack: Stack) -> None:
    """JWKS over mTLS, cache_ttl 0.5 s and max_stale 3 s: with the issuer stopped
    the verifier keeps allowing with the cached keys until max_stale, then answers
    503 ``jwks_unavailable`` (cached tokens too); the issuer back on its port, the
    refresher reloads the keys and requests are allowed again. Revocations are
    read from the issuer's database here, so they stay fresh throughout and only
    the JWKS decides."""
    max_stale = 3.0
    log_url = f"sqlite:///{stack.tmp}/payments-log.db"
    log_name = f"payments-{uid()[:8]}"
    doc = stack.verifier_doc(
        log_url,
        log_name,
        jwks={
            "url": f"{stack.issuer_url}/.well-known/jwks.json",
            "cache_ttl": 0.5,
            "max_stale": max_stale,
            "refetch_min_interval": 0,
            "timeout": 2,
        },
        revocations={"database_url": stack.issuer_db, "interval": 0.5, "max_stale": 60},
    )

    def jwks_age(v: AxidVerifier) -> float:
        assert v.jwks is not None
        return float(v.jwks.age)  # type: ignore[attr-defined]  # an HttpJwks

    down = _issuer_down_scenario(
        stack, doc, jwks_age, max_stale, "jwks_unavailable", token=stack.mint()
    )
    assert len(down) >= 2
    # The refusals were decisions too: recorded, and the log verifies.
    reasons = [e["reason"] for e in log_entries(log_url, log_name)]
    assert "jwks_unavailable" in reasons
    assert assert_log_verifies(stack, log_url, log_name) == len(reasons)


def test_issuer_down_revocations_go_stale_then_recover(stack: Stack) -> None:
    """Revocations polled from the issuer every 0.3 s, max_stale 3 s (the JWKS
    cache outlives the test here): with the issuer stopped, requests are allowed
    until the revocation set is older than max_stale, then refused 503
    ``revocation_unavailable``; with the issuer back on its port the poller is
    fresh again, requests are allowed, and a new revocation is enforced (403
    ``revoked``): the poller really polls again."""
    max_stale = 3.0
    log_url = f"sqlite:///{stack.tmp}/payments-log.db"
    log_name = f"payments-{uid()[:8]}"
    doc = stack.verifier_doc(
        log_url,
        log_name,
        jwks={
            "url": f"{stack.issuer_url}/.well-known/jwks.json",
            "cache_ttl": 1,
            "max_stale": 600,
            "timeout": 2,
        },
        revocations={
            "url": f"{stack.issuer_url}/v1/revocations",
            "interval": 0.3,
            "max_stale": max_stale,
            "timeout": 2,
        },
    )
    run = f"run-{uid()[:12]}"
    token = stack.mint(run)

    def revocations_age(v: AxidVerifier) -> float:
        assert v.revocations is not None
        return float(v.revocations.age)  # type: ignore[attr-defined]  # the poller

    def revoke_and_check(client: httpx.Client, url: str, verifier: AxidVerifier) -> None:
        seq = stack.issuer_client("admin").revoke("run", run, "test: revoked")["seq"]
        deadline = time.monotonic() + WAIT
        while verifier.revocations is None or verifier.revocations.seq < seq:
            assert time.monotonic() < deadline, "the revocation was never polled"
            time.sleep(0.05)
        o = _get(client, url, token)
        assert (o.status, o.reason) == (403, "revoked"), o

    _issuer_down_scenario(
        stack,
        doc,
        revocations_age,
        max_stale,
        "revocation_unavailable",
        token=token,
        after=revoke_and_check,
    )
    reasons = [e["reason"] for e in log_entries(log_url, log_name)]
    assert "revocation_unavailable" in reasons and reasons[-1] == "revoked"
    assert assert_log_verifies(stack, log_url, log_name) == len(reasons)
