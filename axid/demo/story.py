"""``axid demo``: the whole AXID story on loopback, in one process, in a few seconds.

What it sets up in the demo directory (a new temporary one, or ``--dir DIR``, which
must be empty or absent):

* ``certs/``: a dev PKI (``axid certs init``): the CA, ``bundle.pem`` and SVIDs for
  ``issuer``, ``payments``, ``planner`` and ``worker``, plus ``admin``
  (``spiffe://TD/ops/admin``, the only identity that may revoke) and ``worker-2``
  (a second certificate and key for the worker's very SPIFFE ID: another instance
  of the same workload);
* ``registrations.yaml``: planner may mint ``payments:read payments:refund
  payments:delete``, worker ``payments:read payments:refund``, both for tenant
  ``acme`` and audience ``payments``;
* ``keys/``: the issuer's token keyring and the two decision-log keys (0600), the
  logs' vkeys ``issuer.vkey`` and ``payments.vkey`` and the witness's ``witness.vkey``
  (what an auditor is given);
* ``witness/``: the witness's own files: ``keys/`` (``witness.key`` and
  ``witness.vkey``, as ``axid witness init --name witness.TD/demo`` writes them),
  ``witness.yaml`` (both logs' origins and vkeys) and its state database
  ``witness.db``;
* ``axid.db``: one SQLite database for the issuer's runs and revocations, the
  decision logs ``issuer`` and ``payments`` (with the witness's cosignatures) and
  the single-use store;
* ``refund.receipt``: the ``AXID-Receipt`` of the allowed refund, as its caller keeps it.

Then it serves, on 127.0.0.1 and each on its own port, all in this process's one
event loop: the witness (:mod:`axid.witness`: ``witness.yaml`` read, keys loaded,
state opened and the app given to uvicorn with the options ``axid witness serve``
uses; plain HTTP), the issuer (:mod:`axid.issuer`) and the sample service
"payments" (:mod:`axid.demo.payments`, behind
:class:`verifier.middleware.AxidVerifier`), both over mTLS, both logs configured
with the witness (``log.witnesses``, ``log.quorum: 1``, ``log.witness_mode:
async``). It plays the story with real mTLS clients: every step is a real HTTP
request, and its row shows the answer, the decision-log entry that recorded it and
the seq of the ``AXID-Receipt`` the answer carried (which must be that entry's).
At the end it waits (at most 10 s) until the witness's cosignatures of both logs'
latest checkpoints are stored (async witnessing: in the background), the
auditor's verification (:func:`axid.audit.verify.verify_log`) runs over both logs
with the verifier keys derived when the log keys were created (not the keys
stored in the database) and the witness's vkey, the latest signed and cosigned
checkpoint of the payments log is printed, ``axid audit verify ... --witness
keys/witness.vkey --quorum 1 --max-unwitnessed 0`` (the console script) verifies
the payments log as an auditor would, and the allowed refund's receipt is
checked against the payments log the way its caller would check it: by running
``axid audit receipt check`` with the log's vkey.

Nothing is faked: the expired token really expires (a 1-second token and a 1-second
leeway, so the demo waits about a second), the revocation reaches the verifier
through its revocation source reading the issuer's table, and the call without a
client certificate is refused by the TLS handshake itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import uvicorn
import yaml
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from axid import _yaml
from axid.audit.cosignature import WitnessKey
from axid.audit.note import NoteSigner
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import RECEIPT_HEADER, Receipt, ReceiptError
from axid.audit.store import LogKeyError, LogStore, generate_log_key, make_engine, origin_for
from axid.audit.verify import DatabaseSource, VerifyUsageError, verify_log
from axid.audit.witnessing import WitnessConfig as LogWitness
from axid.demo.payments import (
    PAYMENTS_AUDIENCE,
    PAYMENTS_SERVICE,
    PAYMENTS_TENANT,
    create_payments_app,
    payments_verifier_config,
)
from axid.issuer.app import create_app
from axid.issuer.client import AsyncIssuerClient, IssuerError, MintResult
from axid.issuer.config import IssuerConfig
from axid.issuer.service import SERVICE_NAME as ISSUER_SERVICE_NAME
from axid.witness import (
    WitnessApp,
    WitnessConfig,
    WitnessConfigError,
    WitnessKeyError,
    WitnessStore,
    WitnessStoreError,
    init_keys,
    load_signers,
    parse_config,
)
from axid.witness.server import KEEP_ALIVE as WITNESS_KEEP_ALIVE
from mtls.devpki import DevPki, DevPkiError, init_dev_pki
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern, TrustDomain
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import DEFAULT_HEADER
from verifier.revocation import DatabaseRevocationSource

__all__ = [
    "ADMIN_PATH",
    "COSIGN_WAIT",
    "DEMO_HOST",
    "ISSUER_LOG",
    "PLANNER_SCOPE",
    "RECEIPT_STEP",
    "STORY_STEPS",
    "WITNESS_QUORUM",
    "WORKER_SCOPE",
    "AuditSummary",
    "CosignWait",
    "DemoError",
    "DemoLayout",
    "DemoStack",
    "DemoUsageError",
    "Provisioned",
    "ReceiptAudit",
    "StepResult",
    "WitnessedAudit",
    "check_kept_receipt",
    "play_story",
    "prepare_directory",
    "provision",
    "render_audit",
    "render_cosign_wait",
    "render_receipt_check",
    "render_steps",
    "render_witnessed_audit",
    "run_demo",
    "verify_logs",
    "verify_witnessed",
    "wait_for_cosignatures",
    "witness_uvicorn_config",
    "witnessed_verify_args",
]

DEMO_HOST: Final = "127.0.0.1"
ISSUER_LOG: Final = "issuer"
ADMIN_PATH: Final = "/ops/admin"
WORKER2_NAME: Final = "worker-2"
PLANNER_SCOPE: Final = "payments:read payments:refund payments:delete"
WORKER_SCOPE: Final = "payments:read payments:refund"
# The verifier's clock-skew allowance in the demo (all on one host: small).
DEMO_LEEWAY: Final = 1
# Revocations reach the verifier within this (the story also asks it to look at once).
REVOCATION_INTERVAL: Final = 0.5
_REVOCATION_WAIT: Final = 5.0
_START_TIMEOUT: Final = 15.0
_HTTP_TIMEOUT: Final = 5.0
_NO_LOG: Final = "—"
# Rows of a complete story (a shorter list means a step was skipped).
STORY_STEPS: Final = 14
# The step whose receipt the demo keeps and has checked at the end: the allowed refund.
RECEIPT_STEP: Final = 4
_RECEIPT_CHECK_TIMEOUT: Final = 60.0
# The logs' witness quorum, and how long the demo waits for the witness to cosign the
# logs' latest checkpoints (async witnessing: in the background) before the audit.
WITNESS_QUORUM: Final = 1
COSIGN_WAIT: Final = 10.0


class DemoError(Exception):
    """The demo could not be set up or run (a server did not start, ...)."""


class DemoUsageError(DemoError):
    """Bad arguments: a non-empty ``--dir``, an invalid trust domain."""


# --------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo's files go, under one root directory."""

    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def registrations(self) -> Path:
        return self.root / "registrations.yaml"

    @property
    def database(self) -> Path:
        return self.root / "axid.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.database}"

    def log_key(self, log: str) -> Path:
        return self.keys / f"{log}-log.pem"

    def vkey_file(self, log: str) -> Path:
        return self.keys / f"{log}.vkey"

    @property
    def receipt_file(self) -> Path:
        return self.root / "refund.receipt"

    @property
    def witness_dir(self) -> Path:
        """The witness's own directory: ``keys/`` (``axid witness init``), ``witness.yaml``
        and its state database ``witness.db``."""
        return self.root / "witness"

    @property
    def witness_config(self) -> Path:
        return self.witness_dir / "witness.yaml"

    @property
    def witness_vkey_file(self) -> Path:
        """The witness's vkey as published to the logs' auditors, beside the logs' vkeys."""
        return self.keys / "witness.vkey"


def prepare_directory(directory: Path) -> DemoLayout:
    """Use ``directory`` for a new demo: created if absent; refused if it holds anything
    (the demo never mixes its PKI, keys or logs with files already there)."""
    d = Path(directory).expanduser()
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise DemoUsageError(f"{d} is not a directory (or is a symbolic link)")
    if d.exists():
        try:
            not_empty = any(d.iterdir())
        except OSError as exc:
            raise DemoUsageError(f"cannot read {d}: {exc.strerror or exc}") from None
        if not_empty:
            raise DemoUsageError(
                f"{d} is not empty: give a new or empty directory (the demo writes "
                "certs/, keys/, witness/, registrations.yaml, axid.db and refund.receipt "
                "into it)"
            )
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DemoUsageError(f"cannot create {d}: {exc.strerror or exc}") from None
    return DemoLayout(d.resolve())


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` wrote: the dev PKI and the decision logs' verifier keys."""

    layout: DemoLayout
    pki: DevPki
    vkeys: dict[str, str]
    witness_vkey: str = ""

    @property
    def trust_domain(self) -> str:
        return self.pki.trust_domain.name

    def cert(self, name: str) -> Path:
        return self.layout.certs / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.layout.certs / f"{name}.key"

    def spiffe_id(self, name: str) -> SpiffeId:
        if name == "admin":
            return SpiffeId(self.pki.trust_domain, ADMIN_PATH)
        return self.pki.spiffe_id("worker" if name == WORKER2_NAME else name)


def _registrations(td: str) -> dict[str, Any]:
    return {
        "registrations": [
            {
                "spiffe_id": f"spiffe://{td}/agent/planner",
                "tenant": PAYMENTS_TENANT,
                "agents": ["planner"],
                "audiences": [PAYMENTS_AUDIENCE],
                "scope": PLANNER_SCOPE,
            },
            {
                "spiffe_id": f"spiffe://{td}/agent/worker",
                "tenant": PAYMENTS_TENANT,
                "agents": ["worker"],
                "audiences": [PAYMENTS_AUDIENCE],
                "scope": WORKER_SCOPE,
            },
        ]
    }


def provision(layout: DemoLayout, trust_domain: str = "example.org") -> Provisioned:
    """Write the dev PKI, the extra SVIDs, the registration file, the log keys and
    their public verifier keys (``keys/<log>.vkey``, what an auditor is given), and the
    witness: its keys (as ``axid witness init --name witness.TD/demo --dir
    witness/keys`` writes them), its vkey published as ``keys/witness.vkey``, and
    ``witness/witness.yaml`` naming both logs (what ``axid witness serve`` reads)."""
    try:
        td = TrustDomain.parse(trust_domain)
    except SpiffeIdError as exc:
        raise DemoUsageError(f"invalid trust domain {trust_domain!r}: {exc}") from None
    try:
        pki = init_dev_pki(layout.certs, td.name)
        pki.ca.issue_svid(SpiffeId(td, ADMIN_PATH)).write(layout.certs / "admin")
        # Another instance of the worker: the same SPIFFE ID, its own key and certificate.
        pki.ca.issue_svid(pki.spiffe_id("worker")).write(layout.certs / WORKER2_NAME)
        layout.registrations.write_text(
            "# axid demo: who may mint which tokens (see axid.issuer.registry)\n"
            + yaml.safe_dump(_registrations(td.name), sort_keys=False),
            encoding="utf-8",
        )
        layout.keys.mkdir(mode=0o700, exist_ok=True)
        # The log keys are made here so that the auditor's verifier keys are known from
        # the start, independently of what the database will later say.
        vkeys = {}
        for log in (ISSUER_LOG, PAYMENTS_SERVICE):
            private = generate_log_key(layout.log_key(log))
            vkeys[log] = NoteSigner(origin_for(log), private).vkey()
            layout.vkey_file(log).write_text(vkeys[log] + "\n", encoding="ascii")
        witness_vkey = _provision_witness(layout, f"witness.{td.name}/demo", vkeys)
    except (DevPkiError, LogKeyError, WitnessKeyError, OSError) as exc:
        raise DemoError(f"cannot set up the demo in {layout.root}: {exc}") from None
    return Provisioned(layout, pki, vkeys, witness_vkey)


def _provision_witness(layout: DemoLayout, name: str, vkeys: dict[str, str]) -> str:
    """The witness's keys and config (it witnesses every log in ``vkeys``); its vkey."""
    (key,) = init_keys(layout.witness_dir / "keys", name)
    vkey = key.vkey()
    layout.witness_vkey_file.write_text(vkey + "\n", encoding="ascii")
    config = {
        "listen": f"{DEMO_HOST}:0",
        "keys": "keys",
        "database": "sqlite:///witness.db",
        "logs": [{"origin": origin_for(log), "vkey": v} for log, v in vkeys.items()],
    }
    layout.witness_config.write_text(
        "# axid demo: the witness (axid witness serve --config witness.yaml)\n"
        + yaml.safe_dump(config, sort_keys=False, width=1000),
        encoding="utf-8",
    )
    return vkey


# --------------------------------------------------------------------------- the servers


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the demo stops its servers itself
    (two servers in one loop must not both capture, then re-raise, SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(host: str = DEMO_HOST, port: int = 0) -> socket.socket:
    # Bound before the server starts, so the issuer knows its URL (the tokens' iss).
    # IPPROTO_TCP, as the sockets uvicorn binds itself (``axid serve``): asyncio then
    # sets TCP_NODELAY on every accepted connection (with protocol 0 it does not, and
    # an answer written in two parts waits ~40 ms for the client's delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Running:
    name: str
    url: str
    server: _Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task


async def _serve(name: str, server: _Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits when the app's startup fails
        raise DemoError(f"{name} did not start (uvicorn exit {exc.code})") from None
    finally:
        sock.close()


async def _start(name: str, app: Any, source: Any, sock: socket.socket) -> _Running:
    port = sock.getsockname()[1]
    config = uvicorn_config(
        app,
        host=DEMO_HOST,
        port=port,
        source=source,
        # As axid serve: the issuer's public read routes take clients without a certificate.
        client_cert="optional" if name == "issuer" else "required",
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    return await _launch(name, config, sock, f"https://{DEMO_HOST}:{port}")


def witness_uvicorn_config(
    app: Any, config: WitnessConfig, *, log_level: str = "warning"
) -> uvicorn.Config:
    """The witness's ``uvicorn.Config``: the very options ``axid witness serve``
    (:func:`axid.witness.server.serve`) gives uvicorn for ``config``."""
    tls = config.tls
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=WITNESS_KEEP_ALIVE,
        server_header=False,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )


@dataclass
class _WitnessParts:
    """What ``axid witness serve`` builds from its config: the app over the keys and
    the state database (closed after the server stopped, as it does)."""

    config: WitnessConfig
    app: WitnessApp
    store: WitnessStore

    def close(self) -> None:
        try:
            self.app.close()
        finally:
            self.store.close()


def _open_witness(path: Path) -> _WitnessParts:
    """Read ``witness.yaml`` as ``axid witness serve --config`` reads it, load its keys
    and open its state database (tables created)."""
    try:
        config = parse_config(_yaml.read_yaml_file(path), path.resolve().parent)
        signers = load_signers(config.keys)
        store = WitnessStore.open(config.database)
    except (_yaml.YamlError, WitnessConfigError, WitnessKeyError, WitnessStoreError) as exc:
        raise DemoError(f"the witness cannot start: {exc}") from None
    except SQLAlchemyError as exc:
        raise DemoError(f"the witness cannot start: state database: {type(exc).__name__}") from None
    try:
        app = WitnessApp(config.logs, signers, store)
    except BaseException:
        store.close()
        raise
    return _WitnessParts(config, app, store)


async def _launch(name: str, config: uvicorn.Config, sock: socket.socket, url: str) -> _Running:
    server = _Server(config)
    task = asyncio.create_task(_serve(name, server, sock), name=f"axid-demo-{name}")
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if not server.started:
        server.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=5)
        if task in done and not task.cancelled():
            failure = task.exception()
            if isinstance(failure, DemoError):
                raise failure
            if failure is not None:
                raise DemoError(f"{name} did not start: {type(failure).__name__}: {failure}")
        raise DemoError(f"{name} did not start within {_START_TIMEOUT:g} s")
    return _Running(name, url, server, task)


class DemoStack:
    """The witness, the issuer and "payments", served in the running event loop.

    ``async with DemoStack(provisioned) as stack:`` starts the witness (plain HTTP,
    as ``axid witness serve`` serves ``witness/witness.yaml``), then the issuer and
    payments over mTLS (issuer first: the verifier fetches its JWKS at startup), both
    logs configured with the witness (``log.witnesses``, quorum 1, ``witness_mode:
    async``), and stops them in the reverse order on exit.
    """

    def __init__(self, provisioned: Provisioned) -> None:
        self.provisioned = provisioned
        self.iss = ""
        self.revocations = DatabaseRevocationSource(
            provisioned.layout.db_url, interval=REVOCATION_INTERVAL, max_stale=30.0
        )
        self._issuer: _Running | None = None
        self._payments: _Running | None = None
        self._payments_source: FileSource | None = None
        self._witness: _Running | None = None
        self._witness_parts: _WitnessParts | None = None

    @property
    def layout(self) -> DemoLayout:
        return self.provisioned.layout

    @property
    def issuer_url(self) -> str:
        assert self._issuer is not None
        return self._issuer.url

    @property
    def payments_url(self) -> str:
        assert self._payments is not None
        return self._payments.url

    @property
    def witness_url(self) -> str:
        """The witness's submission prefix (it serves ``POST <url>/add-checkpoint``)."""
        assert self._witness is not None
        return self._witness.url

    @property
    def log_witnesses(self) -> tuple[LogWitness, ...]:
        """The logs' ``log.witnesses``: this witness, by its URL and published vkey."""
        return (LogWitness(self.witness_url, self.provisioned.witness_vkey),)

    async def _start_witness(self) -> None:
        parts = await asyncio.to_thread(_open_witness, self.layout.witness_config)
        self._witness_parts = parts
        cfg = parts.config
        if cfg.tls is not None:  # the demo's witness.yaml has none
            raise DemoError("the demo's witness serves plain HTTP: remove tls from witness.yaml")
        try:
            sock = _listening_socket(cfg.host, cfg.port)
        except OSError as exc:
            raise DemoError(f"the witness cannot listen: {exc.strerror or exc}") from None
        port = sock.getsockname()[1]
        config = witness_uvicorn_config(parts.app, cfg)
        self._witness = await _launch("witness", config, sock, f"http://{cfg.host}:{port}")

    async def start(self) -> None:
        p = self.provisioned
        layout = p.layout
        await self._start_witness()
        issuer_sock = _listening_socket()
        try:
            port = issuer_sock.getsockname()[1]
            self.iss = f"https://{DEMO_HOST}:{port}"
            config = IssuerConfig(
                registrations=layout.registrations,
                issuer=self.iss,
                host=DEMO_HOST,
                port=port,
                cert=p.cert("issuer"),
                key=p.key("issuer"),
                bundle=p.pki.bundle,
                keys_dir=layout.keys / "issuer-tokens",
                database_url=layout.db_url,
                admins=(SpiffeIdPattern.parse(str(p.spiffe_id("admin"))),),
                log_name=ISSUER_LOG,
                log_key=layout.log_key(ISSUER_LOG),
                log_witnesses=self.log_witnesses,
                log_quorum=WITNESS_QUORUM,
                log_witness_mode="async",
            )
            issuer_app = await asyncio.to_thread(create_app, config)
        except Exception as exc:  # config, registry, SVID files, keyring, database
            issuer_sock.close()
            raise DemoError(f"the issuer cannot start: {type(exc).__name__}: {exc}") from None
        except BaseException:
            issuer_sock.close()
            raise
        self._issuer = await _start(
            "issuer", issuer_app, issuer_app.state.components.source, issuer_sock
        )

        payments_sock = _listening_socket()
        try:
            verifier_config = payments_verifier_config(
                iss=self.iss,
                issuer_url=self._issuer.url,
                bundle=p.pki.bundle,
                cert=p.cert("payments"),
                key=p.key("payments"),
                database_url=layout.db_url,
                log_key=layout.log_key(PAYMENTS_SERVICE),
                revocations=self.revocations,
                issuer_id=str(p.spiffe_id("issuer")),
                leeway=DEMO_LEEWAY,
                witnesses=self.log_witnesses,
                quorum=WITNESS_QUORUM,
                witness_mode="async",
            )
            app = create_payments_app(verifier_config)
            self._payments_source = FileSource(p.cert("payments"), p.key("payments"), p.pki.bundle)
        except BaseException:
            payments_sock.close()
            raise
        self._payments = await _start("payments", app, self._payments_source, payments_sock)

    async def stop(self) -> None:
        """Stop payments, then the issuer (each finishes its open requests and closes
        its log), then the witness."""
        running = [r for r in (self._payments, self._issuer, self._witness) if r is not None]
        self._payments = self._issuer = self._witness = None
        for r in running:
            await r.stop()
        if self._payments_source is not None:
            self._payments_source.close()
            self._payments_source = None
        if self._witness_parts is not None:
            parts, self._witness_parts = self._witness_parts, None
            await asyncio.to_thread(parts.close)

    async def __aenter__(self) -> DemoStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------- the story


@dataclass(frozen=True)
class StepResult:
    """One row of the story: what was done, what came back, what should have."""

    number: int
    actor: str
    action: str
    expected_status: int | None  # None: no HTTP answer (the TLS handshake is refused)
    expected_reason: str  # with no HTTP answer: a prefix ("tls:"), the wording varies
    status: int | None
    reason: str
    log: str  # "payments #N", "issuer #N" or "—" (nothing was recorded)
    detail: str
    problem: str | None = None  # why the step did not do what it should
    receipt: Receipt | None = field(default=None, repr=False)  # the answer's AXID-Receipt

    @property
    def ok(self) -> bool:
        return self.problem is None


class _StoryFailed(Exception):
    pass


@dataclass
class _Answer:
    status: int | None
    reason: str
    body: Any = None
    entry: dict[str, Any] | None = None
    receipt: Receipt | None = None
    bad_receipt: str | None = None  # why the answer's AXID-Receipt could not be read

    @property
    def log(self) -> str:
        if self.entry is None:
            return _NO_LOG
        service = self.entry.get("service")
        log = ISSUER_LOG if service == ISSUER_SERVICE_NAME else PAYMENTS_SERVICE
        return f"{log} #{self.entry['seq']}"


def _receipt_of(response: httpx.Response) -> tuple[Receipt | None, str | None]:
    """The answer's ``AXID-Receipt`` (strictly parsed), or why it is unusable."""
    values = response.headers.get_list(RECEIPT_HEADER)
    if not values:
        return None, None
    if len(values) > 1:
        return None, f"more than one {RECEIPT_HEADER} header"
    try:
        return Receipt.from_header(values[0]), None
    except ReceiptError as exc:
        return None, f"malformed {RECEIPT_HEADER}: {exc}"


def _receipt_is_for(receipt: Receipt, entry: dict[str, Any] | None) -> bool:
    """The receipt's entry bytes say exactly what the log's stored entry says."""
    try:
        return entry is not None and json.loads(receipt.entry) == entry
    except ValueError:
        return False


def _chain(chain: list[str] | tuple[str, ...], run: str | None) -> str:
    return " → ".join([*chain, run or "?"])


def _tls_reason(exc: BaseException) -> str:
    """A short, honest name for how the TLS connection failed (walks the cause chain:
    httpx and anyio wrap the socket's error)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(e).__name__} {e}" for e in seen).lower()
    if "certificate required" in text or "certificate_required" in text:
        return "tls: certificate required"
    if "handshake failure" in text or "handshake_failure" in text:
        return "tls: handshake failure"
    if any(isinstance(e, ConnectionResetError) for e in seen):
        return "tls: connection reset"
    if "eof" in text or "disconnected" in text:
        return "tls: connection closed"
    return f"tls: {type(seen[-1]).__name__}"


class _Story:
    """The steps, in order; stops at the first step that does not do what it should."""

    def __init__(self, stack: DemoStack, run_suffix: str) -> None:
        self.stack = stack
        self.p = stack.provisioned
        self.results: list[StepResult] = []
        self.planner_run = f"planner-{run_suffix}"
        self.worker_run = f"worker-{run_suffix}"
        self._sources: dict[str, FileSource] = {}
        self._issuer_clients: dict[str, AsyncIssuerClient] = {}
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}
        self._engine = make_engine(self.p.layout.db_url)

    # ------------------------------------------------------------------ plumbing

    def _source(self, name: str) -> FileSource:
        source = self._sources.get(name)
        if source is None:
            source = FileSource(self.p.cert(name), self.p.key(name), self.p.pki.bundle)
            self._sources[name] = source
        return source

    def _issuer(self, name: str) -> AsyncIssuerClient:
        client = self._issuer_clients.get(name)
        if client is None:
            client = AsyncIssuerClient(
                self.stack.issuer_url,
                self._source(name),
                issuer_id=self.p.spiffe_id("issuer"),
                timeout=_HTTP_TIMEOUT,
            )
            self._issuer_clients[name] = client
        return client

    def _client(self, name: str, server: str = PAYMENTS_SERVICE) -> httpx.AsyncClient:
        """``name``'s mTLS client to payments (or, with ``server="issuer"``, the issuer)."""
        client = self._clients.get((name, server))
        if client is None:
            ctx = client_context(self._source(name), server_id=self.p.spiffe_id(server))
            client = httpx.AsyncClient(
                base_url=self.stack.issuer_url if server == "issuer" else self.stack.payments_url,
                verify=ctx,
                timeout=_HTTP_TIMEOUT,
                trust_env=False,
            )
            self._clients[(name, server)] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        for issuer in self._issuer_clients.values():
            await issuer.aclose()
        for source in self._sources.values():
            source.close()
        self._clients.clear()
        self._issuer_clients.clear()
        self._sources.clear()
        await asyncio.to_thread(self._engine.dispose)

    def _read_last(self, log: str) -> dict[str, Any] | None:
        store = LogStore(self._engine, log)
        size = store.size()
        if size == 0:
            return None
        for _seq, data, _leaf in store.entries(size - 1, size):
            entry: dict[str, Any] = json.loads(data)
            return entry
        return None

    async def _last_entry(self, log: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read_last, log)

    async def _log_size(self, log: str) -> int:
        return await asyncio.to_thread(lambda: LogStore(self._engine, log).size())

    # ------------------------------------------------------------------ requests

    async def _mint(
        self,
        name: str,
        *,
        agent: str,
        run: str,
        scope: str,
        parent: str | None = None,
        ttl: int | None = None,
    ) -> tuple[_Answer, MintResult | None]:
        minted: MintResult | None = None
        try:
            minted = await self._issuer(name).mint(
                agent=agent,
                run=run,
                audience=PAYMENTS_AUDIENCE,
                scope=scope,
                parent_token=parent,
                ttl_seconds=ttl,
            )
            answer = _Answer(201, "ok", receipt=minted.receipt)
        except IssuerError as exc:
            answer = _Answer(exc.status, exc.reason, exc.detail, receipt=exc.receipt)
        if answer.status is not None:
            entry = await self._last_entry(ISSUER_LOG)
            if entry is not None and entry.get("path") == "/v1/tokens":
                answer.entry = entry
        return answer, minted

    async def _call(self, name: str, method: str, path: str, token: str | None) -> _Answer:
        headers = {} if token is None else {DEFAULT_HEADER: token}
        response = await self._client(name).request(method, path, headers=headers)
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        if 200 <= response.status_code < 300:
            reason = "ok"
        elif isinstance(body, dict) and isinstance(body.get("reason"), str):
            reason = body["reason"]
        else:
            reason = f"HTTP {response.status_code}"
        receipt, bad_receipt = _receipt_of(response)
        answer = _Answer(response.status_code, reason, body, None, receipt, bad_receipt)
        entry = await self._last_entry(PAYMENTS_SERVICE)
        # Sequential story: the last entry is this request's, if it was recorded at all.
        if entry is not None and entry.get("path") == path and entry.get("method") == method:
            answer.entry = entry
        return answer

    # ------------------------------------------------------------------ rows

    def _row(
        self,
        actor: str,
        action: str,
        expected: tuple[int | None, str],
        answer: _Answer,
        detail: str,
        *,
        recorded: bool = True,
        extra_problem: str | None = None,
    ) -> StepResult:
        want_status, want_reason = expected
        problem: str | None = None
        if want_status is None:
            # No HTTP answer expected: the TLS layer refuses; how it says so varies.
            if answer.status is not None or not answer.reason.startswith("tls:"):
                problem = f"expected the TLS handshake to fail, got {answer.status} {answer.reason}"
        elif (answer.status, answer.reason) != (want_status, want_reason):
            problem = f"expected {want_status} {want_reason}, got {answer.status} {answer.reason}"
        elif recorded and answer.entry is None:
            problem = "no decision-log entry records this request"
        elif recorded and answer.entry is not None and answer.entry.get("reason") != want_reason:
            problem = f"the decision log says {answer.entry.get('reason')}, not {want_reason}"
        elif recorded and answer.receipt is None:
            problem = answer.bad_receipt or f"the answer carries no {RECEIPT_HEADER}"
        elif recorded and not _receipt_is_for(answer.receipt, answer.entry):
            problem = f"the answer's {RECEIPT_HEADER} is not for the log entry that recorded it"
        elif extra_problem is not None:
            problem = extra_problem
        result = StepResult(
            number=len(self.results) + 1,
            actor=actor,
            action=action,
            expected_status=want_status,
            expected_reason=want_reason,
            status=answer.status,
            reason=answer.reason,
            log=answer.log,
            detail=detail if problem is None else f"{detail}; {problem}".lstrip("; "),
            problem=problem,
            receipt=answer.receipt,
        )
        self.results.append(result)
        if problem is not None:
            raise _StoryFailed(problem)
        return result

    @staticmethod
    def _note(answer: _Answer) -> str:
        """Why it was denied: the log entry's note, else the problem's detail."""
        note = answer.entry.get("note") if answer.entry else None
        if not note and isinstance(answer.body, dict):
            note = answer.body.get("detail")
        return str(note) if note else ""

    @staticmethod
    def _who(answer: _Answer) -> str:
        by = answer.body.get("by") if isinstance(answer.body, dict) else None
        if not isinstance(by, dict):
            return ""
        return f"by {by.get('tenant')}/{by.get('agent')}, chain {_chain(by['chain'], by['run'])}"

    @staticmethod
    def _seq_matches(answer: _Answer) -> str | None:
        """An allowed request's handler saw its own log entry's seq."""
        by = answer.body.get("by") if isinstance(answer.body, dict) else None
        if answer.entry is None or not isinstance(by, dict):
            return "the answer does not say who did it"
        if by.get("log_seq") != answer.entry["seq"]:
            return "the handler's log_seq is not the log entry's seq"
        return None

    # ------------------------------------------------------------------ the steps

    async def play(self) -> None:
        planner_run, worker_run = self.planner_run, self.worker_run
        allow, created = (200, "ok"), (201, "ok")

        answer, root = await self._mint(
            "planner", agent="planner", run=planner_run, scope=PLANNER_SCOPE
        )
        self._row(
            "planner",
            "mint a token (issuer POST /v1/tokens)",
            created,
            answer,
            f"run {planner_run}, scope read refund delete",
        )
        assert root is not None

        answer, short = await self._mint(
            "planner", agent="planner", run=planner_run, scope="payments:read", ttl=1
        )
        self._row(
            "planner",
            "mint a 1-second token (ttl_seconds=1)",
            created,
            answer,
            "kept for the expiry step below",
        )
        assert short is not None

        answer = await self._call("planner", "GET", "/payments/p-1001", root.token)
        self._row(
            "planner",
            "GET /payments/p-1001",
            allow,
            answer,
            self._who(answer),
            extra_problem=self._seq_matches(answer),
        )

        answer = await self._call("planner", "POST", "/payments/p-1001/refund", root.token)
        self._row(
            "planner",
            "POST /payments/p-1001/refund",
            allow,
            answer,
            "refunded; the refund rule is single use",
            extra_problem=self._seq_matches(answer),
        )

        answer = await self._call("planner", "POST", "/payments/p-1001/refund", root.token)
        self._row(
            "planner",
            "POST /payments/p-1001/refund again, same token",
            (403, "replayed"),
            answer,
            self._note(answer),
        )

        answer, child = await self._mint(
            "worker", agent="worker", run=worker_run, scope="payments:read", parent=root.token
        )
        spawned = answer.entry or {}
        chain = _chain(spawned.get("chain") or [], spawned.get("run"))
        want_chain = _chain([planner_run], worker_run)
        self._row(
            "worker",
            "spawned by the planner: mint a child token, scope payments:read",
            created,
            answer,
            f"chain {chain}",
            extra_problem=None if chain == want_chain else f"the chain is not {want_chain}",
        )
        assert child is not None

        answer = await self._call("worker", "GET", "/payments/p-1002", child.token)
        self._row(
            "worker",
            "GET /payments/p-1002",
            allow,
            answer,
            self._who(answer),
            extra_problem=self._seq_matches(answer),
        )

        answer = await self._call("worker", "POST", "/payments/p-1002/refund", child.token)
        self._row(
            "worker",
            "POST /payments/p-1002/refund (outside its token's scope)",
            (403, "scope_insufficient"),
            answer,
            self._note(answer),
        )

        answer = await self._call(WORKER2_NAME, "GET", "/payments/p-1002", child.token)
        self._row(
            "worker #2",
            "GET /payments/p-1002 with the worker's token (another instance of the worker: "
            "its own valid SVID for the same SPIFFE ID)",
            (401, "cert_binding_mismatch"),
            answer,
            self._note(answer),
        )

        answer = await self._call("planner", "GET", "/payments/p-1002", child.token)
        self._row(
            "planner",
            "GET /payments/p-1002 with the worker's token",
            (401, "subject_mismatch"),
            answer,
            self._note(answer),
        )

        # The 1-second token: wait (for real) until it is past exp + the verifier's leeway.
        wait = max(0.0, short.expires_at + DEMO_LEEWAY - time.time()) + 0.05
        await asyncio.sleep(wait)
        answer = await self._call("planner", "GET", "/payments/p-1003", short.token)
        self._row(
            "planner",
            "GET /payments/p-1003 with the 1-second token",
            (401, "token_expired"),
            answer,
            f"waited {wait:.1f} s for exp + {DEMO_LEEWAY} s leeway",
        )

        answer, seen = await self._revoke(planner_run)
        cascaded = [str(c.get("value")) for c in (answer.body or {}).get("cascaded", [])]
        self._row(
            "admin",
            f"revoke run {planner_run} (issuer POST /v1/revocations)",
            created,
            answer,
            f"cascaded to {', '.join(cascaded) or 'nothing'}; "
            f"the verifier had it {seen * 1000:.1f} ms later",
            extra_problem=None
            if worker_run in cascaded
            else f"the revocation did not cascade to {worker_run}",
        )

        answer = await self._call("worker", "GET", "/payments/p-1002", child.token)
        self._row(
            "worker",
            "GET /payments/p-1002 (its parent run is revoked)",
            (403, "revoked"),
            answer,
            self._note(answer),
        )

        answer, log_grew = await self._anonymous(root.token)
        self._row(
            "anonymous",
            "GET /payments/p-1001 without a client certificate",
            (None, "tls:"),
            answer,
            "the server requires a client certificate and aborted the TLS handshake (asyncio "
            "sends no TLS alert, cpython#98078): nothing reached the service or its log",
            recorded=False,
            extra_problem="the payments log grew: something was recorded" if log_grew else None,
        )

    async def _revoke(self, run: str) -> tuple[_Answer, float]:
        """The admin revokes ``run``; then wait (bounded) until the verifier has it.

        Sent as the admin's plain mTLS request (what ``AsyncIssuerClient.revoke`` sends):
        the client returns the document only, and the row shows the answer's receipt."""
        response = await self._client("admin", "issuer").post(
            "/v1/revocations",
            json={"kind": "run", "value": run, "reason": "demo: the planner's run"},
        )
        doc: Any = None
        with contextlib.suppress(ValueError):
            doc = response.json()
        doc = doc if isinstance(doc, dict) else {}
        if response.status_code != 201:
            return _Answer(response.status_code, str(doc.get("reason") or "bad_response")), 0.0
        receipt, bad_receipt = _receipt_of(response)
        answer = _Answer(201, "ok", doc, None, receipt, bad_receipt)
        entry = await self._last_entry(ISSUER_LOG)
        if entry is not None and entry.get("path") == "/v1/revocations":
            answer.entry = entry
        target = max([doc["seq"], *(c["seq"] for c in doc.get("cascaded", []))])
        source = self.stack.revocations
        began = time.monotonic()
        # Ask the verifier's source to look now rather than wait for its next poll.
        while source.seq < target:
            if time.monotonic() - began > _REVOCATION_WAIT:
                raise _StoryFailed(
                    f"the verifier did not see revocation {target} within {_REVOCATION_WAIT:g} s"
                )
            await source.poll()
            if source.seq < target:
                await asyncio.sleep(0.05)
        return answer, time.monotonic() - began

    async def _anonymous(self, token: str) -> tuple[_Answer, bool]:
        """A plain TLS client that trusts the bundle but has no certificate to show."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # SVIDs name SPIFFE IDs, not hosts
        ctx.load_verify_locations(cafile=str(self.p.pki.bundle))
        before = await self._log_size(PAYMENTS_SERVICE)
        async with httpx.AsyncClient(verify=ctx, timeout=_HTTP_TIMEOUT, trust_env=False) as c:
            try:
                response = await c.get(
                    f"{self.stack.payments_url}/payments/p-1001", headers={DEFAULT_HEADER: token}
                )
            except httpx.TransportError as exc:
                answer = _Answer(None, _tls_reason(exc))
            else:
                body: Any = None
                with contextlib.suppress(ValueError):
                    body = response.json()
                reason = body.get("reason") if isinstance(body, dict) else None
                answer = _Answer(response.status_code, str(reason or "answered"))
        return answer, await self._log_size(PAYMENTS_SERVICE) != before


def _failure(number: int, problem: str) -> StepResult:
    return StepResult(
        number, "demo", "(between steps)", None, "", None, "", _NO_LOG, problem, problem
    )


async def play_story(stack: DemoStack) -> list[StepResult]:
    """Play the story against a running :class:`DemoStack`; one result per step played
    (it stops after the first step that did not do what it should)."""
    story = _Story(stack, secrets.token_hex(3))
    try:
        await story.play()
    except _StoryFailed as exc:
        if not story.results or story.results[-1].ok:
            # Failed between rows (e.g. the revocation never reached the verifier).
            story.results.append(_failure(len(story.results) + 1, str(exc)))
    except (httpx.HTTPError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"[:300]
        story.results.append(_failure(len(story.results) + 1, problem))
    finally:
        await story.aclose()
    return story.results


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class AuditSummary:
    """The auditor's verification of one decision log."""

    log: str
    ok: bool
    entries: int
    checkpoints: int
    latest_note: str | None
    problem: str | None = None
    vkey: str = field(default="", repr=False)
    # With a witness (verify_logs(witness_vkey=...)): the newest checkpoint it
    # cosigned, by whom, and that note with its cosignature lines.
    witnessed_size: int | None = None
    cosigners: tuple[str, ...] = ()
    witnessed_note: str | None = field(default=None, repr=False)
    witness_failure: str | None = None  # intact (problem None), but not witnessed


def verify_logs(
    db_url: str, vkeys: dict[str, str], witness_vkey: str | None = None
) -> list[AuditSummary]:
    """Verify each log in ``vkeys`` (log name -> trusted verifier key) in ``db_url``;
    with ``witness_vkey``, also require a checkpoint cosigned by that witness (quorum 1;
    every cosignature by it must verify)."""
    policy = None
    if witness_vkey is not None:
        policy = WitnessPolicy((WitnessKey.from_vkey(witness_vkey),), WITNESS_QUORUM)
    out = []
    for log, vkey in vkeys.items():
        try:
            source = DatabaseSource(db_url, log)
        except VerifyUsageError as exc:
            out.append(AuditSummary(log, False, 0, 0, None, str(exc), vkey))
            continue
        try:
            report = verify_log(source, vkey=vkey, witnesses=policy)
        except VerifyUsageError as exc:
            out.append(AuditSummary(log, False, 0, 0, None, str(exc), vkey))
            continue
        finally:
            source.close()
        note = report.latest_note.decode("utf-8", "replace") if report.latest_note else None
        problem = None
        if report.first_bad is not None:
            problem = str(report.first_bad)
        elif not report.ok and report.witness_failure is None:
            problem = "verification failed"
        witnessed = report.witnessed_note
        out.append(
            AuditSummary(
                log,
                report.ok,
                report.entries,
                report.checkpoints,
                note,
                problem,
                vkey,
                report.witnessed_size,
                tuple(report.cosigners),
                witnessed.decode("utf-8", "replace") if witnessed else None,
                None if problem is not None else report.witness_failure,
            )
        )
    return out


@dataclass(frozen=True)
class CosignWait:
    """How waiting for the witness's cosignatures on the logs' latest checkpoints went."""

    witness: str
    sizes: dict[str, int]  # log -> its latest checkpoint's size
    cosigned: dict[str, int]  # log -> the largest size the witness cosigned (0: none)
    seconds: float  # waited
    limit: float  # the most it would have waited

    @property
    def ok(self) -> bool:
        return all(self.cosigned.get(log, -1) >= size for log, size in self.sizes.items())


async def wait_for_cosignatures(
    db_url: str, logs: list[str], witness_vkey: str, timeout: float | None = None
) -> CosignWait:
    """Wait (at most ``timeout`` seconds, default :data:`COSIGN_WAIT`) until the
    witness's cosignature of each log's latest checkpoint is stored beside it, as the
    logs' background witnessing stores it (``witness_mode: async``: no request waited
    for it)."""
    limit = COSIGN_WAIT if timeout is None else timeout
    key = WitnessKey.from_vkey(witness_vkey)
    stored_as = (key.name, key.key_id.hex())
    engine = make_engine(db_url)

    def look() -> tuple[dict[str, int], dict[str, int]]:
        sizes, cosigned = {}, {}
        for log in logs:
            store = LogStore(engine, log)
            sizes[log] = store.size()
            cosigned[log] = store.cosigned_sizes().get(stored_as, 0)
        return sizes, cosigned

    try:
        began = time.monotonic()
        while True:
            sizes, cosigned = await asyncio.to_thread(look)
            wait = CosignWait(key.name, sizes, cosigned, time.monotonic() - began, limit)
            if wait.ok or wait.seconds >= limit:
                return wait
            await asyncio.sleep(0.02)
    finally:
        await asyncio.to_thread(engine.dispose)


@dataclass(frozen=True)
class ReceiptAudit:
    """``axid audit receipt check`` run on a kept receipt: its arguments (after
    ``axid``), exit code (None: it did not finish in time) and output."""

    log: str
    seq: int
    args: list[str]
    code: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True)
class WitnessedAudit:
    """``axid audit verify ... --witness VKEY --quorum 1`` run on a log: its
    arguments (after ``axid``), exit code (None: it did not finish in time), output."""

    log: str
    args: list[str]
    code: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def witnessed_verify_args(
    layout: DemoLayout, log: str, max_unwitnessed: int | None = 0
) -> list[str]:
    """The auditor's command (after ``axid``): the log verified with its vkey, and a
    checkpoint cosigned by the witness required, by default with no entry after it
    (the demo waited for the latest checkpoint's cosignature)."""
    args = [
        *("audit", "verify", "--db", layout.db_url, "--log", log),
        *("--vkey", str(layout.vkey_file(log))),
        *("--witness", str(layout.witness_vkey_file), "--quorum", str(WITNESS_QUORUM)),
    ]
    if max_unwitnessed is not None:
        args += ["--max-unwitnessed", str(max_unwitnessed)]
    return args


async def verify_witnessed(layout: DemoLayout, log: str) -> WitnessedAudit:
    """Run :func:`witnessed_verify_args` as an auditor would: a child process."""
    args = witnessed_verify_args(layout, log)
    code, output = await _run_axid(args)
    return WitnessedAudit(log, args, code, output)


async def _run_axid(args: list[str]) -> tuple[int | None, str]:
    """``axid ARGS`` in a child process: (exit code, None if it did not finish within
    the time limit; its output)."""
    proc = await asyncio.create_subprocess_exec(
        *_axid_command(),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _RECEIPT_CHECK_TIMEOUT)
    except BaseException as exc:  # the timeout, or the demo being stopped
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await proc.wait()
        if not isinstance(exc, TimeoutError):
            raise
        return None, f"did not finish within {_RECEIPT_CHECK_TIMEOUT:g} s"
    return proc.returncode, out.decode("utf-8", "replace")


def _axid_command() -> list[str]:
    """The ``axid`` console script installed next to this Python."""
    script = Path(sys.executable).parent / "axid"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from axid.cli import main; main()"]


async def check_kept_receipt(layout: DemoLayout, log: str, receipt: Receipt) -> ReceiptAudit:
    """Keep ``receipt`` in ``layout.receipt_file`` as its caller would, then check it
    against ``log`` in the demo's database as an auditor would: ``axid audit receipt
    check FILE --vkey keys/<log>.vkey --db URL --log LOG``, a child process."""
    try:
        layout.receipt_file.write_text(
            f"{RECEIPT_HEADER}: {receipt.header_value()}\n", encoding="ascii"
        )
    except OSError as exc:
        raise DemoError(f"cannot write {layout.receipt_file}: {exc}") from None
    args = [
        *("audit", "receipt", "check", str(layout.receipt_file)),
        *("--vkey", str(layout.vkey_file(log)), "--db", layout.db_url, "--log", log),
    ]
    code, output = await _run_axid(args)
    return ReceiptAudit(log, receipt.seq, args, code, output)


# --------------------------------------------------------------------------- output


def _status(value: int | None) -> str:
    return _NO_LOG if value is None else str(value)


def render_steps(console: Console, steps: list[StepResult]) -> None:
    """The story as a table: one row per step, its detail under the action."""
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
    for s in steps:
        action = Text(s.action)
        if s.detail:
            action.append("\n" + s.detail, style="dim" if s.ok else "red")
        table.add_row(
            Text(str(s.number)),
            Text(s.actor),
            action,
            Text(_status(s.status)),
            Text(s.reason, style="green" if s.reason == "ok" else "yellow"),
            Text(s.log),
            Text(_NO_LOG if s.receipt is None else str(s.receipt.seq)),
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


def render_audit(console: Console, audits: list[AuditSummary], db_url: str) -> None:
    for a in audits:
        witnessed = ""
        if a.witnessed_size is not None:
            witnessed = (
                f"; witnessed: checkpoint {a.witnessed_size} cosigned by {', '.join(a.cosigners)}"
            )
        if a.ok:
            console.print(
                f"audit verify: OK ({a.entries} entries, {a.checkpoints} checkpoints)"
                f" log {a.log} in {db_url}{witnessed}",
                soft_wrap=True,
            )
        elif a.problem is None and a.witness_failure is not None:
            console.print(
                f"audit verify: NOT WITNESSED log {a.log} (intact: {a.entries} entries, "
                f"{a.checkpoints} checkpoints): {a.witness_failure}",
                soft_wrap=True,
            )
        else:
            console.print(f"audit verify: FAILED log {a.log}: {a.problem}", soft_wrap=True)
    payments = next((a for a in audits if a.log == PAYMENTS_SERVICE), None)
    if payments is not None and payments.latest_note:
        note, cosigned = payments.latest_note, ""
        if payments.witnessed_note and payments.witnessed_size == payments.entries:
            note, cosigned = (
                payments.witnessed_note,
                f", cosigned by {', '.join(payments.cosigners)}",
            )
        console.print(
            "latest checkpoint of the payments log (C2SP signed note, "
            f"verified with vkey {payments.vkey}{cosigned}):",
            soft_wrap=True,
        )
        console.print(note.rstrip("\n"), soft_wrap=True)


def render_witnessed_audit(console: Console, audit: WitnessedAudit) -> None:
    """The auditor's verify with the witness: the command, its report (up to the latest
    checkpoint, printed above already; all of it when it failed), the result."""
    console.print(f"$ axid {' '.join(audit.args)}", soft_wrap=True)
    output = audit.output
    if audit.ok:
        output = output.split("latest checkpoint (keep it", 1)[0]
    for line in output.rstrip("\n").splitlines():
        console.print(f"  {line}", soft_wrap=True)
    what = f"the {audit.log} log, with the witness's cosignature required (quorum {WITNESS_QUORUM})"
    if audit.ok:
        console.print(f"audit verify --witness: OK {what}", soft_wrap=True)
    else:
        code = "no exit" if audit.code is None else f"exit {audit.code}"
        console.print(f"audit verify --witness: FAILED ({code}) {what}", soft_wrap=True)


def render_receipt_check(console: Console, check: ReceiptAudit, step: int) -> None:
    """The receipt check's command and result (its output up to the log's latest
    signed checkpoint, printed above already; all of it when the check failed)."""
    console.print(f"$ axid {' '.join(check.args)}", soft_wrap=True)
    output = check.output
    if check.ok:
        output = output.split("the log's latest signed checkpoint:", 1)[0]
    for line in output.rstrip("\n").splitlines():
        console.print(f"  {line}", soft_wrap=True)
    what = f"the receipt of step {step} (seq {check.seq}) against the {check.log} log"
    if check.ok:
        console.print(f"audit receipt check: OK {what}", soft_wrap=True)
    else:
        code = "no exit" if check.code is None else f"exit {check.code}"
        console.print(f"audit receipt check: FAILED ({code}) {what}", soft_wrap=True)


# --------------------------------------------------------------------------- running it


@contextlib.contextmanager
def _stop_signals(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
) -> Iterator[None]:
    installed: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                continue
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _until(stop: asyncio.Event, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` unless ``stop`` is set first: (finished, result)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return True, task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return False, None


async def _main(
    layout: DemoLayout, trust_domain: str, keep_running: bool, console: Console, kept: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        stop.set()

    began = time.monotonic()
    with _stop_signals(loop, on_signal):
        provisioned = await asyncio.to_thread(provision, layout, trust_domain)
        async with DemoStack(provisioned) as stack:
            finished, steps = await _until(stop, play_story(stack))
            if not finished:
                console.print("demo: interrupted", style="yellow")
                return 128 + signals[0]
            render_steps(console, steps)
            # Async witnessing: wait (bounded) for the latest checkpoints' cosignatures.
            finished, wait = await _until(
                stop,
                wait_for_cosignatures(
                    layout.db_url, list(provisioned.vkeys), provisioned.witness_vkey
                ),
            )
            if not finished:
                console.print("demo: interrupted", style="yellow")
                return 128 + signals[0]
            render_cosign_wait(console, wait)
            finished, audits = await _until(
                stop,
                asyncio.to_thread(
                    verify_logs, layout.db_url, provisioned.vkeys, provisioned.witness_vkey
                ),
            )
            if not finished:
                console.print("demo: interrupted", style="yellow")
                return 128 + signals[0]
            render_audit(console, audits, layout.db_url)
            # The auditor's verify with the witness required, and the allowed refund's
            # receipt, kept and checked as its caller would: two child processes.
            kept_receipt = steps[RECEIPT_STEP - 1].receipt if len(steps) >= RECEIPT_STEP else None
            checks: list[Awaitable[Any]] = [verify_witnessed(layout, PAYMENTS_SERVICE)]
            if kept_receipt is not None:
                checks.append(check_kept_receipt(layout, PAYMENTS_SERVICE, kept_receipt))
            finished, done = await _until(stop, asyncio.gather(*checks))
            if not finished or stop.is_set():  # the signal reached the children too
                console.print("demo: interrupted", style="yellow")
                return 128 + signals[0]
            witnessed: WitnessedAudit = done[0]
            receipt_check: ReceiptAudit | None = done[1] if kept_receipt is not None else None
            render_witnessed_audit(console, witnessed)
            if receipt_check is not None:
                render_receipt_check(console, receipt_check, RECEIPT_STEP)
            elapsed = time.monotonic() - began
            failed = [s for s in steps if not s.ok]
            if failed:
                s = failed[0]
                console.print(
                    f"demo: FAILED at step {s.number} ({s.actor}: {s.action}): {s.problem}",
                    style="bold red",
                    soft_wrap=True,
                )
                return 1
            if len(steps) != STORY_STEPS:
                console.print(f"demo: FAILED: {len(steps)} steps played, not {STORY_STEPS}")
                return 1
            if any(a.problem is not None for a in audits):
                console.print("demo: FAILED: a decision log does not verify", style="bold red")
                return 1
            if not wait.ok or not witnessed.ok or not all(a.ok for a in audits):
                console.print(
                    "demo: FAILED: the logs' latest checkpoints are not witnessed",
                    style="bold red",
                )
                return 1
            if receipt_check is None or not receipt_check.ok:
                console.print(
                    f"demo: FAILED: the receipt of step {RECEIPT_STEP} does not check",
                    style="bold red",
                )
                return 1
            console.print(
                f"demo: all {len(steps)} steps did what they should, both logs verify and "
                f"are witnessed, the refund's receipt checks ({elapsed:.1f} s)",
                style="bold green",
                soft_wrap=True,
            )
            if kept:
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
            if not keep_running:
                return 0
            _print_endpoints(console, stack)
            await stop.wait()
            return 0


def _print_endpoints(console: Console, stack: DemoStack) -> None:
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
    # Plain lines, flushed: scripts read these until "ready".
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


def _console() -> Console:
    # Piped output (tests, CI logs) gets a wide table instead of folded reason codes.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, markup=False, width=200)
    return console


def run_demo(
    directory: Path | None = None,
    *,
    keep_running: bool = False,
    trust_domain: str = "example.org",
    console: Console | None = None,
) -> int:
    """``axid demo``: set up, play, verify, print; the exit code (0: every step did
    what it should, both logs verify and the refund's receipt checks; 1: something
    did not; 128+N: stopped by signal N before the end). Raises
    :class:`DemoUsageError` for bad arguments.

    Without ``directory`` everything lives in a temporary directory removed at the
    end; with it, the PKI, keys and database are kept there.
    """
    try:
        TrustDomain.parse(trust_domain)
    except SpiffeIdError as exc:
        raise DemoUsageError(f"invalid trust domain {trust_domain!r}: {exc}") from None
    out = console or _console()
    temporary: str | None = None
    if directory is None:
        temporary = tempfile.mkdtemp(prefix="axid-demo-")
        layout = DemoLayout(Path(temporary))
    else:
        layout = prepare_directory(directory)
    try:
        return asyncio.run(_main(layout, trust_domain, keep_running, out, temporary is None))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
