"""The base of the errors of AXID's top-level modules (tokens, keys, strict YAML).

Each subpackage has its own base (``AuditError``, ``IssuerBaseError``,
``WitnessError``); they are separate, flat roots, so that a subpackage's layering
does not depend on this module.
"""

from __future__ import annotations

__all__ = ["AxidError"]


class AxidError(Exception):
    """A token, key or configuration file problem in :mod:`axid` itself."""
