"""Issuer config ``approvals`` (DESIGN.md "Approvals"): who files for which service,
who approves, how long a request waits, and whom to notify. Kept apart from the desk
so that the issuer's config module can parse it without importing the service.

::

    approvals:
      approvers: ["spiffe://example.org/ops/*"]   # default approvers of every request
      services:                                   # who may file, for which service
        payments: ["spiffe://example.org/svc/payments"]
      timeout: 900                                # seconds; undecided = expired = denied
      notify_url: https://hooks.example.org/axid  # optional: a JSON POST per new request

``services`` maps a service name (the ``service`` of a filing, which becomes the
approval token's ``aud``) to the SPIFFE ID patterns of the SVIDs that may file for
it. Fail closed: a service that is not a key has no filer; none configured, nobody
may file. The older list form (any matching SVID filing for any service) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern

__all__ = ["ApprovalSettings"]

_SETTINGS_KEYS: Final = frozenset({"approvers", "services", "timeout", "notify_url"})
# A filing's ``service`` (the approval token's ``aud``); the desk checks filings with it.
_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")
_MAX_SERVICES: Final = 256
_SWEEP_MAX: Final = 5.0


def _patterns(value: object, key: str) -> tuple[SpiffeIdPattern, ...]:
    if not isinstance(value, list | tuple) or len(value) > 256:
        raise ValueError(f"approvals.{key} must be a list of SPIFFE ID patterns")
    try:
        return tuple(SpiffeIdPattern.parse(p) for p in value)
    except (SpiffeIdError, TypeError):
        raise ValueError(f"approvals.{key} must be a list of SPIFFE ID patterns") from None


def _services(value: object) -> dict[str, tuple[SpiffeIdPattern, ...]]:
    """``{service name: [SPIFFE ID patterns]}``, strictly."""
    if isinstance(value, list | tuple):
        raise ValueError(
            "approvals.services is a mapping {service name: [SPIFFE ID patterns]} saying "
            "which SVIDs may file for which service; the list form is no longer accepted"
        )
    if not isinstance(value, Mapping) or len(value) > _MAX_SERVICES:
        raise ValueError(
            "approvals.services must be a mapping {service name: [SPIFFE ID patterns]}"
        )
    services: dict[str, tuple[SpiffeIdPattern, ...]] = {}
    for name, patterns in value.items():
        if not isinstance(name, str) or _SERVICE_RE.fullmatch(name) is None:
            raise ValueError(f"approvals.services: {str(name)[:80]!r} is not a service name")
        services[name] = _patterns(patterns, f"services.{name}")
        if not services[name]:
            raise ValueError(f"approvals.services.{name} must list at least one SPIFFE ID pattern")
    return services


@dataclass(frozen=True)
class ApprovalSettings:
    """Issuer config ``approvals`` (see the module docstring). ``services`` is held
    read-only; built directly, it must already be a mapping of name to patterns."""

    approvers: tuple[SpiffeIdPattern, ...] = ()
    services: Mapping[str, tuple[SpiffeIdPattern, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    timeout: int = 900
    notify_url: str | None = None

    def __post_init__(self) -> None:
        # Fail closed on the old shape in code too (a tuple of patterns would otherwise
        # read as "no services" only by accident of iteration).
        if not isinstance(self.services, Mapping) or not all(
            isinstance(k, str)
            and isinstance(v, tuple)
            and all(isinstance(p, SpiffeIdPattern) for p in v)
            for k, v in self.services.items()
        ):
            raise TypeError(
                "ApprovalSettings.services maps service names to SpiffeIdPattern tuples"
            )
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    @property
    def sweep_interval(self) -> float:
        """Seconds between the issuer's background expiry sweeps: ``min(5, timeout/2)``."""
        return min(_SWEEP_MAX, self.timeout / 2)

    def may_file(self, spiffe_id: SpiffeId | str, service: str | None = None) -> bool:
        """Whether ``spiffe_id`` may file for ``service`` (for any service if None)."""
        names = self.services if service is None else [service]
        return any(p.matches(spiffe_id) for name in names for p in self.services.get(name, ()))

    @classmethod
    def from_dict(cls, doc: object) -> ApprovalSettings:
        """Strict: unknown keys and shapes refused; ValueError names what is wrong."""
        if doc is None:
            return cls()
        if not isinstance(doc, Mapping):
            raise ValueError("approvals must be a mapping")
        unknown = set(doc) - _SETTINGS_KEYS
        if unknown:
            raise ValueError(f"approvals: unknown key(s) {sorted(map(str, unknown))}")
        timeout = doc.get("timeout", 900)
        if type(timeout) is not int or not 1 <= timeout <= 7 * 86400:
            raise ValueError("approvals.timeout must be seconds in [1, 604800]")
        notify = doc.get("notify_url")
        if notify is not None and (
            not isinstance(notify, str) or not notify.startswith(("https://", "http://"))
        ):
            raise ValueError("approvals.notify_url must be an http(s) URL")
        return cls(
            approvers=_patterns(doc.get("approvers", []), "approvers"),
            services=_services(doc.get("services", {})),
            timeout=timeout,
            notify_url=notify,
        )
