"""The AXID verifier: ASGI middleware and the decision pipeline.

::

    from verifier import AxidVerifier, VerifierConfig
    app.add_middleware(AxidVerifier, config=VerifierConfig.from_file("verifier.yaml"))

This package exports what a service calls: the middleware, its configuration and
the parts of it built in code, the verified action a route reads, custom-check
types, metrics and the configuration error. Everything else is imported from its
module (``verifier.pipeline.Pipeline``, ``verifier.identity.PeerResolver``, ...).

One module per concept:

- :mod:`verifier.config`        ``VerifierConfig`` (YAML or code), strict
- :mod:`verifier.sections`      its sections: identity, jwks, revocations, log, replay, approvals
- :mod:`verifier.proxies`       ``TrustedProxies``: whose XFCC header is believed
- :mod:`verifier.rules`         route rules: method + path glob, scope, who, cost, approval
- :mod:`verifier.identity`      step 1: the peer's SVID (TLS extension or trusted XFCC)
- :mod:`verifier.jwks`          the issuer's keys (file, or over mTLS with a cache)
- :mod:`verifier.revocation`    step 6: revocations (polled from the issuer or its table)
- :mod:`verifier.replay`        single-use jtis across replicas (a shared table)
- :mod:`verifier.approval`      the approval step (after 6): filing, binding, single use
- :mod:`verifier.checks`        step 7: custom checks
- :mod:`verifier.budget`        ``BudgetLedger``: budgets shared by every replica (a table)
- :mod:`verifier.pipeline`      steps 1-7, free of ASGI (``_steps``: what the steps share)
- :mod:`verifier.runtime`       the resources of one config, opened and closed together
- :mod:`verifier.middleware`    ``AxidVerifier``: the ASGI layer, step 8
- :mod:`verifier.responses`     the deny answer (problem+json) and the AXID-Receipt header
- :mod:`verifier.logroutes`     the decision log's public read routes
- :mod:`verifier.observability` Prometheus metrics, OpenTelemetry attributes, logs

This package never imports the issuer service (``axid.issuer``).
"""

from verifier.budget import BudgetLedger
from verifier.checks import CheckResult, CustomCheck, RequestInfo
from verifier.config import (
    ApprovalsConfig,
    IdentityConfig,
    JwksConfig,
    LogConfig,
    ReplayConfig,
    RevocationConfig,
    TrustedProxies,
    VerifierConfig,
)
from verifier.decision import Decision, VerifiedAction
from verifier.errors import ConfigError, VerifierError
from verifier.middleware import AxidVerifier
from verifier.observability import VerifierMetrics
from verifier.rules import RouteRule

__all__ = [
    "ApprovalsConfig",
    "AxidVerifier",
    "BudgetLedger",
    "CheckResult",
    "ConfigError",
    "CustomCheck",
    "Decision",
    "IdentityConfig",
    "JwksConfig",
    "LogConfig",
    "ReplayConfig",
    "RequestInfo",
    "RevocationConfig",
    "RouteRule",
    "TrustedProxies",
    "VerifiedAction",
    "VerifierConfig",
    "VerifierError",
    "VerifierMetrics",
]
