"""The issuer app's state, computed once per app and held in one object.

:class:`IssuerState` is what every route reads (``request.app.state.issuer_state``):
the minting rules (:class:`~axid.issuer.service.IssuerService`), the components, the
app's own metrics and the peer verifier; and the two answers that end a recorded
decision (a logged deny, or 503 ``audit_unavailable`` when the log failed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from axid.audit.log import AuditUnavailable
from axid.issuer._http import receipt_headers
from axid.issuer.components import IssuerComponents
from axid.issuer.problems import Refusal, problem_response
from axid.issuer.service import DecisionDraft, IssuerService, Peer
from mtls.sources import SourceError, X509Source
from mtls.x509bundle import BundleSet
from mtls.x509svid import SvidError, verify_svid

__all__ = ["IssuerState", "Metrics", "PeerVerifier", "state_of"]

_log = logging.getLogger("axid.issuer.app")

_PEER_CACHE_MAX: Final = 1024
_PEER_CACHE_SECONDS: Final = 60.0


class PeerVerifier:
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


class Metrics:
    """The app's own Prometheus registry (``GET /metrics``) and its instruments."""

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


@dataclass(frozen=True, eq=False)
class IssuerState:
    """Everything the routes share; built once by :func:`axid.issuer.app.create_app`.
    ``owns``: the app opened ``components`` itself and closes them on shutdown."""

    service: IssuerService
    components: IssuerComponents
    metrics: Metrics
    peer_of: PeerVerifier
    owns: bool

    async def refuse(self, rec: DecisionDraft, route: str, refusal: Refusal) -> Response:
        """Log a deny, then answer it (503 audit_unavailable if the log failed)."""
        try:
            receipt = await self.service.record(rec, "deny", refusal.reason)
        except Exception as exc:  # AuditUnavailable, or a field the log refused
            return self.audit_down(route, exc)
        self.metrics.decisions.labels(route, "deny", refusal.reason).inc()
        return problem_response(
            refusal.status, refusal.reason, refusal.detail, headers=receipt_headers(receipt)
        )

    def audit_down(self, route: str, exc: Exception) -> Response:
        """The answer when a decision could not be recorded: nothing was issued."""
        if not isinstance(exc, AuditUnavailable):
            _log.error("decision log refused an entry: %s", type(exc).__name__)
        self.metrics.decisions.labels(route, "deny", "audit_unavailable").inc()
        return problem_response(
            503, "audit_unavailable", "the decision could not be recorded; nothing was issued"
        )


def state_of(request: Request) -> IssuerState:
    """The state of the app serving ``request``."""
    state: IssuerState = request.app.state.issuer_state
    return state
