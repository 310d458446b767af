"""A live issuer for tests: dev PKI, registrations, a real uvicorn server over mTLS.

Every world gets unique tenant and agent slugs and a unique decision-log name, so
worlds on the shared PostgreSQL never see each other's runs, revocations or
entries (revoking tenant ``acme`` there would otherwise leak into other tests).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _pg import PG_URL, require_pg
from _tls_helpers import ServerThread

from axid.audit.entry import parse_entry
from axid.audit.store import LogStore, make_engine
from axid.issuer.app import create_app
from axid.issuer.config import IssuerConfig
from axid.issuer.server import issuer_uvicorn_config
from axid.keys import KeySet
from axid.tokens import ActionClaims, verify
from mtls.devpki import DevPki, init_dev_pki
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeIdPattern
from mtls.tlsconfig import client_context

ISS = "https://issuer.axid.test"
EXTRA_WORKLOADS = {
    "admin": "/admin/ops",
    "bot": "/agent/globex-bot",
    "stranger": "/agent/stranger",
}
PLANNER_SCOPE = "payments:read payments:refund payments:delete"
WORKER_SCOPE = "payments:read payments:refund"


def uid() -> str:
    return uuid.uuid4().hex[:10]


def pg_url() -> str | None:
    return PG_URL


def db_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/state/axid.db"
    return require_pg()


class FakeClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class World:
    tmp: Path
    pki: DevPki
    db_url: str
    audit_url: str
    log_name: str
    tenant: str
    other_tenant: str
    planner: str  # agent slugs
    worker: str
    bot: str
    keys_dir: Path
    clock: FakeClock
    server: ServerThread | None = None
    app: Any = None
    _clients: dict[str, httpx.Client] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.port}"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.pki.directory / f"{name}.pem", self.pki.directory / f"{name}.key"

    def spiffe_id(self, name: str) -> str:
        path = EXTRA_WORKLOADS.get(name)
        if path is not None:
            return f"spiffe://{self.pki.trust_domain.name}{path}"
        return str(self.pki.spiffe_id(name))

    def source(self, name: str) -> FileSource:
        cert, key = self.cert(name)
        return FileSource(cert, key, self.pki.bundle)

    def client(self, name: str) -> httpx.Client:
        """An mTLS client presenting workload ``name``'s SVID (one per name)."""
        c = self._clients.get(name)
        if c is None:
            ctx = client_context(self.source(name), server_id=self.pki.spiffe_id("issuer"))
            c = httpx.Client(base_url=self.url, verify=ctx, timeout=10, trust_env=False)
            self._clients[name] = c
        return c

    def run(self) -> str:
        return f"run-{uid()}"

    def mint(self, name: str, **body: Any) -> httpx.Response:
        return self.client(name).post("/v1/tokens", json=body)

    def root_body(self, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "agent": self.planner,
            "run": self.run(),
            "audience": "payments",
            "scope": "payments:read payments:refund",
        }
        body.update(changes)
        return body

    def key_set(self) -> KeySet:
        return KeySet.from_jwks(self.client("payments").get("/.well-known/jwks.json").json())

    def verify(self, token: str, audience: str = "payments") -> ActionClaims:
        return verify(token, self.key_set(), issuer=ISS, audience=audience, now=self.clock())

    def entries(self) -> list[dict[str, Any]]:
        engine = make_engine(self.audit_url)
        try:
            store = LogStore(engine, self.log_name)
            return [parse_entry(data) for data in store.query()]
        finally:
            engine.dispose()

    def close_clients(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


def registrations_yaml(w: World) -> str:
    td = w.pki.trust_domain.name
    doc = {
        "registrations": [
            {
                "spiffe_id": f"spiffe://{td}/agent/planner",
                "tenant": w.tenant,
                "agents": [w.planner],
                "audiences": ["payments", "ledger"],
                "scope": PLANNER_SCOPE + " ledger:read",
            },
            {
                "spiffe_id": f"spiffe://{td}/agent/worker",
                "tenant": w.tenant,
                "agents": [w.worker],
                "audiences": ["payments", "ledger"],
                "scope": WORKER_SCOPE + " ledger:read",
                # Explicit delegation: the planner's runs, and the worker's own (chains).
                "spawn_from": [f"spiffe://{td}/agent/planner", f"spiffe://{td}/agent/worker"],
            },
            {
                "spiffe_id": f"spiffe://{td}/agent/globex-bot",
                "tenant": w.other_tenant,
                "agents": [w.bot],
                "audiences": ["payments"],
                "scope": "payments:read",
            },
        ]
    }
    return json.dumps(doc)  # JSON is YAML


def make_world(tmp_path: Path, kind: str, *, audit_url: str | None = None) -> World:
    pki = init_dev_pki(tmp_path / "certs")
    for name, path in EXTRA_WORKLOADS.items():
        pki.ca.issue_svid(f"spiffe://{pki.trust_domain.name}{path}").write(pki.directory / name)
    suffix = uid()
    url = db_url(kind, tmp_path)
    return World(
        tmp=tmp_path,
        pki=pki,
        db_url=url,
        audit_url=audit_url or url,
        log_name=f"issuer-{suffix}",
        tenant=f"acme-{suffix}",
        other_tenant=f"globex-{suffix}",
        planner=f"planner-{suffix}",
        worker=f"worker-{suffix}",
        bot=f"bot-{suffix}",
        keys_dir=tmp_path / "keys",
        clock=FakeClock(),
    )


def world_config(w: World, **changes: Any) -> IssuerConfig:
    reg = w.tmp / "registrations.yaml"
    if not reg.exists():
        reg.write_text(registrations_yaml(w))
    cert, key = w.cert("issuer")
    kwargs: dict[str, Any] = {
        "registrations": reg,
        "issuer": ISS,
        "port": 0,
        "cert": cert,
        "key": key,
        "bundle": w.pki.bundle,
        "keys_dir": w.keys_dir,
        "database_url": w.db_url,
        "audit_database_url": w.audit_url,
        "admins": (SpiffeIdPattern.parse(f"spiffe://{w.pki.trust_domain.name}/admin/*"),),
        "log_name": w.log_name,
        "log_key": w.tmp / "log.pem",
        "default_ttl": 120,
        "max_ttl": 300,
    }
    kwargs.update(changes)
    return IssuerConfig(**kwargs)


@contextmanager
def running(w: World, *, http: str = "h11", **config_changes: Any) -> Iterator[World]:
    """Serve the world's issuer on 127.0.0.1:0 over TLS for the block (client
    certificate optional, as `axid serve` does)."""
    config = world_config(w, **config_changes)
    app = create_app(config, clock=w.clock)
    uv = issuer_uvicorn_config(  # as `axid serve`: client certificate optional
        app,
        source=app.state.components.source,
        http=http,  # type: ignore[arg-type]
        log_level="warning",
    )
    server = ServerThread(uv).start()
    w.server, w.app = server, app
    try:
        yield w
    finally:
        w.close_clients()
        server.stop()
        w.server = None
