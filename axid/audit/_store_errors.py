"""The decision-log store's errors (re-exported by :mod:`axid.audit.store`)."""

from __future__ import annotations

from axid.audit.errors import AuditError

__all__ = [
    "DatabaseURLError",
    "LogKeyMismatch",
    "LogNameError",
    "LogNotFound",
    "NotFound",
    "StoreError",
]


class StoreError(AuditError):
    """The decision-log storage cannot do what was asked (bad state, bad input)."""


class DatabaseURLError(StoreError, ValueError):
    """The database URL is not one this store accepts."""


class LogNameError(StoreError, ValueError):
    """A log name is not ``[a-z0-9][a-z0-9._-]{0,63}``."""


class NotFound(StoreError, LookupError):
    """A log, entry or checkpoint that was asked for does not exist."""


class LogNotFound(NotFound):
    """No ``axid_audit_log`` row for this log name."""


class LogKeyMismatch(StoreError):
    """The log exists with a different verifier key (one log, one key)."""
