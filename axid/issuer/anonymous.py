"""What a connection without a client certificate may reach on the issuer.

The issuer's TLS asks for a client certificate but does not require one
(``client_cert="optional"`` in :func:`mtls.uvicorn.uvicorn_config`), so that an
auditor or a JOSE library outside the trust domain can fetch the keys and the
log's checkpoints and proofs. A request without one (an empty
``client_cert_chain`` in the ASGI TLS extension, or no TLS extension at all)
reaches only::

    GET /.well-known/jwks.json
    GET /v1/audit/*
    GET /healthz

Every other request (any other method, HEAD included, or path) is answered here,
before routing, with 401 problem+json ``no_peer_cert`` and ``WWW-Authenticate:
AXID error="no_peer_cert"``: it is not recorded in the decision log (anonymous
traffic must not cost an fsync and a signature each), only counted by the caller's
``on_refusal`` (the issuer's ``axid_issuer_anonymous_refusals_total``). A WebSocket
without a certificate is closed before it is accepted. A request WITH a
certificate goes on: OpenSSL verified its chain against the bundles in the
handshake, and the routes verify it as an X509-SVID.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from axid.issuer.problems import problem_response

__all__ = ["AnonymousGate", "has_client_cert", "is_public"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_PUBLIC_PATHS: Final = frozenset({"/.well-known/jwks.json", "/healthz"})
_PUBLIC_PREFIX: Final = "/v1/audit/"


def has_client_cert(scope: _Scope) -> bool:
    """Whether the connection presented a client certificate (mtls.uvicorn's extension)."""
    extensions = scope.get("extensions")
    tls = extensions.get("tls") if isinstance(extensions, dict) else None
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    return isinstance(chain, list) and len(chain) > 0


def is_public(method: object, path: object) -> bool:
    """Whether a request without a client certificate may reach ``method path``."""
    if method != "GET" or not isinstance(path, str):
        return False
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIX)


class AnonymousGate:
    """ASGI middleware: refuse (401, unrecorded, counted) what anonymous peers may not reach."""

    def __init__(self, app: _ASGIApp, *, on_refusal: Callable[[], None]) -> None:
        self.app = app
        self.on_refusal = on_refusal

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or has_client_cert(scope):
            await self.app(scope, receive, send)
            return
        if kind == "http" and is_public(scope.get("method"), scope.get("path")):
            await self.app(scope, receive, send)
            return
        self.on_refusal()
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "no_peer_cert"})
            return
        response = problem_response(
            401, "no_peer_cert", "a client certificate (X509-SVID) is required for this route"
        )
        await response(scope, receive, send)
