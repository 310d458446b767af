"""The verifier behind a plain-TCP sidecar, under a real uvicorn with mtls.uvicorn's
protocol classes: trust in a sidecar's X-Forwarded-Client-Cert comes from the socket
peer only, never from X-Forwarded-For / X-Forwarded-Proto (which uvicorn's proxy
headers turn into scope["client"] / scope["scheme"]); and paths not in normal form
never reach an ungoverned rule. Requests are sent with http.client, which sends the
request target verbatim (httpx would remove dot segments)."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from _tls_helpers import WAIT, ServerThread
from _verifier_helpers import (
    ISSUER,
    Pki,
    key_set,
    log_entries,
    make_pki,
    new_signing_key,
    token_for,
)
from cryptography.hazmat.primitives.serialization import Encoding

from axid.keys import SigningKey
from mtls.uvicorn import TRANSPORT_EXTENSION, H11TLSProtocol, HttpToolsTLSProtocol
from verifier.config import IdentityConfig, LogConfig, VerifierConfig
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

pytestmark = pytest.mark.timeout(60)

RULES = [
    RouteRule("/public/**", governed=False),
    RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
]
PROTOCOLS = {"h11": H11TLSProtocol, "httptools": HttpToolsTLSProtocol}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("transport"))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_signing_key()


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with what the verifier let through (and the scope's transport facts)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    action = scope.get("state", {}).get("axid")
    body = json.dumps(
        {
            "agent": action.agent if action is not None else None,
            "client": scope.get("client"),
            "scheme": scope.get("scheme"),
            "transport": scope.get("extensions", {}).get(TRANSPORT_EXTENSION),
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


class Served:
    def __init__(self, server: ServerThread, config: VerifierConfig, url: str) -> None:
        self.server, self.config, self.url = server, config, url

    def get(self, target: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=WAIT)
        try:
            conn.request("GET", target, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def entries(self) -> list[dict[str, Any]]:
        return log_entries(self.url, self.config.log_name)


@contextmanager
def serve(
    pki: Pki, key: SigningKey, tmp: Path, *, http: str, proxy_headers: bool, trusted: str
) -> Iterator[Served]:
    """The verifier under uvicorn on plain TCP with our protocol class, uvicorn's proxy
    headers as given and believed from anyone."""
    url = f"sqlite:///{tmp}/axid.db"
    config = VerifierConfig(
        service="payments",
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(bundle=pki.dev.bundle),
        jwks=key_set(key),
        revocations=StaticRevocations(),
        log=LogConfig(url=url, key=tmp / "log.pem", max_delay=0),
        rules=RULES,
        trusted_proxies=[trusted],
    )
    uv = uvicorn.Config(
        AxidVerifier(_app, config),
        host="127.0.0.1",
        port=0,
        http=PROTOCOLS[http],  # plain TCP: a sidecar terminates mTLS in front
        proxy_headers=proxy_headers,
        forwarded_allow_ips="*",
        lifespan="on",
        log_level="warning",
    )
    server = ServerThread(uv).start()
    try:
        yield Served(server, config, url)
    finally:
        server.stop()


MATRIX = pytest.mark.parametrize(
    ("http", "proxy_headers"),
    [(h, p) for h in PROTOCOLS for p in (True, False)],
    ids=lambda v: v if isinstance(v, str) else f"proxy_headers={v}",
)


def _xfcc(pki: Pki, name: str) -> str:
    leaf = pki.leaf(name)
    der = leaf.public_bytes(Encoding.DER)
    cert = urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe="")
    return f"Hash={hashlib.sha256(der).hexdigest()};Cert={cert};URI={pki.spiffe_id(name)}"


def _sidecar_headers(pki: Pki, key: SigningKey, forwarded_for: str, proto: str) -> dict[str, str]:
    """What a request carrying the planner's identity through a sidecar looks like."""
    return {
        "X-Forwarded-For": forwarded_for,
        "X-Forwarded-Proto": proto,
        "X-Forwarded-Client-Cert": _xfcc(pki, "planner"),
        "X-Waxell-AXID": token_for(pki, "planner", key, now=time.time()),
    }


@MATRIX
def test_forwarded_for_cannot_make_a_peer_a_trusted_proxy(
    pki: Pki, key: SigningKey, tmp_path: Path, http: str, proxy_headers: bool
) -> None:
    """A local process claims to be 10.0.0.7 and presents the planner's public certificate
    and its stolen token: the socket peer (127.0.0.1) is what is checked."""
    with serve(
        pki, key, tmp_path, http=http, proxy_headers=proxy_headers, trusted="10.0.0.0/8"
    ) as served:
        headers = _sidecar_headers(pki, key, "10.0.0.7", "http")
        status, body = served.get("/payments/p-1", headers)
        assert status == 401 and body["reason"] == "no_peer_cert"
        entry = served.entries()[-1]
        assert entry["decision"] == "deny" and entry["peer"] is None
        assert "x-forwarded-client-cert ignored" in entry["note"]


@MATRIX
def test_forwarded_for_does_not_hide_a_trusted_sidecar(
    pki: Pki, key: SigningKey, tmp_path: Path, http: str, proxy_headers: bool
) -> None:
    """Envoy on loopback adds X-Forwarded-For (the original client) and -Proto: the
    sidecar is still recognised by its socket address."""
    with serve(
        pki, key, tmp_path, http=http, proxy_headers=proxy_headers, trusted="127.0.0.1/32"
    ) as served:
        headers = _sidecar_headers(pki, key, "10.9.9.9", "https")
        status, body = served.get("/payments/p-1", headers)
        assert status == 200 and body["agent"] == "planner"
        # The app's own view may be rewritten by uvicorn; the extension is the socket's.
        if proxy_headers:
            assert body["client"][0] == "10.9.9.9" and body["scheme"] == "https"
        port = body["transport"]["peer"][1]
        assert body["transport"] == {"peer": ["127.0.0.1", port], "tls": False}
        entry = served.entries()[-1]
        assert entry["decision"] == "allow" and entry["peer"] == pki.spiffe_id("planner")
        assert "via trusted proxy ip 127.0.0.1" in entry["note"]


@pytest.mark.parametrize("http", list(PROTOCOLS))
def test_abnormal_paths_never_match_an_ungoverned_rule(
    pki: Pki, key: SigningKey, tmp_path: Path, http: str
) -> None:
    targets = [
        "/public/../payments/p-1",
        "/public/./../payments/p-1",
        "/public/%2e%2e/payments/p-1",
        "/public/..%2Fpayments/p-1",
        "/public//payments",
    ]
    with serve(pki, key, tmp_path, http=http, proxy_headers=True, trusted="127.0.0.1/32") as served:
        for target in targets:
            status, body = served.get(target)
            assert status == 401 and body["reason"] == "no_peer_cert", target
            entry = served.entries()[-1]
            assert entry["decision"] == "deny" and entry["rule"] is None
            assert "path" in entry["note"]
        assert len(served.entries()) == len(targets)
        # The normal form still reaches the ungoverned route, unrecorded.
        assert served.get("/public/x")[0] == 200
        assert served.get("/public/")[0] == 200
        assert len(served.entries()) == len(targets)
