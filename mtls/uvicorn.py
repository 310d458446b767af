"""The ASGI TLS extension for uvicorn, which does not give apps the client certificate.

``uvicorn --http mtls.uvicorn:H11TLSProtocol`` (or ``HttpToolsTLSProtocol``) fills, for
every HTTP request on a TLS connection::

    scope["extensions"]["tls"] = {
        "server_cert": None,                 # not obtainable from Python's ssl
        "client_cert_chain": [PEM, ...],     # leaf first; [] without a client cert
        "client_cert_name": str | None,      # RFC 4514 subject of the leaf
        "client_cert_error": None,           # handshake verification failures never get here
        "tls_version": 0x0304,               # e.g. TLS 1.3
        "cipher_suite": 0x1302 | None,       # IANA id
    }

as the ASGI TLS extension (asgiref ``specs/tls.rst``, version 0.2) defines it; plain
HTTP connections get no ``tls`` key. It is computed once per connection, after the
handshake. On Python < 3.13 the chain comes from a private CPython method (see
:func:`mtls.tlsconfig.peer_chain_der`); failing that it holds only the leaf.

WebSocket upgrades are handed to uvicorn's WebSocket protocol classes and do not get
the extension.

:func:`uvicorn_config` builds a ``uvicorn.Config`` serving over
:func:`mtls.tlsconfig.server_context` (rotating with its source) with these classes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mtls.sources import X509Source
from mtls.tlsconfig import peer_chain_der, server_context

__all__ = ["H11TLSProtocol", "HttpToolsTLSProtocol", "tls_extension", "uvicorn_config"]

_Scope = MutableMapping[str, Any]
_ASGIApp = Callable[[_Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Any]

_TLS_VERSIONS = {
    "SSLv3": 0x0300,
    "TLSv1": 0x0301,
    "TLSv1.1": 0x0302,
    "TLSv1.2": 0x0303,
    "TLSv1.3": 0x0304,
}

# OpenSSL cipher name -> IANA id; filled from SSLContext.get_ciphers(), whose "id" is
# OpenSSL's 0x0300XXXX with the IANA value in the low 16 bits.
_CIPHER_IDS: dict[str, int] = {}


def _cipher_suite(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int | None:
    cipher = ssl_object.cipher()
    if not cipher:
        return None
    name = cipher[0]
    if name not in _CIPHER_IDS:
        try:
            for c in ssl_object.context.get_ciphers():
                cid = c.get("id")
                if isinstance(cid, int):
                    _CIPHER_IDS.setdefault(c["name"], cid & 0xFFFF)
        except (ssl.SSLError, AttributeError, KeyError):
            return None
    return _CIPHER_IDS.get(name)


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension dict for a completed TLS connection."""
    chain = peer_chain_der(ssl_object)
    name: str | None = None
    if chain:
        try:
            name = x509.load_der_x509_certificate(chain[0]).subject.rfc4514_string()
        except ValueError:
            name = None
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der) for der in chain],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(version) if version else None,
        "cipher_suite": _cipher_suite(ssl_object),
    }


class _TLSExtensionApp:
    """Wraps the app of one connection; adds ``extensions["tls"]`` to each scope."""

    __slots__ = ("app", "tls")

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app
        self.tls: dict[str, Any] | None = None

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> Any:
        if self.tls is not None and scope.get("type") in ("http", "websocket"):
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            # A copy per request: an app that mutates it cannot affect the next one.
            tls = dict(self.tls)
            tls["client_cert_chain"] = list(self.tls["client_cert_chain"])
            extensions["tls"] = tls
        return await self.app(scope, receive, send)


def _on_connection(wrapper: _TLSExtensionApp, transport: asyncio.BaseTransport) -> None:
    ssl_object = transport.get_extra_info("ssl_object")
    wrapper.tls = tls_extension(ssl_object) if ssl_object is not None else None


class H11TLSProtocol(H11Protocol):
    """uvicorn's h11 protocol, filling the ASGI TLS extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn hands self.app to every RequestResponseCycle of this connection.
        self._tls_app = _TLSExtensionApp(self.app)
        self.app = self._tls_app

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _on_connection(self._tls_app, transport)


class HttpToolsTLSProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, filling the ASGI TLS extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_app = _TLSExtensionApp(self.app)
        self.app = self._tls_app

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _on_connection(self._tls_app, transport)


def uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    source: X509Source,
    http: Literal["h11", "httptools"] = "h11",
    **kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` serving ``app`` over mTLS from ``source`` with the TLS
    extension filled. Extra keyword arguments go to ``uvicorn.Config``."""
    if http == "h11":
        protocol: type[asyncio.Protocol] = H11TLSProtocol
    elif http == "httptools":
        protocol = HttpToolsTLSProtocol
    else:
        raise ValueError(f"http must be 'h11' or 'httptools', not {http!r}")
    for key in ("ssl_context_factory", "ssl_certfile", "ssl_keyfile", "http"):
        if key in kwargs:
            raise TypeError(f"uvicorn_config sets {key} itself")

    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return server_context(source)

    return uvicorn.Config(
        app, host=host, port=port, http=protocol, ssl_context_factory=factory, **kwargs
    )
