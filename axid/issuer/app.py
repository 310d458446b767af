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

Layout: the routes live in :mod:`axid.issuer._routes` (one module per concern:
tokens, revocations, audit reads, keys/health/metrics); what they share is computed
once here and held in one :class:`~axid.issuer._state.IssuerState`
(``app.state.issuer_state``); HTTP plumbing (bodies, queries, error handlers) is in
:mod:`axid.issuer._http`; what the app runs on is
:class:`~axid.issuer.components.IssuerComponents`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from axid.audit.log import DecisionLog
from axid.audit.metrics import LogCollector
from axid.issuer._http import install_error_handlers
from axid.issuer._routes import install_routes
from axid.issuer._routes.approvals import sweep_forever
from axid.issuer._state import IssuerState, Metrics, PeerVerifier
from axid.issuer.anonymous import AnonymousGate
from axid.issuer.components import IssuerComponents, load_or_init_keyring
from axid.issuer.config import IssuerConfig
from axid.issuer.service import IssuerService

__all__ = ["IssuerComponents", "create_app", "load_or_init_keyring"]


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
    state = _build_state(config_or_components, clock)
    app = FastAPI(
        title="AXID issuer",
        lifespan=_lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.issuer_state = state
    # The names the app has always published (servers, tests and embedders read them).
    app.state.issuer = state.service
    app.state.components = state.components
    app.state.metrics_registry = state.metrics.registry
    # Outermost of the app's own middleware: anonymous requests end here, unrouted.
    app.add_middleware(AnonymousGate, on_refusal=state.metrics.anonymous_refusals.inc)
    install_error_handlers(app)
    install_routes(app)
    return app


def _build_state(
    config_or_components: IssuerConfig | IssuerComponents, clock: Callable[[], float]
) -> IssuerState:
    """Everything the routes share, computed once per app."""
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
    metrics = Metrics()
    metrics.registry.register(LogCollector(partial(_open_logs, service)))
    return IssuerState(service, components, metrics, PeerVerifier(components.source), owns)


def _open_logs(service: IssuerService) -> list[DecisionLog]:
    """The decision logs the metrics report: the service's, while it is open."""
    return [] if service.log is None else [service.log]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the decision log on the server's loop and start the approvals expiry
    sweep; stop the sweep, then close the log (and owned parts) after."""
    state: IssuerState = app.state.issuer_state
    service, components = state.service, state.components
    try:
        service.log = await DecisionLog.open(
            components.audit_url,
            log=components.log_name,
            origin=components.log_origin,
            key=components.log_key,
            create_key=True,
            head=components.log_head,
            head_required=components.log_head_required,
            witnesses=components.log_witnesses,
            quorum=components.log_quorum,
            witness_mode=components.log_witness_mode,
            witness_timeout=components.log_witness_timeout,
        )
        stop = asyncio.Event()
        sweeper = asyncio.get_running_loop().create_task(sweep_forever(app, stop))
        try:
            yield
        finally:
            stop.set()
            await sweeper
            log, service.log = service.log, None
            await log.close()
    finally:
        if state.owns:
            components.close()
