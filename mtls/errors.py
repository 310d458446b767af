"""The base of every error :mod:`mtls` raises (one error class per package, as in go-spiffe)."""

from __future__ import annotations

__all__ = ["MtlsError"]


class MtlsError(Exception):
    """An SPIFFE ID, SVID, bundle, XFCC header, source or dev PKI problem.

    Each concrete error also keeps its own base (``ValueError`` for the parsers),
    so code that catches those goes on catching them.
    """
