"""The AXID issuer service: action tokens for registered agent workloads over mTLS.

What a user calls is exported here: :func:`create_app` (the ASGI app; with
:class:`IssuerComponents` to build it from parts), :func:`serve` /
:func:`serve_async` (``axid serve``), :class:`IssuerConfig`, the agent-side clients,
the registration file (:class:`Registry`), the reason codes, and the errors (all
:class:`IssuerBaseError`). Everything else is internal to its module.

Modules (one concept each): :mod:`~axid.issuer.config` (``axid serve`` settings),
:mod:`~axid.issuer.registry` (the registration file), :mod:`~axid.issuer.store`
(runs and revocations), :mod:`~axid.issuer.schemas` (request bodies),
:mod:`~axid.issuer.problems` (problem+json and reason codes),
:mod:`~axid.issuer.service` (the minting rules), :mod:`~axid.issuer.components`
(what an app runs on), :mod:`~axid.issuer.app` (the FastAPI app; its routes in
``axid.issuer._routes``), :mod:`~axid.issuer.server` (uvicorn over mTLS) and
:mod:`~axid.issuer.client` (the agent-side client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axid.issuer.app import create_app
    from axid.issuer.approval_settings import ApprovalSettings
    from axid.issuer.client import (
        AsyncIssuerClient,
        IssuerClient,
        IssuerError,
        MintResult,
        check_issuer_url,
        issuer_id_matcher,
    )
    from axid.issuer.components import IssuerComponents
    from axid.issuer.config import DATABASE_URL_ENV, ConfigError, IssuerConfig
    from axid.issuer.errors import IssuerBaseError
    from axid.issuer.problems import ISSUER_REASONS, PROBLEM_MEDIA_TYPE
    from axid.issuer.registry import Registration, Registry, RegistryError
    from axid.issuer.server import IssuerStartupError, serve, serve_async

_EXPORTS: dict[str, str] = {
    "create_app": "axid.issuer.app",
    "ApprovalSettings": "axid.issuer.approval_settings",
    "AsyncIssuerClient": "axid.issuer.client",
    "IssuerClient": "axid.issuer.client",
    "IssuerError": "axid.issuer.client",
    "MintResult": "axid.issuer.client",
    "check_issuer_url": "axid.issuer.client",
    "issuer_id_matcher": "axid.issuer.client",
    "IssuerComponents": "axid.issuer.components",
    "ConfigError": "axid.issuer.config",
    "DATABASE_URL_ENV": "axid.issuer.config",
    "IssuerConfig": "axid.issuer.config",
    "IssuerBaseError": "axid.issuer.errors",
    "ISSUER_REASONS": "axid.issuer.problems",
    "PROBLEM_MEDIA_TYPE": "axid.issuer.problems",
    "Registration": "axid.issuer.registry",
    "Registry": "axid.issuer.registry",
    "RegistryError": "axid.issuer.registry",
    "IssuerStartupError": "axid.issuer.server",
    "serve": "axid.issuer.server",
    "serve_async": "axid.issuer.server",
}

__all__ = [
    "DATABASE_URL_ENV",
    "ISSUER_REASONS",
    "PROBLEM_MEDIA_TYPE",
    "ApprovalSettings",
    "AsyncIssuerClient",
    "ConfigError",
    "IssuerBaseError",
    "IssuerClient",
    "IssuerComponents",
    "IssuerConfig",
    "IssuerError",
    "IssuerStartupError",
    "MintResult",
    "Registration",
    "Registry",
    "RegistryError",
    "check_issuer_url",
    "create_app",
    "issuer_id_matcher",
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
