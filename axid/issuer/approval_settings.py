"""Issuer config ``approvals`` (DESIGN.md "Approvals"): who files, who approves, how
long a request waits, and whom to notify. Kept apart from the desk so that the
issuer's config module can parse it without importing the service.

::

    approvals:
      approvers: ["spiffe://example.org/ops/*"]   # default approvers of every request
      services: ["spiffe://example.org/svc/*"]    # who may file (none: nobody)
      timeout: 900                                # seconds; undecided = expired = denied
      notify_url: https://hooks.example.org/axid  # optional: a JSON POST per new request
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from mtls.spiffeid import SpiffeIdError, SpiffeIdPattern

__all__ = ["ApprovalSettings"]

_SETTINGS_KEYS: Final = frozenset({"approvers", "services", "timeout", "notify_url"})


def _patterns(value: object, key: str) -> tuple[SpiffeIdPattern, ...]:
    if not isinstance(value, list | tuple) or len(value) > 256:
        raise ValueError(f"approvals.{key} must be a list of SPIFFE ID patterns")
    try:
        return tuple(SpiffeIdPattern.parse(p) for p in value)
    except (SpiffeIdError, TypeError):
        raise ValueError(f"approvals.{key} must be a list of SPIFFE ID patterns") from None


@dataclass(frozen=True)
class ApprovalSettings:
    """Issuer config ``approvals`` (see the module docstring)."""

    approvers: tuple[SpiffeIdPattern, ...] = ()
    services: tuple[SpiffeIdPattern, ...] = ()
    timeout: int = 900
    notify_url: str | None = None

    @classmethod
    def from_dict(cls, doc: object) -> ApprovalSettings:
        """Strict: unknown keys refused; ValueError names what is wrong."""
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
            services=_patterns(doc.get("services", []), "services"),
            timeout=timeout,
            notify_url=notify,
        )
