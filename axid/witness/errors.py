"""The base of every error :mod:`axid.witness` raises (one error class per package).

Its own root, not under :mod:`axid.errors`: the witness imports nothing of AXID
but its own modules and axid.audit's pure ones.
"""

from __future__ import annotations

__all__ = ["WitnessError"]


class WitnessError(Exception):
    """A witness configuration, key directory, store or startup problem."""
