"""Helpers for the verifier tests: dev PKI material, tokens minted directly with
axid.tokens, ASGI scopes shaped like mtls.uvicorn's, and reading decision logs."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _pg import PG_URL, require_pg  # noqa: F401  (re-exported to tests)
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from axid.audit.store import LogStore, make_engine
from axid.keys import KeySet, SigningKey
from axid.tokens import mint
from mtls.devpki import DevPki, IssuedSvid, init_dev_pki
from mtls.x509svid import x5t_s256

ISSUER = "https://issuer.example.org"


class FakeClock:
    """A settable Unix clock shared by the issuer and the verifier in a test."""

    def __init__(self, start: float) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Pki:
    """The dev PKI plus the extra SVIDs the verifier tests need."""

    dev: DevPki
    other: DevPki  # another trust domain
    extra: dict[str, IssuedSvid]

    def cert(self, name: str) -> Path:
        return self.dev.cert(name) if name in _DEV else self.dev.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dev.key(name) if name in _DEV else self.dev.directory / f"{name}.key"

    def chain_pem(self, name: str) -> list[str]:
        """The chain as mtls.uvicorn puts it in the TLS extension (PEM strs)."""
        certs = x509.load_pem_x509_certificates(self.cert(name).read_bytes())
        return [ssl.DER_cert_to_PEM_cert(c.public_bytes(_DER)) for c in certs]

    def leaf(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert(name).read_bytes())

    def spiffe_id(self, name: str) -> str:
        ext = self.leaf(name).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return ext.value.get_values_for_type(x509.UniformResourceIdentifier)[0]

    def cnf(self, name: str) -> str:
        return x5t_s256(self.leaf(name))


_DEV = ("issuer", "payments", "planner", "worker")
_DER = Encoding.DER

# Extra workloads beyond the dev PKI's four: name -> SPIFFE ID path.
EXTRA = {
    "admin": "/admin/ops",
    "envoy": "/proxy/envoy",
    "globex": "/agent/globex",
    "planner2": "/agent/planner",  # a second SVID for the planner's SPIFFE ID
}


def make_pki(directory: Path) -> Pki:
    dev = init_dev_pki(directory / "pki")
    other = init_dev_pki(directory / "other", "other.org")
    extra: dict[str, IssuedSvid] = {}
    for name, path in EXTRA.items():
        svid = dev.ca.issue_svid(f"spiffe://{dev.trust_domain.name}{path}")
        svid.write(dev.directory / name)
        extra[name] = svid
    return Pki(dev, other, extra)


def new_signing_key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


def token_for(
    pki: Pki,
    name: str,
    key: SigningKey,
    *,
    now: float,
    aud: str | Sequence[str] = "payments",
    tenant: str = "acme",
    agent: str | None = None,
    run: str | None = None,
    chain: Sequence[str] = (),
    scope: str = "payments:read",
    ttl: int = 120,
    iss: str = ISSUER,
    sub_of: str | None = None,
) -> str:
    """A token minted directly (no issuer) for workload ``name``'s SVID."""
    return mint(
        key=key,
        iss=iss,
        sub=pki.spiffe_id(sub_of or name),
        aud=aud if isinstance(aud, str) else list(aud),
        tenant=tenant,
        agent=agent or name,
        run=run or f"run-{uuid.uuid4().hex[:12]}",
        spawn_parent=chain[-1] if chain else None,
        chain=list(chain),
        scope=scope,
        cnf_x5t_s256=pki.cnf(sub_of or name),
        now=int(now),
        ttl=ttl,
    )


def key_set(*keys: SigningKey) -> KeySet:
    return KeySet.of(*(k.public_key for k in keys))


def http_scope(
    path: str,
    *,
    method: str = "GET",
    chain: list[str] | None = None,
    tls: bool = True,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    client: tuple[str, int] = ("127.0.0.1", 40000),
    transport: bool = True,
) -> dict[str, Any]:
    """An ASGI http scope as uvicorn + mtls.uvicorn build it: with ``transport`` the
    ``axid.transport`` extension names ``client`` as the socket peer (as mtls.uvicorn's
    protocol classes do); without it the scope is another server's."""
    raw = [(b"host", b"testserver")]
    if token is not None:
        raw.append((b"x-waxell-axid", token.encode("latin-1")))
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https" if tls else "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": client,
        "server": ("127.0.0.1", 8443),
        "state": {},
    }
    scope["extensions"] = {}
    if transport:
        scope["extensions"]["axid.transport"] = {"peer": client, "tls": tls}
    if tls:
        scope["extensions"] |= {
            "tls": {
                "server_cert": None,
                "client_cert_chain": list(chain or []),
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": 0x0304,
                "cipher_suite": 0x1302,
            }
        }
    return scope


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str | None:
        if self.status == 200:
            return "ok"
        return self.json.get("reason")


async def call(app: Any, scope: dict[str, Any]) -> Answer:
    """Run one HTTP request through an ASGI app in-process."""
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Answer(start["status"], headers, body)


def log_entries(url: str, log: str) -> list[dict[str, Any]]:
    """Every entry of a decision log, parsed, in order."""
    engine = make_engine(url)
    try:
        store = LogStore(engine, log)
        return [json.loads(data) for _, data, _ in store.entries()]
    finally:
        engine.dispose()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
