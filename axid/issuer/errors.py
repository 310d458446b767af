"""The base of every error :mod:`axid.issuer` raises (one error class per package).

Not named ``IssuerError``: that name is the client's error (the issuer refused or
could not be reached), older than this base, and kept as it is.
"""

from __future__ import annotations

__all__ = ["IssuerBaseError"]


class IssuerBaseError(Exception):
    """An issuer configuration, registration, store, client or startup problem."""
