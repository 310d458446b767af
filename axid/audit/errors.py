"""The base of every error :mod:`axid.audit` raises (one error class per package).

Pure: imports nothing, so the witness's pure audit modules can use it.
"""

from __future__ import annotations

__all__ = ["AuditError"]


class AuditError(Exception):
    """A decision log, entry, proof, note, cosignature, receipt or store problem.

    Each concrete error also keeps its own base (``ValueError``, ``LookupError``),
    so code that catches those goes on catching them.
    """
