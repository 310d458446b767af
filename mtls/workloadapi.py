"""A small SPIFFE Workload API server for development and tests.

It speaks the real protocol (py-spiffe's generated gRPC servicer) on a unix socket, so
:class:`mtls.sources.WorkloadApiSource` is exercised against a real gRPC peer. It
serves one X.509-SVID and a bundle set, and :meth:`DevWorkloadApiServer.rotate` pushes
a new ``X509SVIDResponse`` to every open ``FetchX509SVID`` stream (and a new
``X509BundlesResponse`` to every ``FetchX509Bundles`` stream), as a SPIRE agent does
when it renews an SVID.

Like SPIRE it refuses calls without the ``workload.spiffe.io: true`` metadata
(INVALID_ARGUMENT). JWT methods answer UNIMPLEMENTED. It does no workload attestation:
anyone who can open the socket gets the SVID and its private key, so the socket is
made owner-only (0600). Not for production.

The SVID is served as given, not verified: tests push broken ones on purpose.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from mtls.errors import MtlsError
from mtls.sources import SvidMaterial
from mtls.spiffeid import SpiffeId, TrustDomain
from mtls.x509bundle import BundleSet

__all__ = ["DevWorkloadApiServer", "WorkloadApiServerError"]

_log = logging.getLogger(__name__)

_HEADER_KEY = "workload.spiffe.io"
_HEADER_VALUE = "true"
# How often a blocked stream re-checks that its client is still there.
_POLL_SECONDS = 1.0


class WorkloadApiServerError(MtlsError):
    """The dev Workload API server cannot be configured or started."""


class _Svid:
    """One SVID in wire form: DER chain, PKCS8 DER key."""

    __slots__ = ("chain_der", "key_der", "spiffe_id")

    def __init__(self, spiffe_id: SpiffeId, chain_der: bytes, key_der: bytes) -> None:
        self.spiffe_id = spiffe_id
        self.chain_der = chain_der
        self.key_der = key_der


def _spiffe_id_of(leaf: x509.Certificate) -> SpiffeId:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise WorkloadApiServerError(f"leaf has {len(uris)} URI SANs, need one")
        return SpiffeId.parse(uris[0])
    except (x509.ExtensionNotFound, ValueError) as e:
        raise WorkloadApiServerError(f"leaf has no usable SPIFFE ID: {e}") from None


def _to_wire(svid: Any) -> _Svid:
    """Accept SvidMaterial, mtls.devpki.IssuedSvid, or py-spiffe's X509Svid."""
    if isinstance(svid, SvidMaterial):
        chain = x509.load_pem_x509_certificates(svid.cert_chain_pem)
        key = serialization.load_pem_private_key(svid.key_pem, password=None)
    elif hasattr(svid, "chain") and hasattr(svid, "key"):  # IssuedSvid
        chain, key = list(svid.chain), svid.key
    elif hasattr(svid, "cert_chain") and hasattr(svid, "private_key"):  # py-spiffe X509Svid
        chain, key = list(svid.cert_chain), svid.private_key
    else:
        raise WorkloadApiServerError(f"cannot serve an SVID of type {type(svid).__name__}")
    if not chain:
        raise WorkloadApiServerError("SVID has an empty certificate chain")
    chain_der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _Svid(_spiffe_id_of(chain[0]), chain_der, key_der)


def _bundle_der(certs: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, server: DevWorkloadApiServer) -> None:
        self._server = server

    @staticmethod
    def _check_header(context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(_HEADER_KEY) != _HEADER_VALUE:
            # The message SPIRE's agent uses.
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509SVIDResponse]:
        self._check_header(context)
        yield from self._server._watch(context, self._server._svid_response)

    def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509BundlesResponse]:
        self._check_header(context)
        yield from self._server._watch(context, self._server._bundles_response)

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "JWT-SVIDs are not served by the dev server")

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "JWT bundles are not served by the dev server")

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "JWT-SVIDs are not served by the dev server")


class DevWorkloadApiServer:
    """A Workload API server on ``socket_path`` serving ``svid`` and ``bundle``.

    ``svid`` is an :class:`mtls.devpki.IssuedSvid`, an :class:`mtls.sources.SvidMaterial`
    or a py-spiffe ``X509Svid``. ``trust_domain`` names the bundle sent as the SVID's
    own (``X509SVID.bundle``), by default the SVID's trust domain; the other trust
    domains of ``bundle`` go out as ``federated_bundles`` keyed ``spiffe://<td>``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        svid: Any,
        bundle: BundleSet,
        *,
        trust_domain: TrustDomain | str | None = None,
        max_workers: int = 16,
    ) -> None:
        self._path = Path(os.path.abspath(os.fspath(socket_path)))
        # sockaddr_un.sun_path is 108 bytes including the NUL.
        if len(os.fsencode(self._path)) > 107:
            raise WorkloadApiServerError(f"socket path {self._path} is too long for a unix socket")
        self._td = (
            None
            if trust_domain is None
            else trust_domain
            if isinstance(trust_domain, TrustDomain)
            else TrustDomain.parse(trust_domain)
        )
        self._cond = threading.Condition()
        self._version = 0
        self._running = False
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._svid, self._bundle = self._prepare(svid, bundle)

    def _prepare(self, svid: Any, bundle: BundleSet) -> tuple[_Svid, BundleSet]:
        if not isinstance(bundle, BundleSet):
            raise WorkloadApiServerError(f"bundle must be a BundleSet, not {type(bundle).__name__}")
        wire = _to_wire(svid)
        td = self._td or wire.spiffe_id.trust_domain
        if not bundle.get(td):
            raise WorkloadApiServerError(f"bundle has no CA for trust domain {td.name}")
        return wire, bundle

    @property
    def endpoint(self) -> str:
        """``unix:///abs/path``, the value for ``SPIFFE_ENDPOINT_SOCKET``."""
        return "unix://" + str(self._path)

    @property
    def socket_path(self) -> Path:
        return self._path

    # -- responses (called with self._cond held) --

    def _svid_response(self) -> workload_pb2.X509SVIDResponse:
        svid, bundle = self._svid, self._bundle
        td = self._td or svid.spiffe_id.trust_domain
        federated = {
            f"spiffe://{other.name}": _bundle_der(bundle.get(other))
            for other in bundle.trust_domains
            if other != td
        }
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=str(svid.spiffe_id),
                    x509_svid=svid.chain_der,
                    x509_svid_key=svid.key_der,
                    bundle=_bundle_der(bundle.get(td)),
                )
            ],
            federated_bundles=federated,
        )

    def _bundles_response(self) -> workload_pb2.X509BundlesResponse:
        bundle = self._bundle
        return workload_pb2.X509BundlesResponse(
            bundles={f"spiffe://{td.name}": _bundle_der(bundle.get(td)) for td in bundle}
        )

    def _watch(self, context: grpc.ServicerContext, build: Callable[[], Any]) -> Iterator[Any]:
        """Send the current response, then a new one after each rotate(), until the
        client goes away or the server stops."""

        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)
        seen = -1
        while True:
            with self._cond:
                while self._running and context.is_active() and self._version == seen:
                    self._cond.wait(_POLL_SECONDS)
                if not self._running or not context.is_active():
                    return
                seen = self._version
                response = build()
            yield response

    # -- lifecycle --

    def start(self) -> None:
        if self._server is not None:
            raise WorkloadApiServerError("server already started")
        try:
            st = self._path.lstat()
        except FileNotFoundError:
            pass
        else:
            # A stale socket from a previous run may go; anything else is not ours.
            if not stat.S_ISSOCK(st.st_mode):
                raise WorkloadApiServerError(f"{self._path} exists and is not a socket")
            self._path.unlink()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), server)
        try:
            bound = server.add_insecure_port(f"unix:{self._path}")
        except RuntimeError as e:
            raise WorkloadApiServerError(f"cannot bind {self._path}: {e}") from None
        if bound == 0:
            raise WorkloadApiServerError(f"cannot bind {self._path}")
        with self._cond:
            self._running = True
        server.start()
        self._server = server
        try:
            os.chmod(self._path, 0o600)
        except OSError as e:  # pragma: no cover - the socket was just created by us
            self.stop()
            raise WorkloadApiServerError(f"cannot restrict {self._path}: {e}") from None
        _log.info("dev Workload API serving %s on %s", self._svid.spiffe_id, self.endpoint)

    def stop(self, grace: float | None = 1.0) -> None:
        server, self._server = self._server, None
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if server is not None:
            server.stop(grace).wait(timeout=(grace or 0) + 5)
        try:
            if stat.S_ISSOCK(self._path.lstat().st_mode):
                self._path.unlink()
        except FileNotFoundError:
            pass

    def rotate(self, svid: Any, bundle: BundleSet | None = None) -> None:
        """Serve a new SVID (and bundle) and push it to every open stream."""
        wire, new_bundle = self._prepare(svid, self._bundle if bundle is None else bundle)
        with self._cond:
            self._svid, self._bundle = wire, new_bundle
            self._version += 1
            self._cond.notify_all()

    def __enter__(self) -> DevWorkloadApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DevWorkloadApiServer({self.endpoint}, svid={self._svid.spiffe_id})"
