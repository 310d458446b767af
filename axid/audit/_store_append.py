"""The append path: sequence a batch, compute its Merkle nodes, sign, insert.

One transaction per batch (:meth:`LogStore.append_batch
<axid.audit.store.LogStore.append_batch>` holds it): under the log lock and
after the head is authenticated (:mod:`axid.audit._store_head`), the batch is
computed in memory (entries, the perfect nodes they complete, the signed
checkpoint of the new size) and then inserted with three statements on the
driver's own cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert

from axid.audit._store_engine import _compile_for, _DriverStmt
from axid.audit._store_head import _ZERO_HASH, _Head
from axid.audit._store_tables import (
    _CP_COLS,
    _CP_T,
    _ENTRY_COLS,
    _ENTRY_T,
    _NODE_COLS,
    _NODE_T,
    _now_ms,
)
from axid.audit.entry import DecisionFields, encode_entry, format_ts
from axid.audit.merkle import CompactRange, leaf_hash
from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from axid.audit.receipt import Receipt


@dataclass(frozen=True, slots=True)
class _AppendSQL:
    """The per-batch inserts, run on the driver's own cursor."""

    entry: _DriverStmt
    node: _DriverStmt
    checkpoint: _DriverStmt

    @classmethod
    def for_engine(cls, engine: Engine) -> _AppendSQL:
        return cls(
            entry=_compile_for(engine, insert(_ENTRY_T), _ENTRY_COLS),
            node=_compile_for(engine, insert(_NODE_T), _NODE_COLS),
            checkpoint=_compile_for(engine, insert(_CP_T), _CP_COLS),
        )


@dataclass(slots=True)
class _Batch:
    """A batch computed in memory: the rows to insert and what the receipts need."""

    entry_rows: list[tuple[object, ...]]
    node_rows: list[tuple[object, ...]]
    leaves: list[tuple[int, bytes, bytes]]  # (seq, leaf hash, entry bytes)
    head: _Head  # the new head: signed checkpoint, last leaf, right edge


def _compute_batch(
    head: _Head | None, valid: list[DecisionFields], log: str, origin: str, signer: NoteSigner
) -> _Batch:
    """Sequence ``valid`` after ``head``: entries, completed nodes, signed checkpoint."""
    if head is None:
        size, prev, cr = 0, _ZERO_HASH, CompactRange()
    else:
        size, prev, cr = head.cp.size, head.last_leaf, CompactRange(head.cp.size, head.edge)
    ts = _now_ms()
    ts_str = format_ts(ts)
    out: list[tuple[int, bytes, bytes]] = []
    entry_rows: list[tuple[object, ...]] = []
    node_rows: list[tuple[object, ...]] = []
    for fields in valid:
        data = encode_entry(fields, seq=size, prev=prev.hex(), log=log, ts=ts_str)
        lh = leaf_hash(data)
        for level, idx, h in cr.append(lh):
            if level:  # level 0 is the entry's own leaf_hash column
                node_rows.append((log, level, idx, h))
        entry_rows.append(
            (
                log,
                size,
                lh,
                data,
                ts,
                fields.decision,
                fields.reason,
                fields.tenant,
                fields.agent,
                fields.run,
            )
        )
        out.append((size, lh, data))
        prev = lh
        size += 1
    cp = Checkpoint(origin, size, cr.root())
    note = sign_checkpoint(cp, signer)
    return _Batch(entry_rows, node_rows, out, _Head(note, cp, prev, cr.hashes))


def _insert_batch(cur: Any, sql: _AppendSQL, log: str, batch: _Batch) -> list[Receipt]:
    """Insert the batch's rows (lock held); a :class:`Receipt` per entry."""
    cur.executemany(sql.entry.sql, batch.entry_rows)
    if batch.node_rows:
        cur.executemany(sql.node.sql, batch.node_rows)
    note = batch.head.note
    cur.execute(sql.checkpoint.sql, (log, batch.head.cp.size, note, _now_ms()))
    return [Receipt(q, lh, data, note) for q, lh, data in batch.leaves]
