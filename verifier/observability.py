"""Metrics, tracing and logs of decisions. None of them ever sees a token.

* Prometheus: ``axid_verifier_decisions_total{decision, reason}`` and the
  histogram ``axid_verifier_decision_seconds`` (from the request reaching the
  verifier to its decision being committed to the log), in a
  :class:`~prometheus_client.CollectorRegistry` of the verifier's own, served by
  :meth:`VerifierMetrics.metrics_app` wherever the app mounts it.
* OpenTelemetry: when ``opentelemetry-api`` is importable, the current span gets
  ``axid.decision``, ``axid.reason``, ``axid.tenant``, ``axid.agent``, ``axid.run``.
  The import is guarded: without the package this is a no-op.
* Logs: one line per decision on the ``verifier.decisions`` logger (deny at INFO,
  allow at DEBUG), ``key=value`` pairs plus the same fields as ``extra["axid"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from types import ModuleType
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from verifier.decision import Decision

__all__ = [
    "SPAN_ATTRIBUTES",
    "VerifierMetrics",
    "annotate_span",
    "log_decision",
    "otel_trace",
]

_decision_log = logging.getLogger("verifier.decisions")

SPAN_ATTRIBUTES: Final = ("axid.decision", "axid.reason", "axid.tenant", "axid.agent", "axid.run")
_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _import_trace() -> ModuleType | None:
    """``opentelemetry.trace`` if installed, else ``None`` (the guard)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


_TRACE: ModuleType | None = _import_trace()


def otel_trace() -> ModuleType | None:
    """The ``opentelemetry.trace`` module in use, or ``None`` when not installed."""
    return _TRACE


def annotate_span(decision: Decision, span: Any = None) -> bool:
    """Set the ``axid.*`` attributes on ``span`` (default: OpenTelemetry's current span).

    Returns True if attributes were set. Without opentelemetry-api and no ``span``
    given, or on a span that is not recording, it does nothing.
    """
    if span is None:
        if _TRACE is None:
            return False
        span = _TRACE.get_current_span()
    is_recording = getattr(span, "is_recording", None)
    if is_recording is not None and not is_recording():
        return False
    values = (decision.decision, decision.reason, decision.tenant, decision.agent, decision.run)
    for name, value in zip(SPAN_ATTRIBUTES, values, strict=True):
        if value is not None:  # OpenTelemetry attributes may not be None
            span.set_attribute(name, value)
    return True


def log_decision(decision: Decision, *, method: str, path: str, seq: int | None) -> None:
    """One structured line per decision (never the token)."""
    level = logging.DEBUG if decision.allow else logging.INFO
    if not _decision_log.isEnabledFor(level):
        return
    fields = {
        "decision": decision.decision,
        "reason": decision.reason,
        "method": method,
        "path": path,
        "peer": decision.peer,
        "tenant": decision.tenant,
        "agent": decision.agent,
        "run": decision.run,
        "jti": decision.jti,
        "rule": decision.rule,
        "seq": seq,
        "note": decision.note,
    }
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    _decision_log.log(level, "axid %s", text, extra={"axid": fields})


class VerifierMetrics:
    """Prometheus metrics of one verifier, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "axid_verifier_decisions",
            "Decisions of the AXID verifier by outcome and reason code.",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "axid_verifier_decision_seconds",
            "Time from a governed request reaching the verifier to its decision being "
            "committed to the decision log.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        # Label children by (decision, reason): labels() validates and locks per call.
        # Bounded: reason codes are a fixed set.
        self._children: dict[tuple[str, str], Any] = {}

    def observe(self, decision: Decision, seconds: float) -> None:
        key = (decision.decision, decision.reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(*key)
        child.inc()
        self.latency.observe(seconds)

    def count(self, decision: str, reason: str) -> float:
        """The current count of a (decision, reason) pair (for tests and the CLI)."""
        value = self.registry.get_sample_value(
            "axid_verifier_decisions_total", {"decision": decision, "reason": reason}
        )
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def metrics_app(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """ASGI app serving the metrics as Prometheus text: ``app.mount("/metrics", ...)``."""
        if scope["type"] == "lifespan":  # served on its own
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("method") not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", b"text/plain; charset=utf-8"
        else:
            status, body, ctype = 200, self.render(), CONTENT_TYPE_LATEST.encode("latin-1")
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""}
        )
