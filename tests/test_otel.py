"""The verifier's observability with the real OpenTelemetry SDK and a Prometheus scrape.

A governed "payments" service under uvicorn over real mTLS (mtls.uvicorn), wrapped
as a deployment would be: the real ASGI instrumentation
(``opentelemetry-instrumentation-asgi``) outermost, starting the server span, then
:class:`~verifier.middleware.AxidVerifier`, then the app, which mounts the
verifier's metrics at ``/metrics`` (ungoverned). The SDK's TracerProvider (not the
global one: other tests share the process) exports to an InMemorySpanExporter.
Checked: the server span of each governed request carries ``axid.decision``,
``axid.reason``, ``axid.tenant``, ``axid.agent`` and ``axid.run``, and the scrape,
parsed with prometheus_client's own parser, counts the decisions by
(decision, reason) and observes each in the ``axid_verifier_decision_seconds``
histogram (request reaching the verifier -> decision committed to the log).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _tls_helpers import WAIT, ServerThread, wait_for
from _verifier_helpers import ISSUER, Pki, key_set, make_pki, new_signing_key, token_for
from fastapi import FastAPI, Request
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from axid.keys import SigningKey
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from mtls.uvicorn import uvicorn_config
from verifier.config import IdentityConfig, LogConfig, VerifierConfig
from verifier.middleware import AxidVerifier
from verifier.observability import SPAN_ATTRIBUTES, VerifierMetrics
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

pytestmark = pytest.mark.timeout(60)

RULES = [
    RouteRule("/metrics/**", governed=False),
    RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
    RouteRule("/payments/*", methods=["DELETE"], scope="payments:delete"),
]


@dataclass
class Service:
    pki: Pki
    key: SigningKey
    url: str
    spans: InMemorySpanExporter
    client: httpx.Client

    def call(self, method: str, path: str, token: str | None) -> httpx.Response:
        headers = {} if token is None else {"X-Waxell-AXID": token}
        return self.client.request(method, self.url + path, headers=headers)

    def server_span(self, path: str) -> ReadableSpan:
        """The one server span of the request to ``path`` (waited for: the instrumentation
        ends it after the response went out)."""

        def found() -> list[ReadableSpan]:
            return [
                s
                for s in self.spans.get_finished_spans()
                if s.kind is SpanKind.SERVER and _span_path(s) == path
            ]

        wait_for(lambda: len(found()) == 1, what=f"the server span of {path}")
        return found()[0]


def _app(metrics: VerifierMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        return {"pid": pid, "run": request.state.axid.run}

    @app.delete("/payments/{pid}")
    async def delete(pid: str) -> dict[str, Any]:
        return {"pid": pid, "deleted": True}

    app.mount("/metrics", metrics.metrics_app)
    return app


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp: Path = tmp_path_factory.mktemp("otel")
    pki = make_pki(tmp)
    key = new_signing_key()
    config = VerifierConfig(
        service="payments",
        issuer=ISSUER,
        tenants=["acme"],
        identity=IdentityConfig(bundle=pki.dev.bundle),
        jwks=key_set(key),
        revocations=StaticRevocations(),
        log=LogConfig(url=f"sqlite:///{tmp}/payments.db", key=tmp / "log.pem", max_delay=0),
        rules=RULES,
    )
    metrics = VerifierMetrics()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = OpenTelemetryMiddleware(
        AxidVerifier(_app(metrics), config, metrics=metrics),
        tracer_provider=provider,
        exclude_spans=["receive", "send"],
    )
    source = FileSource(pki.cert("payments"), pki.key("payments"), pki.dev.bundle)
    server = ServerThread(
        uvicorn_config(app, source=source, log_level="warning", lifespan="on")
    ).start()
    planner = FileSource(pki.cert("planner"), pki.key("planner"), pki.dev.bundle)
    ctx = client_context(planner, server_id=SpiffeId.parse(pki.spiffe_id("payments")))
    client = httpx.Client(verify=ctx, timeout=WAIT, trust_env=False)
    try:
        yield Service(pki, key, f"https://127.0.0.1:{server.port}", exporter, client)
    finally:
        client.close()
        server.stop()
        source.close()
        provider.shutdown()


def _span_path(span: ReadableSpan) -> object:
    # The HTTP semantic conventions' old name by default, the stable one when opted in.
    attributes = span.attributes or {}
    return attributes.get("url.path", attributes.get("http.target"))


def _axid_attributes(span: ReadableSpan) -> dict[str, Any]:
    attributes = span.attributes or {}
    return {k: attributes[k] for k in SPAN_ATTRIBUTES if k in attributes}


def test_span_attributes_and_prometheus_scrape(service: Service) -> None:
    token = token_for(service.pki, "planner", service.key, now=time.time(), run="run-otel-1")

    allowed = service.call("GET", "/payments/p-1", token)
    assert allowed.status_code == 200, allowed.text
    assert _axid_attributes(service.server_span("/payments/p-1")) == {
        "axid.decision": "allow",
        "axid.reason": "ok",
        "axid.tenant": "acme",
        "axid.agent": "planner",
        "axid.run": "run-otel-1",
    }

    # A verified token without the scope: denied, still attributed to its run.
    denied = service.call("DELETE", "/payments/p-2", token)
    assert denied.status_code == 403 and denied.json()["reason"] == "scope_insufficient"
    assert _axid_attributes(service.server_span("/payments/p-2")) == {
        "axid.decision": "deny",
        "axid.reason": "scope_insufficient",
        "axid.tenant": "acme",
        "axid.agent": "planner",
        "axid.run": "run-otel-1",
    }

    # No token: no tenant, agent or run to name (OpenTelemetry attributes are never None).
    missing = service.call("GET", "/payments/p-3", None)
    assert missing.status_code == 401 and missing.json()["reason"] == "token_missing"
    assert _axid_attributes(service.server_span("/payments/p-3")) == {
        "axid.decision": "deny",
        "axid.reason": "token_missing",
    }

    scrape = service.client.get(service.url + "/metrics/")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}

    decisions = families["axid_verifier_decisions"]
    assert decisions.type == "counter"
    counts = {
        (s.labels["decision"], s.labels["reason"]): s.value
        for s in decisions.samples
        if s.name == "axid_verifier_decisions_total"
    }
    assert counts == {
        ("allow", "ok"): 1.0,
        ("deny", "scope_insufficient"): 1.0,
        ("deny", "token_missing"): 1.0,
    }

    latency = families["axid_verifier_decision_seconds"]
    assert latency.type == "histogram"
    by_name: dict[str, list[Any]] = {}
    for s in latency.samples:
        by_name.setdefault(s.name, []).append(s)
    (count,) = by_name["axid_verifier_decision_seconds_count"]
    assert count.value == 3.0
    buckets = {s.labels["le"]: s.value for s in by_name["axid_verifier_decision_seconds_bucket"]}
    assert buckets["+Inf"] == 3.0
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    (total,) = by_name["axid_verifier_decision_seconds_sum"]
    assert total.value > 0

    # The decision log's own collector is in the same registry.
    failures = families["axid_log_integrity_failures"]
    assert [(s.labels, s.value) for s in failures.samples] == [({"log": "payments"}, 0.0)]

    # ... with the commit latency histogram: one observation per commit batch; the
    # three decisions were sent one after another, so each had its own batch.
    commits = families["axid_log_commit_seconds"]
    assert commits.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s for s in commits.samples}
    assert all(s.labels["log"] == "payments" for s in commits.samples)
    assert samples[("axid_log_commit_seconds_count", None)].value == 3.0
    assert samples[("axid_log_commit_seconds_bucket", "+Inf")].value == 3.0
    assert samples[("axid_log_commit_seconds_sum", None)].value > 0
    cumulative = [s.value for s in commits.samples if s.name.endswith("_bucket")]
    assert cumulative == sorted(cumulative)

    # The scrape itself is ungoverned: its span carries no axid.* attribute.
    assert _axid_attributes(service.server_span("/metrics/")) == {}
