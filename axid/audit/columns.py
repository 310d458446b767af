"""A database row's index columns: which they are, and the reference check of them.

A row keeps copies of some entry fields for filtering (``axid audit show``);
:func:`index_disagreements` is the check, made by the reference pass
(:mod:`axid.audit.reference`) and by ``axid audit show``, that each holds
exactly what the entry's bytes say. (The accelerator's quick form of it,
:func:`~axid.audit.accelerate.index_clean`, may only say "all agree".)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from axid.audit.entry import EntryError, format_ts, parse_ts

__all__ = ["INDEX_COLUMNS", "index_disagreements"]

# The copies of entry fields a database row keeps for filtering, in the order a
# :class:`~axid.audit.sources.DatabaseSource` row carries them after
# ``(seq, data, leaf_hash)``. Verification checks each against the entry bytes.
INDEX_COLUMNS: tuple[str, ...] = ("decision", "reason", "tenant", "agent", "run", "ts")


def index_disagreements(entry: Mapping[str, Any], index: Sequence[Any]) -> list[str]:
    """Which stored index columns disagree with the entry they index (the reference check).

    ``entry`` is what :func:`~axid.audit.entry.parse_entry` made of the entry
    bytes; ``index`` the row's columns in :data:`INDEX_COLUMNS` order, as
    stored. A column agrees when it holds exactly what the entry says, of the
    same type (``ts``: the entry's time in unix ms, an int). Returns one
    ``"COLUMN column is X but the entry says Y"`` per disagreeing column.
    """
    out: list[str] = []
    for name, stored in zip(INDEX_COLUMNS, index, strict=True):
        said = entry[name]
        want = parse_ts(said) if name == "ts" else said
        if type(stored) is not type(want) or stored != want:
            out.append(f"{name} column is {_stored_repr(name, stored)} but the entry says {said!r}")
    return out


def _stored_repr(name: str, stored: Any) -> str:
    if name == "ts" and type(stored) is int:
        try:
            return f"{stored} ({format_ts(stored)})"
        except EntryError:
            pass
    return repr(stored)
