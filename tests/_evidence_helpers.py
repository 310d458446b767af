"""Helpers for the receipt and public-read-route tests: a governed "payments" service
behind AxidVerifier over real mTLS (JWKS and revocations from the real issuer),
anonymous TLS clients, and a signed-note check written from the C2SP spec alone.

The note check is independent of ``axid.audit.note`` on purpose (C2SP signed-note,
Ed25519 key type 0x01): a test that verified the project's notes with the
project's verifier would prove only that they agree with themselves.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _issuer_helpers import ISS, World
from _tls_helpers import WAIT, ServerThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from fastapi import FastAPI, Request

from axid.audit.store import LogStore, make_engine
from mtls.devpki import DevCA
from mtls.sources import FileSource
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import VerifierConfig
from verifier.middleware import AxidVerifier

SIG_PREFIX = "\u2014 "  # em dash, space


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class SignedCheckpoint:
    origin: str
    size: int
    root: bytes


def vkey_of(origin: str, private_key_pem: Path) -> str:
    """The C2SP vkey ``<name>+<hex key id>+<base64(0x01 || public key)>`` of a log key."""
    key = serialization.load_pem_private_key(private_key_pem.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    typed = b"\x01" + raw  # key type 0x01: Ed25519
    key_id = hashlib.sha256(origin.encode() + b"\n" + typed).digest()[:4]
    return f"{origin}+{key_id.hex()}+{base64.b64encode(typed).decode()}"


def open_checkpoint(note: bytes, vkey: str) -> SignedCheckpoint:
    """Check a checkpoint note's signature by ``vkey`` (C2SP signed-note) and parse it."""
    name, hex_id, b64 = vkey.split("+", 2)  # names hold no "+"; base64 may
    blob = base64.b64decode(b64, validate=True)
    assert blob[0] == 0x01 and len(blob) == 33, "an Ed25519 vkey"
    public = Ed25519PublicKey.from_public_bytes(blob[1:])
    text = note.decode("utf-8")
    cut = text.index("\n\n") + 1
    body, sigs = text[:cut], text[cut + 1 :]
    assert sigs.endswith("\n")
    good = 0
    for line in sigs[:-1].split("\n"):
        assert line.startswith(SIG_PREFIX), line
        signer, sig_b64 = line[len(SIG_PREFIX) :].split(" ")
        sig = base64.b64decode(sig_b64, validate=True)
        if signer == name and sig[:4].hex() == hex_id:
            public.verify(sig[4:], body.encode())  # raises InvalidSignature
            good += 1
    assert good == 1, f"no signature by {name} on the note"
    origin, size, root = body.split("\n")[:3]
    return SignedCheckpoint(origin, int(size), base64.b64decode(root, validate=True))


# --------------------------------------------------------------------------- TLS


def with_local_names(w: World, name: str, out: Path) -> tuple[Path, Path]:
    """Workload ``name``'s SVID re-signed by the dev CA with ``DNS:localhost`` and
    ``IP:127.0.0.1`` SANs besides its SPIFFE ID (the X509-SVID spec allows other SAN
    types), so that ordinary HTTPS clients (curl) verify it at 127.0.0.1."""
    cert_path, key_path = w.cert(name)
    leaf, *rest = x509.load_pem_x509_certificates(cert_path.read_bytes())
    ca: DevCA = w.pki.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names: list[x509.GeneralName] = list(san)
    for extra in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        if extra not in names:
            names.append(extra)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for ext in leaf.extensions:
        value = x509.SubjectAlternativeName(names) if ext.oid == san.oid else ext.value
        builder = builder.add_extension(value, ext.critical)
    new = builder.sign(ca.key, hashes.SHA256())
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in (new, *rest)]
    out.write_bytes(b"".join(pems))
    return out, key_path


def anonymous_client(w: World, base_url: str) -> httpx.Client:
    """TLS without a client certificate; the server is verified against the dev bundle
    (its SPIFFE ID is not checked: this is an ordinary HTTPS client)."""
    ctx = ssl.create_default_context(cafile=str(w.pki.bundle))
    ctx.check_hostname = False
    return httpx.Client(base_url=base_url, verify=ctx, timeout=WAIT, trust_env=False)


# --------------------------------------------------------------------------- service


@dataclass
class Service:
    """The governed "payments" service: AxidVerifier over uvicorn, mTLS required."""

    w: World
    server: ServerThread
    verifier: AxidVerifier
    log_url: str
    log_name: str
    key_path: Path
    seen: list[tuple[str, int | None]]  # (path, request.state.axid.log_seq) the app saw
    _clients: dict[str, httpx.Client] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def origin(self) -> str:
        return f"axid/{self.log_name}"

    def vkey(self) -> str:
        return vkey_of(self.origin, self.key_path)

    def client(self, name: str) -> httpx.Client:
        """An mTLS client presenting workload ``name``'s SVID, checking payments' ID."""
        c = self._clients.get(name)
        if c is None:
            ctx = client_context(self.w.source(name), server_id=self.w.pki.spiffe_id("payments"))
            c = httpx.Client(base_url=self.url, verify=ctx, timeout=WAIT, trust_env=False)
            self._clients[name] = c
        return c

    def log_size(self) -> int:
        engine = make_engine(self.log_url)
        try:
            return LogStore(engine, self.log_name).size()
        finally:
            engine.dispose()

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self.server.stop()


def _payments_app(seen: list[tuple[str, int | None]]) -> FastAPI:
    app = FastAPI()

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        seq = request.state.axid.log_seq
        seen.append((request.url.path, seq))
        return {"pid": pid, "seq": seq}

    @app.get("/.well-known/axid/log/checkpoint")
    async def shadow() -> dict[str, str]:  # never reached: the middleware answers
        seen.append(("shadow", None))
        return {"app": "reached"}

    return app


def _verifier_doc(w: World, issuer_url: str, tmp: Path, log_name: str) -> dict[str, Any]:
    return {
        "service": "payments",
        "issuer": ISS,
        "tenants": [w.tenant],
        "identity": {
            "bundle": str(w.pki.bundle),
            "cert": str(w.cert("payments")[0]),
            "key": str(w.cert("payments")[1]),
        },
        "issuer_id": str(w.pki.spiffe_id("issuer")),
        "jwks": {"url": f"{issuer_url}/.well-known/jwks.json", "refetch_min_interval": 0},
        "revocations": {"url": f"{issuer_url}/v1/revocations", "interval": 0.2},
        "log": {
            "url": f"sqlite:///{tmp}/payments.db",
            "name": log_name,
            "key": str(tmp / "payments-log.pem"),
            "max_delay": 0,
            "lock_timeout": 0.5,
        },
        "rules": [{"methods": ["GET"], "path": "/payments/*", "scope": "payments:read"}],
    }


@contextmanager
def payments_service(w: World, issuer_url: str) -> Iterator[Service]:
    """Serve the governed payments service for the block (its own SQLite log)."""
    tmp = w.tmp / f"payments-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    log_name = f"payments-{uuid.uuid4().hex[:8]}"
    doc = _verifier_doc(w, issuer_url, tmp, log_name)
    (tmp / "verifier.yaml").write_text(json.dumps(doc))  # JSON is YAML
    config = VerifierConfig.from_file(tmp / "verifier.yaml")
    seen: list[tuple[str, int | None]] = []
    verifier = AxidVerifier(_payments_app(seen), config)
    source = FileSource(*w.cert("payments"), w.pki.bundle)
    uv = uvicorn_config(verifier, source=source, log_level="warning", lifespan="on")
    service = Service(
        w,
        ServerThread(uv).start(),
        verifier,
        doc["log"]["url"],
        log_name,
        tmp / "payments-log.pem",
        seen,
    )
    try:
        yield service
    finally:
        service.close()
        source.close()
