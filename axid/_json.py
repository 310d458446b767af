"""The one strict JSON reader of AXID's security formats (tokens, JWKS, request bodies, entries).

The standard library's ``json`` keeps the last of duplicate members (so a
reviewer and the program can read different values) and accepts ``NaN`` and
``Infinity``, which are not JSON. Here both are errors (``ValueError``). The
messages name no member: callers may pass them on, and member names can be
attacker-chosen.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["strict_loads"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name in JSON object")
    return obj


def _no_constant(name: str) -> Any:
    # name is one of NaN, Infinity, -Infinity: never attacker-chosen text.
    raise ValueError(f"{name} is not JSON")


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def strict_loads(text: str) -> Any:
    """The JSON value of ``text``; ``ValueError`` on duplicate members, NaN/Infinity or bad JSON.

    Deep nesting raises ``RecursionError``: callers catch it with ``ValueError``.
    """
    return _DECODER.decode(text)
