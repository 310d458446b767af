"""The ASGI TLS extension and request-head limits for uvicorn.

uvicorn does not give apps the client certificate. ``uvicorn --http
mtls.uvicorn:H11TLSProtocol`` (or ``HttpToolsTLSProtocol``) fills, for every HTTP
request on a TLS connection::

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

Every HTTP request on every connection, TLS or plain TCP, also gets::

    scope["extensions"]["axid.transport"] = {
        "peer": ("10.0.0.7", 51234) | None,  # the socket's peer address (None: a unix socket)
        "tls": True | False,                 # the connection is TLS
    }

read from the socket itself. ``scope["client"]`` and ``scope["scheme"]`` are not
trustworthy: uvicorn's proxy-headers middleware (on by default, trusting 127.0.0.1)
rewrites them from ``X-Forwarded-For`` / ``X-Forwarded-Proto``, which any client can
send. The verifier decides whether a connection is TLS, and whether its peer is a
trusted sidecar (``trusted_proxies`` IP networks), from this extension only. A
service behind a plain-TCP sidecar (Envoy on loopback) must therefore be served with
these classes too, without TLS: ``uvicorn app:app --http mtls.uvicorn:H11TLSProtocol
--no-proxy-headers`` (``--no-proxy-headers`` keeps ``scope["client"]`` honest for the
app's own use; the verifier does not need it).

WebSocket upgrades get both extensions too: uvicorn hands an upgraded connection to a
new WebSocket protocol instance (``ws=``, any of uvicorn's) that calls the app itself,
so its app is wrapped the same way when it is made.

Request-head limits (:class:`HttpLimits`; the same in both classes, checked before
the app sees the request). uvicorn alone has none under httptools, and under h11 only
a 16 KiB cap on a head that is still *incomplete*, so a larger head arriving in one
read went through.

- ``max_head_bytes`` (32 KiB): raw bytes of the request head, request line through
  the blank line that ends it. Counted as reads arrive, before parsing, so how the
  head is split into reads does not change the outcome: 431 (414 while the request
  line itself has not ended).
- ``max_url_bytes`` (8 KiB): the request target: 414.
- ``max_headers`` (100): header fields: 431.
- ``head_timeout`` (10 s): a connection that has not delivered a complete request
  head this long after its TLS handshake, or after its previous response, is closed:
  408 if part of a head had come, silently if nothing had. uvicorn's keep-alive
  timeout (5 s by default) still closes idle kept-alive connections first; the body
  of a request is not timed here.
- ``handshake_timeout`` (10 s): passed to :func:`mtls.tlsconfig.server_context` by
  :func:`uvicorn_config` (see there for what it bounds).

- A request with both ``Content-Length`` and ``Transfer-Encoding`` (the request
  smuggling shape; RFC 9112 section 6.1 lets a server refuse it and requires it to
  close the connection): 400. h11 alone would frame it by ``Transfer-Encoding`` and
  keep the connection open.

A head pipelined behind a body in the same read is not counted byte by byte; it is
checked on its parsed size (target, names, values, 2 bytes a field: a lower bound of
its raw size) once complete. Every refusal, including a request uvicorn's parser
rejects (400), is an RFC 9457 ``application/problem+json`` answer with ``reason``
``bad_request`` and ``connection: close``. The connection is then closed after a
short linger that reads and drops further input, so a client still sending its
request reads the answer rather than a reset.

:func:`uvicorn_config` builds a ``uvicorn.Config`` serving over
:func:`mtls.tlsconfig.server_context` (rotating with its source) with these classes,
and with uvicorn's proxy headers off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

import h11
import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mtls._problem import problem_document
from mtls.sources import X509Source
from mtls.tlsconfig import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    ClientCertMode,
    peer_chain_der,
    server_context,
)

__all__ = [
    "TRANSPORT_EXTENSION",
    "H11TLSProtocol",
    "HttpLimits",
    "HttpToolsTLSProtocol",
    "tls_extension",
    "uvicorn_config",
]

# The scope extension naming the connection's socket peer and whether it is TLS.
TRANSPORT_EXTENSION: Final = "axid.transport"

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
    """Wraps the app of one connection; adds ``extensions["tls"]`` (TLS connections)
    and ``extensions["axid.transport"]`` (every connection) to each scope.

    It is the outermost layer, so it runs before uvicorn's proxy-headers middleware
    and reads nothing from the request: only what the protocol saw on the socket."""

    __slots__ = ("app", "tls", "transport")

    def __init__(
        self,
        app: _ASGIApp,
        tls: dict[str, Any] | None = None,
        transport: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.tls = tls
        self.transport = transport

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> Any:
        if self.transport is not None and scope.get("type") in ("http", "websocket"):
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            # Copies per request: an app that mutates them cannot affect the next one.
            if self.tls is not None:
                tls = dict(self.tls)
                tls["client_cert_chain"] = list(self.tls["client_cert_chain"])
                extensions["tls"] = tls
            extensions[TRANSPORT_EXTENSION] = dict(self.transport)
        return await self.app(scope, receive, send)


class _WebSocketProtocolFactory:
    """Stands in for uvicorn's ``ws_protocol_class`` on one connection: makes the
    WebSocket protocol an upgrade is handed to, its app wrapped with this connection's
    extensions (uvicorn's WebSocket classes call ``self.app``, their config's app)."""

    __slots__ = ("extensions", "ws_class")

    def __init__(self, ws_class: Callable[..., Any], extensions: _TLSExtensionApp) -> None:
        self.ws_class = ws_class
        self.extensions = extensions

    def __call__(self, **kwargs: Any) -> Any:
        protocol = self.ws_class(**kwargs)
        # Without an app attribute (not uvicorn's class) the scope gets no extensions:
        # the verifier then finds no client certificate and denies (fail closed).
        if getattr(protocol, "app", None) is not None:
            made = self.extensions  # filled at connection_made, before any upgrade
            protocol.app = _TLSExtensionApp(protocol.app, made.tls, made.transport)
        return protocol


# -- request-head limits ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits on each request head and the time to receive it (see the module doc)."""

    max_head_bytes: int = 32 * 1024
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    head_timeout: float = 10.0
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_head_bytes", "max_url_bytes", "max_headers"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        for name in ("head_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")


_REASON: Final = "bad_request"
# After a refusal the connection reads and drops input, and closes once none has come
# for _LINGER_IDLE s, or _LINGER_SECONDS s after the answer, or past _LINGER_BYTES.
_LINGER_IDLE: Final = 0.5
_LINGER_SECONDS: Final = 2.0
_LINGER_BYTES: Final = 1024 * 1024
# The end of a head: a blank line (CRLF or bare LF line ends, as both parsers accept).
_HEAD_END: Final = re.compile(rb"\n\r?\n")
# A request may not carry both (RFC 9112 section 6.1).
_FRAMINGS: Final = frozenset({b"content-length", b"transfer-encoding"})
# h11's own cap on an incomplete head, kept above ours so that ours answers first: one
# read may hold head bytes the counter has not seen (a head pipelined behind a body).
_H11_CAP_SLACK: Final = 256 * 1024


def _problem(status: int, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete ``application/problem+json`` response (RFC 9457) that closes."""
    doc = problem_document(status, _REASON, detail)
    body = json.dumps(doc, separators=(",", ":")).encode()
    lines = [b"HTTP/1.1 %d %s" % (status, doc["title"].encode())]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: application/problem+json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _HeadRefused(h11.RemoteProtocolError):
    """A complete request head over a limit. Raised in the parser's hands: uvicorn
    catches it (h11 directly, httptools as a callback error) and calls
    ``send_400_response``, which answers the status stashed in ``_refusal``."""


class _LimitedProtocol:
    """What both protocol classes add to uvicorn's: the TLS extension, request-head
    limits and the head timeout. Listed first in their bases, before uvicorn's class."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    # uvicorn's, set by its protocol classes.
    app: Any
    loop: asyncio.AbstractEventLoop
    logger: logging.Logger
    transport: asyncio.Transport
    cycle: Any
    server_state: Any
    client: tuple[str, int] | None
    ws_protocol_class: Callable[..., Any] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn hands self.app to every request cycle of this connection.
        self._tls_app = _TLSExtensionApp(self.app)
        self.app = self._tls_app
        if self.ws_protocol_class is not None:  # None: uvicorn refuses upgrades
            self.ws_protocol_class = _WebSocketProtocolFactory(
                self.ws_protocol_class, self._tls_app
            )
        self._awaiting_head = True  # the parser has not completed the next head
        self._head_bytes = 0  # raw bytes of that head so far
        self._line_open = True  # its request line has not ended
        self._tail = b""  # last bytes counted (a blank line may straddle two reads)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None  # for send_400_response
        self._refused = False
        self._answer: bytes | None = None  # a refusal held until the response in progress ends
        self._drain_left = 0
        self._linger: asyncio.TimerHandle | None = None
        self._linger_end = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ssl_object = transport.get_extra_info("ssl_object")
        self._tls_app.tls = tls_extension(ssl_object) if ssl_object is not None else None
        # uvicorn's self.client is the socket's getpeername(), before any proxy header.
        peer = self.client
        self._tls_app.transport = {
            "peer": (str(peer[0]), int(peer[1])) if peer else None,
            "tls": ssl_object is not None,
        }
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:  # drop input; close once too much has come
            self._drain_left -= len(data)
            if self._drain_left < 0:
                self.transport.close()
            elif self._linger is not None:
                self._linger_close()
            return
        if self._awaiting_head and not self._count_head(data):
            return
        super().data_received(data)  # type: ignore[misc]

    # -- uvicorn's hooks -------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refused (or a _HeadRefused)."""
        status, detail = self._refusal or (400, "malformed HTTP request")
        self._refuse(status, detail)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._answer is not None:
            self._answer_and_close()
        self._arm_head_timer()

    def shutdown(self) -> None:
        if self._refused and not self._busy():  # h11 may be in a state shutdown refuses
            self.transport.close()
            return
        super().shutdown()  # type: ignore[misc]

    # -- the head --------------------------------------------------------------------

    def _count_head(self, data: bytes) -> bool:
        """Count a read into the head being received: False (and refused) past the limit."""
        before = self._head_bytes
        self._head_bytes = before + len(data)
        limit = self.limits.max_head_bytes
        window = limit - before  # how much of data may still be head
        if self._line_open and window > 0 and data.find(b"\n", 0, window) >= 0:
            self._line_open = False
        if self._head_bytes <= limit:
            self._tail = data[-2:]
            return True
        # Past the limit: still fine if the head ends within it (the rest is body).
        if window > 0 and _HEAD_END.search(self._tail + data[:window]) is not None:
            return True
        if self._line_open:
            self._refuse(414, f"request line longer than {limit} bytes")
        else:
            self._refuse(431, f"request head larger than {limit} bytes")
        return False

    def _check_head(self, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Called by the parser with a complete head, before uvicorn acts on it."""
        self._awaiting_head = False
        self._cancel_head_timer()
        limits = self.limits
        if len(target) > limits.max_url_bytes:
            self._refusal = (414, f"request target longer than {limits.max_url_bytes} bytes")
        elif len(headers) > limits.max_headers:
            self._refusal = (431, f"more than {limits.max_headers} header fields")
        elif len(target) + sum(len(n) + len(v) + 2 for n, v in headers) > limits.max_head_bytes:
            # Only a head the counter did not see whole (pipelined) gets here.
            self._refusal = (431, f"request head larger than {limits.max_head_bytes} bytes")
        elif _FRAMINGS.issubset(name.lower() for name, _ in headers):
            # RFC 9112 section 6.1: the request smuggling shape; refused, and (as every
            # refusal) its connection closed, which the RFC requires either way.
            self._refusal = (400, "request has both Content-Length and Transfer-Encoding")
        if self._refusal is not None:
            raise _HeadRefused(self._refusal[1], error_status_hint=self._refusal[0])

    def _message_complete(self) -> None:
        """Called by the parser at the end of a request: the next head starts."""
        self._awaiting_head = True
        self._head_bytes = 0
        self._line_open = True
        self._tail = b""
        self._arm_head_timer()

    # -- timer and refusal -----------------------------------------------------------

    def _busy(self) -> bool:
        """A response is being produced on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        # The next head is timed from the end of the previous response, if any.
        if self._head_timer is not None or self._refused or not self._awaiting_head:
            return
        if not self._busy():
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self._busy() or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, f"request head not complete within {self.limits.head_timeout} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` as problem+json and close; input is dropped from now on."""
        if self._refused:
            return
        self._refused = True
        self._drain_left = _LINGER_BYTES
        self._awaiting_head = False
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.info("%sRequest refused: %d %s", client, status, detail)
        self._answer = _problem(status, detail, self.server_state.default_headers)
        # A pipelined request is answered after the responses before it.
        self._answer_and_close()

    def _answer_and_close(self) -> None:
        """Write the refusal unless a response is in progress, then linger and close:
        the client may still be sending, and reads the answer rather than a reset."""
        if self._busy() or self._answer is None or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        self.transport.write(self._answer)
        self._answer = None
        self._linger_end = self.loop.time() + _LINGER_SECONDS
        self._linger_close()

    def _linger_close(self) -> None:
        """(Re)schedule the close: after _LINGER_IDLE s without input, within the cap."""
        if self._linger is not None:
            self._linger.cancel()
        delay = min(_LINGER_IDLE, self._linger_end - self.loop.time())
        self._linger = self.loop.call_later(max(delay, 0.0), self.transport.close)


class _H11Connection(h11.Connection):
    """h11's server side, handing each request head to the limit check before uvicorn
    acts on it, and each request's end to the head counter."""

    def __init__(self, protocol: _LimitedProtocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self._protocol = protocol

    def next_event(self) -> Any:
        event = super().next_event()
        if type(event) is h11.Request:
            self._protocol._check_head(event.target, event.headers)
        elif type(event) is h11.EndOfMessage:
            self._protocol._message_complete()
        return event


class H11TLSProtocol(_LimitedProtocol, H11Protocol):
    """uvicorn's h11 protocol, filling the ASGI TLS extension, with :class:`HttpLimits`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        configured = self.config.h11_max_incomplete_event_size or 0
        cap = max(configured, self.limits.max_head_bytes + _H11_CAP_SLACK)
        self.conn = _H11Connection(self, cap)  # no data has reached uvicorn's yet


class HttpToolsTLSProtocol(_LimitedProtocol, HttpToolsProtocol):
    """uvicorn's httptools protocol, filling the ASGI TLS extension, with :class:`HttpLimits`."""

    def on_headers_complete(self) -> None:
        self._check_head(self.url, self.headers)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_complete()


def uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    source: X509Source,
    http: Literal["h11", "httptools"] = "h11",
    limits: HttpLimits | None = None,
    client_cert: ClientCertMode = "required",
    **kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` serving ``app`` over mTLS from ``source`` with the TLS
    extension filled and ``limits`` (default :class:`HttpLimits()`) enforced. Extra
    keyword arguments go to ``uvicorn.Config``. ``client_cert`` is
    :func:`~mtls.tlsconfig.server_context`'s (``"optional"``: the app gets requests
    without a client certificate, with an empty ``client_cert_chain``).

    uvicorn's proxy headers are off (``proxy_headers=False``; passing ``True`` is a
    ``TypeError``): ``scope["client"]`` and ``scope["scheme"]`` stay the socket's, not
    whatever ``X-Forwarded-For`` / ``X-Forwarded-Proto`` claim."""
    base: type[_LimitedProtocol]
    if http == "h11":
        base = H11TLSProtocol
    elif http == "httptools":
        base = HttpToolsTLSProtocol
    else:
        raise ValueError(f"http must be 'h11' or 'httptools', not {http!r}")
    for key in ("ssl_context_factory", "ssl_certfile", "ssl_keyfile", "http"):
        if key in kwargs:
            raise TypeError(f"uvicorn_config sets {key} itself")
    if kwargs.pop("proxy_headers", False) is not False:
        raise TypeError("uvicorn_config serves with proxy_headers=False only")
    if limits is None:
        limits = base.limits
    elif not isinstance(limits, HttpLimits):
        raise TypeError(f"limits must be HttpLimits, not {type(limits).__name__}")
    protocol = base
    if limits != base.limits:
        protocol = type(base.__name__, (base,), {"limits": limits, "__module__": __name__})
    handshake_timeout = limits.handshake_timeout
    if client_cert not in ("required", "optional"):
        raise ValueError(f"client_cert must be 'required' or 'optional', not {client_cert!r}")

    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return server_context(source, handshake_timeout=handshake_timeout, client_cert=client_cert)

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ssl_context_factory=factory,
        proxy_headers=False,
        **kwargs,
    )
