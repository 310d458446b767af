"""The issuer service's HTTP API (FastAPI), served over mTLS by :mod:`axid.issuer.server`.

Routes (DESIGN.md, "Issuer service"):

==============================  =========================  ================================
``POST /v1/tokens``             registered agent SVIDs     201 ``{token, jti, kid, expires_at}``
``GET /.well-known/jwks.json``  anyone                     current + next + retired keys
``POST /v1/revocations``        admin SPIFFE IDs           201 ``{seq, kind, value, reason,
                                                           created_at, cascaded: [...]}``
``GET /v1/revocations``         SVIDs of the issuer's      ``{"revocations": [...], "next": N}``
  ``?since=N&limit=M``          own trust domain           (``seq > N``, at most M <= 1000)
``GET /v1/audit/checkpoint``    anyone                     the log's latest signed checkpoint
``GET /v1/audit/proof``         anyone                     C2SP tlog-proof of entry N in the
  ``?seq=N[&size=S]``                                      checkpoint of size S (default latest)
``GET /v1/audit/consistency``   anyone                     consistency proof from size M, in
  ``?old=M[&size=N]``                                      the tlog-witness add-checkpoint form
``GET /healthz``                anyone                     ``{"status": "ok"}``
``GET /metrics``                any mTLS peer              Prometheus text (own registry)
==============================  =========================  ================================

"Anyone": the issuer's TLS asks for a client certificate without requiring one. A
request without one reaches only the routes above marked "anyone"; everything else
is answered 401 ``no_peer_cert`` by :class:`~axid.issuer.anonymous.AnonymousGate`,
unrecorded, counted in ``axid_issuer_anonymous_refusals_total``. The audit read
routes share :mod:`verifier.logroutes` with every verifier (same texts, same 400
``bad_request`` / 404 ``not_found`` rules).

The caller's identity comes only from its certificate: the chain uvicorn put in
``scope["extensions"]["tls"]["client_cert_chain"]`` (see :mod:`mtls.uvicorn`) is
verified with :func:`mtls.x509svid.verify_svid` against the source's current
bundles (401 ``no_peer_cert`` without one, 401 ``peer_untrusted`` /
``peer_not_svid`` when it fails). Nothing in a body or header names the caller.

Every mint and every refusal of ``POST /v1/tokens``, and every revocation
request, is appended to the issuer's own decision log and committed before the
answer is sent, and the answer carries its receipt (``AXID-Receipt``, see
:mod:`axid.audit.receipt`); if that fails the answer is 503 ``audit_unavailable``
(no token, no receipt). A revocation is stored before it is logged: if the log
then fails the revocation stands (the safe direction) and the answer is still 503.

Errors are RFC 9457 problem+json: see :mod:`axid.issuer.problems` for the codes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from axid.audit.log import AuditUnavailable, DecisionLog
from axid.audit.metrics import LogCollector
from axid.audit.receipt import RECEIPT_HEADER, Receipt
from axid.audit.witnessing import DEFAULT_WITNESS_TIMEOUT, WitnessConfig
from axid.issuer.anonymous import AnonymousGate
from axid.issuer.config import DEFAULT_LOG_KEY, DEFAULT_LOG_NAME, IssuerConfig
from axid.issuer.problems import Refusal, problem_response
from axid.issuer.registry import Registry
from axid.issuer.schemas import (
    MAX_BODY_BYTES,
    MintRequest,
    RevocationRequest,
    parse_json_body,
    validate_body,
)
from axid.issuer.service import DecisionDraft, IssuerService, Peer
from axid.issuer.store import MAX_REVOCATIONS_PAGE, IssuerStore
from axid.keys import Keyring, KeyringError
from mtls.sources import FileSource, SourceError, WorkloadApiSource, X509Source
from mtls.spiffeid import SpiffeIdPattern
from mtls.x509bundle import BundleSet
from mtls.x509svid import SvidError, verify_svid
from verifier.logroutes import LogReadError, LogRoute, read_log

__all__ = ["IssuerComponents", "create_app", "load_or_init_keyring"]

_log = logging.getLogger(__name__)

_PEER_CACHE_MAX: Final = 1024
_PEER_CACHE_SECONDS: Final = 60.0
# Up to 16 digits: enough for 2**53 - 1 (the largest `since`); _query_int checks the range.
_UINT_RE: Final = re.compile(r"[0-9]{1,16}")
_JSON_TYPE_RE: Final = re.compile(r"application/json", re.IGNORECASE)


def load_or_init_keyring(directory: str | os.PathLike[str], *, now: float) -> Keyring:
    """Load the keyring in ``directory``, creating it (one current key) if absent."""
    path = Path(directory)
    if not (path / "keyring.json").exists():
        try:
            return Keyring.init(path, now=now)
        except KeyringError:
            if not (path / "keyring.json").exists():
                raise
            # Another process (a replica) initialised it first: use that one.
    return Keyring.load(path)


@dataclass
class IssuerComponents:
    """What an issuer app runs on. Build one with :meth:`from_config`, or by hand in
    tests and embedders (then the caller owns and closes the parts)."""

    iss: str
    source: X509Source
    keyring: Keyring
    store: IssuerStore
    registry: Registry
    audit_url: str
    log_name: str = DEFAULT_LOG_NAME
    log_key: Path | Ed25519PrivateKey = DEFAULT_LOG_KEY
    log_head: Path | None = None
    log_head_required: bool = False
    log_witnesses: tuple[WitnessConfig, ...] = ()
    log_quorum: int | None = None
    log_witness_mode: str = "async"
    log_witness_timeout: float = DEFAULT_WITNESS_TIMEOUT
    admins: tuple[SpiffeIdPattern, ...] = ()
    default_ttl: int = 120
    max_ttl: int = 300
    owned: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def from_config(
        cls, config: IssuerConfig, *, clock: Callable[[], float] = time.time
    ) -> IssuerComponents:
        """Open the source, registry, keyring (created if absent) and database."""
        owned: list[Any] = []
        try:
            registry = Registry.from_file(config.registrations)
            source: X509Source
            if config.workload_api is not None:
                source = WorkloadApiSource(config.workload_api)
            else:
                assert config.cert and config.key and config.bundle  # checked by the config
                source = FileSource(config.cert, config.key, config.bundle)
            owned.append(source)
            keyring = load_or_init_keyring(config.keys_dir, now=math.floor(clock()))
            store = IssuerStore.open(config.database_url)
            owned.append(store)
        except BaseException:
            for item in reversed(owned):
                item.close()
            raise
        return cls(
            iss=config.iss,
            source=source,
            keyring=keyring,
            store=store,
            registry=registry,
            audit_url=config.audit_url,
            log_name=config.log_name,
            log_key=config.log_key,
            log_head=config.log_head,
            log_head_required=config.log_head_required,
            log_witnesses=config.log_witnesses,
            log_quorum=config.log_quorum,
            log_witness_mode=config.log_witness_mode,
            log_witness_timeout=config.log_witness_timeout,
            admins=config.admins,
            default_ttl=config.default_ttl,
            max_ttl=config.max_ttl,
            owned=owned,
        )

    def close(self) -> None:
        """Close what :meth:`from_config` opened (nothing for hand-built components)."""
        while self.owned:
            item = self.owned.pop()
            try:
                item.close()
            except Exception:  # closing must not stop closing the rest
                _log.warning("error closing %s", type(item).__name__, exc_info=True)


class _PeerVerifier:
    """The request's peer SVID, verified; results cached briefly per chain + bundles."""

    def __init__(self, source: X509Source) -> None:
        self._source = source
        self._cache: dict[tuple[str, ...], tuple[Peer, BundleSet, float]] = {}

    def __call__(self, scope: dict[str, Any]) -> Peer:
        extensions = scope.get("extensions") or {}
        tls = extensions.get("tls") if isinstance(extensions, dict) else None
        chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
        if not chain or not isinstance(chain, list):
            raise Refusal(401, "no_peer_cert", "no client certificate was presented")
        key = tuple(str(c) for c in chain)
        try:
            bundles = self._source.bundles()
        except SourceError:
            _log.error("no trust bundle available to verify peers")
            raise Refusal(503, "internal_error", "the issuer has no trust bundle") from None
        mono = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] is bundles and hit[2] > mono:
            return hit[0]
        try:
            verified = verify_svid(list(key), bundles)
        except SvidError as exc:
            raise Refusal(401, exc.reason, exc.detail) from None
        peer = Peer(verified.spiffe_id, verified.x5t_s256)
        left = (verified.leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        if len(self._cache) >= _PEER_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (peer, bundles, mono + min(_PEER_CACHE_SECONDS, left))
        return peer


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "axid_issuer_decisions",
            "Decisions of the issuer (mints, refusals, revocations) by route and reason.",
            ["route", "decision", "reason"],
            registry=self.registry,
        )
        self.anonymous_refusals = Counter(
            "axid_issuer_anonymous_refusals",
            "Requests without a client certificate refused (401 no_peer_cert, unrecorded).",
            registry=self.registry,
        )
        self.mint_seconds = Histogram(
            "axid_issuer_mint_seconds",
            "Time to answer POST /v1/tokens, decision log commit included.",
            registry=self.registry,
        )


async def _read_json(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if _JSON_TYPE_RE.fullmatch(ctype.split(";", 1)[0].strip()) is None:
        raise Refusal(415, "bad_request", "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise Refusal(413, "bad_request", f"request body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise Refusal(413, "bad_request", f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks))


def create_app(
    config_or_components: IssuerConfig | IssuerComponents,
    *,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The issuer ASGI app. With an :class:`IssuerConfig` the app opens (and on
    shutdown closes) its components itself. ``clock`` (Unix seconds) drives token
    times, key rotation and revocation timestamps; SVID validity uses real time.
    The decision log is opened in the app's lifespan (its batcher lives on the
    server's event loop)."""
    if isinstance(config_or_components, IssuerConfig):
        components = IssuerComponents.from_config(config_or_components, clock=clock)
        owns = True
    elif isinstance(config_or_components, IssuerComponents):
        components = config_or_components
        owns = False
    else:
        raise TypeError("create_app needs an IssuerConfig or IssuerComponents")

    service = IssuerService(
        iss=components.iss,
        keyring=components.keyring,
        store=components.store,
        registry=components.registry,
        admins=components.admins,
        default_ttl=components.default_ttl,
        max_ttl=components.max_ttl,
        clock=clock,
    )
    metrics = _Metrics()
    metrics.registry.register(LogCollector(lambda: [] if service.log is None else [service.log]))
    peer_of = _PeerVerifier(components.source)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            service.log = await DecisionLog.open(
                components.audit_url,
                log=components.log_name,
                key=components.log_key,
                create_key=True,
                head=components.log_head,
                head_required=components.log_head_required,
                witnesses=components.log_witnesses,
                quorum=components.log_quorum,
                witness_mode=components.log_witness_mode,
                witness_timeout=components.log_witness_timeout,
            )
            try:
                yield
            finally:
                log, service.log = service.log, None
                await log.close()
        finally:
            if owns:
                components.close()

    app = FastAPI(
        title="AXID issuer",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.issuer = service
    app.state.components = components
    app.state.metrics_registry = metrics.registry
    # Outermost of the app's own middleware: anonymous requests end here, unrouted.
    app.add_middleware(AnonymousGate, on_refusal=metrics.anonymous_refusals.inc)

    # ------------------------------------------------------------------ errors

    async def on_refusal(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        return problem_response(exc.status, exc.reason, exc.detail)

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        reason = {404: "not_found", 405: "method_not_allowed"}.get(
            status, "internal_error" if status >= 500 else "bad_request"
        )
        detail = {404: "no such route", 405: "method not allowed for this route"}.get(
            status, "request refused"
        )
        headers = dict(exc.headers or {}) if status == 405 else None
        return problem_response(status, reason, detail, headers=headers)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        return problem_response(400, "bad_request", "the request is malformed")

    async def on_crash(_request: Request, exc: Exception) -> Response:
        # Starlette logs the exception after this; the client gets no internals.
        return problem_response(500, "internal_error", "internal error")

    app.add_exception_handler(Refusal, on_refusal)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_crash)

    async def refuse(rec: DecisionDraft, route: str, refusal: Refusal) -> Response:
        """Log a deny, then answer it (503 audit_unavailable if the log failed)."""
        try:
            receipt = await service.record(rec, "deny", refusal.reason)
        except Exception as exc:  # AuditUnavailable, or a field the log refused
            return _audit_down(route, exc)
        metrics.decisions.labels(route, "deny", refusal.reason).inc()
        return problem_response(
            refusal.status, refusal.reason, refusal.detail, headers=_receipt_headers(receipt)
        )

    def _audit_down(route: str, exc: Exception) -> Response:
        if not isinstance(exc, AuditUnavailable):
            _log.error("decision log refused an entry: %s", type(exc).__name__)
        metrics.decisions.labels(route, "deny", "audit_unavailable").inc()
        return problem_response(
            503, "audit_unavailable", "the decision could not be recorded; nothing was issued"
        )

    # ------------------------------------------------------------------ routes

    async def post_token(request: Request) -> Response:
        started = time.perf_counter()
        rec = DecisionDraft("POST", "/v1/tokens")
        try:
            peer = peer_of(request.scope)
            rec.set_peer(peer)
            req = validate_body(MintRequest, await _read_json(request))
            minted = await service.mint(rec, peer, req)
        except Refusal as refusal:
            return await refuse(rec, "tokens", refusal)
        except Exception:
            _log.exception("mint failed unexpectedly")
            return await refuse(rec, "tokens", Refusal(500, "internal_error", "internal error"))
        try:
            receipt = await service.record(rec, "allow", "ok")
        except Exception as exc:
            return _audit_down("tokens", exc)  # the token is dropped: never issued unrecorded
        metrics.decisions.labels("tokens", "allow", "ok").inc()
        metrics.mint_seconds.observe(time.perf_counter() - started)
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        return JSONResponse(
            minted.to_json(), status_code=201, headers=_receipt_headers(receipt, headers)
        )

    # A plain Starlette route: the handler reads and checks its own body, so FastAPI's
    # dependency solving would only add CPU to the hottest route (same errors: 405
    # and the exception handlers work alike for both kinds of route).
    app.add_route("/v1/tokens", post_token, methods=["POST"])

    @app.get("/.well-known/jwks.json")
    async def get_jwks() -> Response:
        return JSONResponse(service.jwks(), headers={"Cache-Control": "no-cache"})

    @app.post("/v1/revocations")
    async def post_revocation(request: Request) -> Response:
        rec = DecisionDraft("POST", "/v1/revocations")
        try:
            peer = peer_of(request.scope)
            rec.set_peer(peer)
            if not service.is_admin(peer):
                raise Refusal(403, "forbidden", "only admin SPIFFE IDs may revoke")
            req = validate_body(RevocationRequest, await _read_json(request))
            revocation, cascaded = await service.revoke(rec, peer, req)
        except Refusal as refusal:
            return await refuse(rec, "revocations", refusal)
        except Exception:
            _log.exception("revocation failed unexpectedly")
            return await refuse(
                rec, "revocations", Refusal(500, "internal_error", "internal error")
            )
        try:
            receipt = await service.record(rec, "allow", "ok")
        except Exception as exc:
            return _audit_down("revocations", exc)
        metrics.decisions.labels("revocations", "allow", "ok").inc()
        body = revocation.to_json()
        body["cascaded"] = [r.to_json() for r in cascaded]
        headers = _receipt_headers(receipt, {"Cache-Control": "no-store"})
        return JSONResponse(body, status_code=201, headers=headers)

    @app.get("/v1/revocations")
    async def get_revocations(request: Request) -> Response:
        peer = peer_of(request.scope)
        own_td = components.source.svid().spiffe_id.trust_domain
        if peer.spiffe_id.trust_domain != own_td:
            raise Refusal(403, "forbidden", "revocations are served to this trust domain only")
        since = _query_int(request, "since", 0, 2**53 - 1)
        limit = _query_int(request, "limit", MAX_REVOCATIONS_PAGE, MAX_REVOCATIONS_PAGE, lo=1)
        rows = await service.revocations(since, limit)
        return JSONResponse(
            {"revocations": [r.to_json() for r in rows], "next": rows[-1].seq if rows else since},
            headers={"Cache-Control": "no-store"},
        )

    def audit_route(route: LogRoute) -> Callable[[Request], Awaitable[Response]]:
        async def read(request: Request) -> Response:
            log = service.log
            if log is None:
                raise Refusal(503, "audit_unavailable", "the decision log is not open")
            try:
                text = await read_log(log.store, route, request.scope.get("query_string", b""))
            except LogReadError as exc:
                raise Refusal(exc.status, exc.reason, exc.detail) from None
            return PlainTextResponse(text, headers={"Cache-Control": "no-cache"})

        return read

    audit_reads: tuple[LogRoute, ...] = ("checkpoint", "proof", "consistency")
    for name in audit_reads:
        app.add_route(f"/v1/audit/{name}", audit_route(name), methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _receipt_headers(receipt: Receipt, headers: dict[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus the ``AXID-Receipt`` of the decision the answer reports."""
    return {**(headers or {}), RECEIPT_HEADER: receipt.header_value()}


def _query_int(request: Request, name: str, default: int, hi: int, *, lo: int = 0) -> int:
    values = request.query_params.getlist(name)
    if not values:
        return default
    if len(values) > 1 or _UINT_RE.fullmatch(values[0]) is None:
        raise Refusal(400, "bad_request", f"{name} must be one non-negative integer")
    value = int(values[0])
    if not lo <= value <= hi:
        raise Refusal(400, "bad_request", f"{name} must be in [{lo}, {hi}]")
    return value
