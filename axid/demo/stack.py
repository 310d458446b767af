"""The demo's servers: the witness, the issuer and "payments", on 127.0.0.1, each on
its own port, all in the running event loop, served as they are in production:

* the witness as ``axid witness serve`` serves ``witness/witness.yaml``
  (:mod:`axid.witness.server`): the config read, keys loaded, state opened, its
  listening socket and the app's uvicorn options from the same builders
  (:func:`~axid.witness.server.witness_socket`, ``TCP_NODELAY`` on it, and
  :func:`~axid.witness.server.witness_uvicorn_config`); plain HTTP;
* the issuer as ``axid serve`` serves it: the app from :func:`axid.issuer.app.create_app`
  under :func:`axid.issuer.server.issuer_uvicorn_config` (mTLS, client certificate
  optional);
* payments as a uvicorn deployment of it serves it: :func:`mtls.uvicorn.uvicorn_config`
  (mTLS, client certificate required), behind :class:`verifier.middleware.AxidVerifier`.

The issuer's and payments' sockets are bound before their servers start (the issuer's
URL is its tokens' ``iss``), as ``loop.create_server`` binds them for ``axid serve``:
``IPPROTO_TCP``, so asyncio sets ``TCP_NODELAY`` on every accepted connection. Both
logs are witnessed by the witness (``log.witnesses``, quorum 1, ``witness_mode:
async``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from axid import _yaml
from axid.audit.witnessing import WitnessConfig as LogWitness
from axid.demo.payments import PAYMENTS_SERVICE, create_payments_app, payments_verifier_config
from axid.demo.provisioning import (
    DEMO_HOST,
    ISSUER_LOG,
    WITNESS_QUORUM,
    DemoError,
    DemoLayout,
    Provisioned,
)
from axid.issuer.app import create_app
from axid.issuer.approval_settings import ApprovalSettings
from axid.issuer.config import IssuerConfig
from axid.issuer.server import issuer_uvicorn_config
from axid.witness import (
    WitnessApp,
    WitnessConfig,
    WitnessConfigError,
    WitnessKeyError,
    WitnessStore,
    WitnessStoreError,
    load_signers,
    parse_config,
    witness_socket,
    witness_uvicorn_config,
)
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeIdPattern
from mtls.uvicorn import uvicorn_config
from verifier.revocation import DatabaseRevocationSource

__all__ = [
    "DEMO_LEEWAY",
    "REVOCATION_INTERVAL",
    "DemoStack",
    "witness_uvicorn_config",
]

# The verifier's clock-skew allowance in the demo (all on one host: small).
DEMO_LEEWAY: Final = 1
# Revocations reach the verifier within this (the story also asks it to look at once).
REVOCATION_INTERVAL: Final = 0.5
_START_TIMEOUT: Final = 15.0
# What the demo adds to each mTLS server's uvicorn options: quiet, the app's lifespan
# required (a start-up failure stops the demo), a short graceful stop.
_DEMO_UVICORN: Final[dict[str, Any]] = {
    "log_level": "warning",
    "lifespan": "on",
    "timeout_graceful_shutdown": 3,
}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the demo stops its servers itself
    (two servers in one loop must not both capture, then re-raise, SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(name: str, host: str = DEMO_HOST, port: int = 0) -> socket.socket:
    """The socket ``loop.create_server(host=..., port=...)`` binds when uvicorn serves
    ``axid serve``: ``IPPROTO_TCP`` (asyncio then sets ``TCP_NODELAY`` on every accepted
    connection; with protocol 0 it does not, and an answer written in two parts waits
    ~40 ms for the client's delayed ACK) and ``SO_REUSEADDR``; bound before the server
    starts, so the issuer knows its URL (the tokens' ``iss``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DemoError(f"the {name} cannot listen: {exc.strerror or exc}") from None
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


async def _launch(name: str, config: uvicorn.Config, sock: socket.socket, url: str) -> _Running:
    """Serve ``config`` on ``sock`` in a task; return once it accepts connections."""
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


def _issuer_config(p: Provisioned, port: int, witnesses: tuple[LogWitness, ...]) -> IssuerConfig:
    """The issuer's settings, as ``axid serve --config`` would read them from a file."""
    layout = p.layout
    return IssuerConfig(
        registrations=layout.registrations,
        issuer=f"https://{DEMO_HOST}:{port}",
        host=DEMO_HOST,
        port=port,
        cert=p.cert("issuer"),
        key=p.key("issuer"),
        bundle=p.pki.bundle,
        keys_dir=layout.keys / "issuer-tokens",
        database_url=layout.db_url,
        admins=(SpiffeIdPattern.parse(str(p.spiffe_id("admin"))),),
        approvals=_approval_settings(p),
        log_name=ISSUER_LOG,
        log_key=layout.log_key(ISSUER_LOG),
        log_witnesses=witnesses,
        log_quorum=WITNESS_QUORUM,
        log_witness_mode="async",
    )


def _approval_settings(p: Provisioned) -> ApprovalSettings:
    """The issuer's ``approvals``: payments may file requests for itself (service
    ``payments``), the admin approves (``approvals.timeout``: the default 15 min)."""
    return ApprovalSettings(
        approvers=(SpiffeIdPattern.parse(str(p.spiffe_id("admin"))),),
        services={PAYMENTS_SERVICE: (SpiffeIdPattern.parse(str(p.spiffe_id("payments"))),)},
    )


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

    def servers(self) -> dict[str, uvicorn.Server]:
        """The running servers by name (``witness``, ``issuer``, ``payments``)."""
        running = (self._witness, self._issuer, self._payments)
        return {r.name: r.server for r in running if r is not None}

    async def _start_witness(self) -> None:
        parts = await asyncio.to_thread(_open_witness, self.layout.witness_config)
        self._witness_parts = parts
        cfg = parts.config
        if cfg.tls is not None:  # the demo's witness.yaml has none
            raise DemoError("the demo's witness serves plain HTTP: remove tls from witness.yaml")
        try:
            sock = witness_socket(cfg)
        except OSError as exc:
            raise DemoError(f"the witness cannot listen: {exc.strerror or exc}") from None
        port = sock.getsockname()[1]
        config = witness_uvicorn_config(parts.app, cfg, log_level="warning")
        self._witness = await _launch("witness", config, sock, f"http://{cfg.host}:{port}")

    async def _start_issuer(self) -> None:
        sock = _listening_socket("issuer")
        try:
            port = sock.getsockname()[1]
            settings = _issuer_config(self.provisioned, port, self.log_witnesses)
            app = await asyncio.to_thread(create_app, settings)
            config = issuer_uvicorn_config(
                app,
                source=app.state.components.source,
                host=DEMO_HOST,
                port=port,
                http=cast(Literal["h11", "httptools"], settings.http),
                **_DEMO_UVICORN,
            )
        except Exception as exc:  # config, registry, SVID files, keyring, database
            sock.close()
            raise DemoError(f"the issuer cannot start: {type(exc).__name__}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        self.iss = f"https://{DEMO_HOST}:{port}"
        self._issuer = await _launch("issuer", config, sock, self.iss)

    def _payments_app(self) -> Any:
        p = self.provisioned
        layout = p.layout
        verifier_config = payments_verifier_config(
            iss=self.iss,
            issuer_url=self.issuer_url,
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
        return create_payments_app(verifier_config)

    async def _start_payments(self) -> None:
        p = self.provisioned
        sock = _listening_socket("payments")
        try:
            app = self._payments_app()
            self._payments_source = FileSource(p.cert("payments"), p.key("payments"), p.pki.bundle)
            port = sock.getsockname()[1]
            config = uvicorn_config(
                app, host=DEMO_HOST, port=port, source=self._payments_source, **_DEMO_UVICORN
            )
        except BaseException:
            sock.close()
            raise
        self._payments = await _launch("payments", config, sock, f"https://{DEMO_HOST}:{port}")

    async def start(self) -> None:
        await self._start_witness()
        await self._start_issuer()
        await self._start_payments()

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
