"""The AXID issuer service: action tokens for registered agent workloads over mTLS.

Modules (one concept each): :mod:`~axid.issuer.config` (``axid serve`` settings),
:mod:`~axid.issuer.registry` (the registration file), :mod:`~axid.issuer.store`
(runs and revocations), :mod:`~axid.issuer.schemas` (request bodies),
:mod:`~axid.issuer.problems` (problem+json and reason codes),
:mod:`~axid.issuer.service` (the minting rules), :mod:`~axid.issuer.app` (the
FastAPI routes), :mod:`~axid.issuer.server` (uvicorn over mTLS) and
:mod:`~axid.issuer.client` (the agent-side client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axid.issuer.app import IssuerComponents, create_app, load_or_init_keyring
    from axid.issuer.client import (
        AsyncIssuerClient,
        IssuerClient,
        IssuerError,
        MintResult,
        check_issuer_url,
        issuer_id_matcher,
    )
    from axid.issuer.config import DATABASE_URL_ENV, ConfigError, IssuerConfig
    from axid.issuer.errors import IssuerBaseError
    from axid.issuer.problems import ISSUER_REASONS, PROBLEM_MEDIA_TYPE, Refusal, problem_response
    from axid.issuer.registry import Registration, Registry, RegistryError, parse_scope
    from axid.issuer.schemas import MintRequest, RevocationRequest
    from axid.issuer.server import IssuerStartupError, serve, serve_async
    from axid.issuer.service import SERVICE_NAME, DecisionDraft, IssuerService, Minted, Peer
    from axid.issuer.store import (
        REVOCATION_KINDS,
        IssuerStore,
        MintCheck,
        Revocation,
        RunConflict,
        RunRecord,
    )

_EXPORTS: dict[str, str] = {
    "IssuerComponents": "axid.issuer.app",
    "create_app": "axid.issuer.app",
    "load_or_init_keyring": "axid.issuer.app",
    "AsyncIssuerClient": "axid.issuer.client",
    "IssuerClient": "axid.issuer.client",
    "IssuerError": "axid.issuer.client",
    "MintResult": "axid.issuer.client",
    "check_issuer_url": "axid.issuer.client",
    "issuer_id_matcher": "axid.issuer.client",
    "ConfigError": "axid.issuer.config",
    "DATABASE_URL_ENV": "axid.issuer.config",
    "IssuerConfig": "axid.issuer.config",
    "IssuerBaseError": "axid.issuer.errors",
    "ISSUER_REASONS": "axid.issuer.problems",
    "PROBLEM_MEDIA_TYPE": "axid.issuer.problems",
    "Refusal": "axid.issuer.problems",
    "problem_response": "axid.issuer.problems",
    "Registration": "axid.issuer.registry",
    "Registry": "axid.issuer.registry",
    "RegistryError": "axid.issuer.registry",
    "parse_scope": "axid.issuer.registry",
    "MintRequest": "axid.issuer.schemas",
    "RevocationRequest": "axid.issuer.schemas",
    "IssuerStartupError": "axid.issuer.server",
    "serve": "axid.issuer.server",
    "serve_async": "axid.issuer.server",
    "DecisionDraft": "axid.issuer.service",
    "IssuerService": "axid.issuer.service",
    "Minted": "axid.issuer.service",
    "Peer": "axid.issuer.service",
    "SERVICE_NAME": "axid.issuer.service",
    "IssuerStore": "axid.issuer.store",
    "MintCheck": "axid.issuer.store",
    "REVOCATION_KINDS": "axid.issuer.store",
    "Revocation": "axid.issuer.store",
    "RunConflict": "axid.issuer.store",
    "RunRecord": "axid.issuer.store",
}

__all__ = [
    "DATABASE_URL_ENV",
    "ISSUER_REASONS",
    "PROBLEM_MEDIA_TYPE",
    "REVOCATION_KINDS",
    "SERVICE_NAME",
    "AsyncIssuerClient",
    "ConfigError",
    "DecisionDraft",
    "IssuerBaseError",
    "IssuerClient",
    "IssuerComponents",
    "IssuerConfig",
    "IssuerError",
    "IssuerService",
    "IssuerStartupError",
    "IssuerStore",
    "MintCheck",
    "MintRequest",
    "MintResult",
    "Minted",
    "Peer",
    "Refusal",
    "Registration",
    "Registry",
    "RegistryError",
    "Revocation",
    "RevocationRequest",
    "RunConflict",
    "RunRecord",
    "check_issuer_url",
    "create_app",
    "issuer_id_matcher",
    "load_or_init_keyring",
    "parse_scope",
    "problem_response",
    "serve",
    "serve_async",
]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): an agent importing axid.issuer.client does not load the
    # server side (FastAPI, uvicorn, SQLAlchemy).
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
