"""``ssl.SSLContext`` builders for SPIFFE mTLS, fed by an :class:`~mtls.sources.X509Source`.

Server (:func:`server_context`): TLS >= 1.2, a client certificate is required and
must chain (OpenSSL, RFC 5280) to one of the source's bundles. With
``client_cert="optional"`` (the issuer: its JWKS and log are public) the server still
asks for one and a client may send none; one that is sent must chain to the bundles
all the same, or the handshake fails. OpenSSL checks the chain
against *all* bundles at once; the per-trust-domain rule and the X509-SVID leaf rules
are the verifier's job (:func:`mtls.x509svid.verify_svid` on the chain the ASGI TLS
extension carries).

Rotation without restart: the returned context has an ``sni_callback``. OpenSSL runs
it on every ClientHello, with or without an SNI extension (checked on OpenSSL 3.0 with
asyncio and uvloop transports, connecting to an IP). When the source's generation has
changed it switches that handshake to a context built from the new SVID and bundles
(``ssl_object.context = inner``), so new connections get new material while open
connections keep theirs. Its connections on asyncio/uvloop servers also get a
handshake deadline (``handshake_timeout``, 10 s by default; see :func:`server_context`).

Client (:func:`client_context`): presents the source's SVID, does not check DNS names,
and after the handshake verifies the server's chain with ``verify_svid`` against the
source's bundles and its SPIFFE ID against ``server_id``; a mismatch fails the
handshake with :class:`ssl.SSLCertVerificationError`. This is done by an
``SSLContext`` subclass whose ``sslobject_class`` (asyncio/anyio, uvloop) and
``sslsocket_class`` (blocking sockets) override ``do_handshake``. Before a
connection's first handshake step the context is switched to the source's current
generation too, so long-lived clients (an ``httpx.Client``) rotate as well.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from mtls.sources import SourceError, SvidMaterial, X509Source
from mtls.spiffeid import SpiffeId, SpiffeIdPattern
from mtls.x509bundle import BundleSet
from mtls.x509svid import SvidError, verify_svid

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "ClientCertMode",
    "client_context",
    "peer_chain_der",
    "peer_chain_pem",
    "server_context",
]

_log = logging.getLogger(__name__)

# OpenSSL's X509_V_ERR_APPLICATION_VERIFICATION: "application verification failure".
_X509_V_ERR_APPLICATION_VERIFICATION = 50

ServerIdMatcher = SpiffeId | SpiffeIdPattern | Callable[[SpiffeId], bool]
# "required": no client certificate, no handshake; "optional": asked for, verified if sent.
ClientCertMode = Literal["required", "optional"]
_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
}


# -- helpers ------------------------------------------------------------------------


def _snapshot(source: X509Source) -> tuple[int, SvidMaterial, BundleSet]:
    """A coherent (generation, svid, bundles): retried if the source moved meanwhile."""
    for _ in range(5):
        gen = source.generation
        material = source.svid()
        bundles = source.bundles()
        if source.generation == gen:
            return gen, material, bundles
    raise SourceError("source keeps changing; cannot take a coherent snapshot")


def _load_cert_chain(ctx: ssl.SSLContext, material: SvidMaterial) -> None:
    """``load_cert_chain`` from memory: ssl only reads files.

    On Linux an anonymous memfd is used, so the key never touches a filesystem; else a
    0600 temporary file that is removed at once.
    """
    blob = material.cert_chain_pem + b"\n" + material.key_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("axid-svid", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall through to a temporary file
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(prefix="axid-svid-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def _base_context(
    ctx: ssl.SSLContext, material: SvidMaterial, bundles: BundleSet
) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks in OpenSSL too (Python 3.13's default).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_verify_locations(cadata=bundles.to_pem().decode("ascii"))
    _load_cert_chain(ctx, material)
    return ctx


class _ContextCache:
    """The context for the source's current generation, rebuilt when it moves."""

    def __init__(
        self,
        source: X509Source,
        build: Callable[[SvidMaterial, BundleSet], ssl.SSLContext],
        initial: tuple[int, ssl.SSLContext] | None = None,
    ) -> None:
        self._source = source
        self._build = build
        self._lock = threading.Lock()
        if initial is None:
            gen, material, bundles = _snapshot(source)
            initial = (gen, build(material, bundles))
        self._gen, self._ctx = initial

    def current(self) -> ssl.SSLContext:
        gen = self._source.generation
        if gen == self._gen:
            return self._ctx
        with self._lock:
            if self._source.generation == self._gen:
                return self._ctx
            new_gen, material, bundles = _snapshot(self._source)
            try:
                ctx = self._build(material, bundles)
            except (ssl.SSLError, OSError, ValueError) as e:
                # The source validated this material, so this is unexpected; keep
                # serving the previous (still valid) context and retry next handshake.
                _log.error("cannot build TLS context for rotated SVID: %s", e)
                return self._ctx
            self._gen, self._ctx = new_gen, ctx
            _log.info("TLS context rotated to SVID %s", material.spiffe_id)
            return ctx


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """DER of the certificate chain the peer sent, leaf first (``[]`` if none).

    Python 3.13+ has public ``get_unverified_chain()``. On 3.10-3.12 the same method
    exists only on the private ``_sslobj`` (``_ssl._SSLSocket``), which is used when
    present. Where neither is available, or for a resumed session (OpenSSL does not
    keep the peer's chain then), only the leaf (``getpeercert(binary_form=True)``) is
    returned, and a verifier needs the intermediates in its bundle.
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return []
    chain: Any = None
    for owner in (ssl_object, getattr(ssl_object, "_sslobj", None)):
        getter = getattr(owner, "get_unverified_chain", None)
        if callable(getter):
            try:
                chain = getter()
            except (ssl.SSLError, ValueError, AttributeError):
                chain = None
            break
    ders: list[bytes] = []
    for item in chain or ():
        if isinstance(item, bytes | bytearray):
            ders.append(bytes(item))
        else:  # _ssl.Certificate (3.10-3.12): PEM by default
            ders.append(ssl.PEM_cert_to_DER_cert(item.public_bytes()))
    # The leaf must come first; if the chain disagrees with OpenSSL's peer cert, trust
    # only the peer cert.
    if not ders or ders[0] != leaf:
        return [leaf]
    return ders


def peer_chain_pem(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[str]:
    """PEM of the certificate chain the peer sent, leaf first; see :func:`peer_chain_der`."""
    return [ssl.DER_cert_to_PEM_cert(der) for der in peer_chain_der(ssl_object)]


# -- server -------------------------------------------------------------------------

DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds; see server_context


class _ServerSSLObject(ssl.SSLObject):
    """Fails a handshake still running ``handshake_timeout`` after it began.

    asyncio and uvloop call ``do_handshake`` once when the connection opens and again
    each time handshake bytes arrive; the first call starts the clock, and a call past
    the deadline raises, which makes the loop close the connection.
    """

    def do_handshake(self) -> None:
        now = time.monotonic()
        deadline: float | None = getattr(self, "_axid_deadline", None)
        if deadline is None:
            timeout = getattr(self.context, "_axid_handshake_timeout", None)
            self._axid_deadline = now + timeout if timeout is not None else math.inf
        elif now > deadline:
            raise ssl.SSLError(1, "[AXID] TLS handshake not completed in time")
        super().do_handshake()


class _SpiffeServerContext(ssl.SSLContext):
    """A server context whose asyncio/uvloop connections have a handshake deadline."""

    sslobject_class = _ServerSSLObject
    _axid_handshake_timeout: float | None = None


def server_context(
    source: X509Source,
    *,
    alpn: Sequence[str] = ("http/1.1",),
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    client_cert: ClientCertMode = "required",
) -> ssl.SSLContext:
    """A server ``SSLContext`` requiring a client certificate chained to the source's
    bundles, presenting the source's current SVID and following its rotations.

    ``client_cert="optional"`` asks for a client certificate without requiring one
    (``ssl.CERT_OPTIONAL``): a client that sends none completes the handshake (the
    ASGI TLS extension then has an empty ``client_cert_chain``, and the app must
    refuse what needs an identity); one that sends a certificate is verified against
    the bundles exactly as in ``"required"`` mode.

    ``handshake_timeout`` (seconds, ``None``: none of ours) bounds a TLS handshake on
    an asyncio or uvloop server: a handshake that is still running when its next
    record arrives after the deadline fails. A peer that sends nothing at all is not
    seen by this check; the event loop's own handshake timeout closes it
    (``loop.create_server(ssl_handshake_timeout=...)``, 60 s by default, which uvicorn
    does not let its callers set). Blocking ``wrap_socket`` servers are not covered.
    """
    alpn = tuple(alpn)
    verify_mode = _VERIFY_MODES.get(client_cert) if isinstance(client_cert, str) else None
    if verify_mode is None:
        raise ValueError(f"client_cert must be 'required' or 'optional', not {client_cert!r}")
    if handshake_timeout is not None and not 0 < handshake_timeout < math.inf:
        raise ValueError(f"handshake_timeout must be positive and finite, not {handshake_timeout}")

    def build(material: SvidMaterial, bundles: BundleSet) -> ssl.SSLContext:
        ctx = _SpiffeServerContext(ssl.PROTOCOL_TLS_SERVER)
        _base_context(ctx, material, bundles)
        ctx.verify_mode = verify_mode
        ctx._axid_handshake_timeout = handshake_timeout
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    gen, material, bundles = _snapshot(source)
    outer = build(material, bundles)
    cache = _ContextCache(source, build, initial=(gen, outer))

    def on_client_hello(
        ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        try:
            inner = cache.current()
        except Exception as e:  # a closed or broken source: refuse, never serve stale
            _log.error("TLS handshake refused: no SVID available: %s", e)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if inner is not ssl_object.context:
            ssl_object.context = inner
        return None

    outer.sni_callback = on_client_hello
    return outer


# -- client -------------------------------------------------------------------------


def _matcher(server_id: ServerIdMatcher) -> Callable[[SpiffeId], bool]:
    if isinstance(server_id, SpiffeId):
        want = server_id
        return lambda sid: sid == want
    if isinstance(server_id, SpiffeIdPattern):
        return server_id.matches
    if isinstance(server_id, str):
        raise TypeError("server_id must be SpiffeId, SpiffeIdPattern or a callable, not str")
    if callable(server_id):
        return server_id
    raise TypeError(f"server_id must be SpiffeId, SpiffeIdPattern or a callable, not {server_id!r}")


def _describe_matcher(server_id: ServerIdMatcher) -> str:
    if isinstance(server_id, SpiffeId | SpiffeIdPattern):
        return str(server_id)
    return getattr(server_id, "__name__", "a callable")


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, f"[CERTIFICATE_VERIFY_FAILED] {message}")
    err.reason = "CERTIFICATE_VERIFY_FAILED"
    err.library = "SPIFFE"
    err.verify_code = _X509_V_ERR_APPLICATION_VERIFICATION
    err.verify_message = message
    return err


class _SpiffeClientContext(ssl.SSLContext):
    """A client context that checks the server's SVID and SPIFFE ID after the handshake."""

    _axid_cache: _ContextCache
    _axid_bundles: BundleSet
    _axid_match: Callable[[SpiffeId], bool]
    _axid_want: str

    def _axid_check_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
        chain = peer_chain_der(ssl_object)
        if not chain:
            raise _verify_error("server presented no certificate")
        try:
            verified = verify_svid(chain, self._axid_bundles)
        except SvidError as e:
            raise _verify_error(f"server certificate is not a trusted X.509-SVID: {e}") from None
        try:
            ok = bool(self._axid_match(verified.spiffe_id))
        except Exception as e:  # a broken matcher refuses
            raise _verify_error(f"server ID check raised {type(e).__name__}") from None
        if not ok:
            raise _verify_error(
                f"server SPIFFE ID {verified.spiffe_id} is not the expected {self._axid_want}"
            )


def _rotate_before_handshake(obj: Any) -> None:
    """Switch a not-yet-started connection to the source's current context."""
    if getattr(obj, "_axid_started", False):
        return
    obj._axid_started = True
    ctx = obj.context
    if not isinstance(ctx, _SpiffeClientContext):
        return
    try:
        fresh = ctx._axid_cache.current()
    except Exception as e:
        raise ssl.SSLError(1, f"[SPIFFE] no client SVID available: {e}") from None
    if fresh is not ctx:
        obj.context = fresh


def _check_after_handshake(obj: Any) -> None:
    ctx = obj.context
    if isinstance(ctx, _SpiffeClientContext):
        ctx._axid_check_peer(obj)


class _SpiffeSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        _rotate_before_handshake(self)
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        _check_after_handshake(self)


class _SpiffeSSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        _rotate_before_handshake(self)
        super().do_handshake(block)
        try:
            _check_after_handshake(self)
        except ssl.SSLError:
            # The TLS session is up: close it so a caller that ignores the error
            # cannot talk to an unverified server.
            self.close()
            raise


_SpiffeClientContext.sslobject_class = _SpiffeSSLObject
_SpiffeClientContext.sslsocket_class = _SpiffeSSLSocket


def client_context(source: X509Source, *, server_id: ServerIdMatcher) -> ssl.SSLContext:
    """A client ``SSLContext`` presenting the source's SVID and accepting only a server
    whose X.509-SVID verifies against the source's bundles and whose SPIFFE ID matches
    ``server_id`` (an exact :class:`SpiffeId`, a :class:`SpiffeIdPattern`, or a
    predicate). DNS names are not checked (``check_hostname`` is False): the SPIFFE ID
    is the server's identity.
    """
    match = _matcher(server_id)
    want = _describe_matcher(server_id)
    cache: _ContextCache | None = None  # set below; every context built later shares it

    def build(material: SvidMaterial, bundles: BundleSet) -> ssl.SSLContext:
        ctx = _SpiffeClientContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        _base_context(ctx, material, bundles)
        ctx._axid_bundles = bundles
        ctx._axid_match = match
        ctx._axid_want = want
        if cache is not None:
            ctx._axid_cache = cache
        return ctx

    gen, material, bundles = _snapshot(source)
    outer = build(material, bundles)
    cache = _ContextCache(source, build, initial=(gen, outer))
    outer._axid_cache = cache
    return outer
