"""The AXID verifier: ASGI middleware and the decision pipeline.

::

    from verifier import AxidVerifier, VerifierConfig
    app.add_middleware(AxidVerifier, config=VerifierConfig.from_file("verifier.yaml"))

One module per concept:

- :mod:`verifier.config`        ``VerifierConfig`` (YAML or code), strict
- :mod:`verifier.rules`         route rules: method + path glob, scope, agents, tenants
- :mod:`verifier.identity`      step 1: the peer's SVID (TLS extension or trusted XFCC)
- :mod:`verifier.jwks`          the issuer's keys (file, or over mTLS with a cache)
- :mod:`verifier.revocation`    step 6: revocations (polled from the issuer or its table)
- :mod:`verifier.replay`        single-use jtis across replicas (a shared table)
- :mod:`verifier.checks`        step 7: custom checks, and ``BudgetLedger``
- :mod:`verifier.pipeline`      steps 1-7, free of ASGI
- :mod:`verifier.middleware`    ``AxidVerifier``: step 8 and the HTTP answers
- :mod:`verifier.observability` Prometheus metrics, OpenTelemetry attributes, logs

This package never imports the issuer service (``axid.issuer``).
"""

from verifier.checks import BudgetLedger, CheckResult, CustomCheck, RequestInfo
from verifier.config import (
    DEFAULT_HEADER,
    IdentityConfig,
    JwksConfig,
    LogConfig,
    ReplayConfig,
    RevocationConfig,
    TrustedProxies,
    VerifierConfig,
)
from verifier.decision import REASONS, STATUS, Decision, VerifiedAction, status_of
from verifier.errors import ConfigError
from verifier.identity import BundleFiles, PeerError, PeerIdentity, PeerResolver
from verifier.jwks import FileJwks, HttpJwks, JwksSource, StaticJwks
from verifier.middleware import AxidVerifier
from verifier.observability import VerifierMetrics, annotate_span
from verifier.pipeline import Pipeline, Presented, TokenCache
from verifier.replay import ReplayGuard
from verifier.revocation import (
    DatabaseRevocationSource,
    IssuerRevocationPoller,
    RevocationSet,
    RevocationSource,
    StaticRevocations,
)
from verifier.rules import RouteRule, RuleSet

__all__ = [
    "DEFAULT_HEADER",
    "REASONS",
    "STATUS",
    "AxidVerifier",
    "BudgetLedger",
    "BundleFiles",
    "CheckResult",
    "ConfigError",
    "CustomCheck",
    "DatabaseRevocationSource",
    "Decision",
    "FileJwks",
    "HttpJwks",
    "IdentityConfig",
    "IssuerRevocationPoller",
    "JwksConfig",
    "JwksSource",
    "LogConfig",
    "PeerError",
    "PeerIdentity",
    "PeerResolver",
    "Pipeline",
    "Presented",
    "ReplayConfig",
    "ReplayGuard",
    "RequestInfo",
    "RevocationConfig",
    "RevocationSet",
    "RevocationSource",
    "RouteRule",
    "RuleSet",
    "StaticJwks",
    "StaticRevocations",
    "TokenCache",
    "TrustedProxies",
    "VerifiedAction",
    "VerifierConfig",
    "VerifierMetrics",
    "annotate_span",
    "status_of",
]
