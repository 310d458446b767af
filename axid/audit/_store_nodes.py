"""Merkle nodes as stored, and the inclusion and consistency proofs read from them.

Level-0 nodes are the entries' ``leaf_hash`` column; the node table holds
levels >= 1. The proof math is :mod:`axid.audit.merkle`'s; this module only
reads the nodes it visits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, select

from axid.audit._store_checkpoints import _Checkpoints
from axid.audit._store_engine import _compile_for, _DriverStmt
from axid.audit._store_errors import NotFound, StoreError
from axid.audit._store_tables import _ENTRY_T, _LEAVES_STMT, _NODE_T, _b, _nodes_stmt
from axid.audit.merkle import HASH_SIZE, NodeGetter
from axid.audit.merkle import consistency_proof as _merkle_consistency_proof
from axid.audit.merkle import inclusion_proof as _merkle_inclusion_proof

_PLACEHOLDER_HASH = bytes(HASH_SIZE)  # what a proof's dry run sees (see _Nodes.prefetched)


class _Nodes:
    """The stored nodes of one log (the compiled multi-node reads cached by size)."""

    __slots__ = ("_engine", "_raw_sql", "log")

    def __init__(self, engine: Engine, log: str) -> None:
        self._engine = engine
        self.log = log
        self._raw_sql: dict[int, _DriverStmt] = {}  # by number of nodes read

    def getter(self, conn: Connection) -> NodeGetter:
        """A getter reading one node per call."""
        log = self.log

        def get(level: int, idx: int) -> bytes:
            if level == 0:
                h = conn.execute(
                    select(_ENTRY_T.c.leaf_hash).where(_ENTRY_T.c.log == log, _ENTRY_T.c.seq == idx)
                ).scalar()
            else:
                h = conn.execute(
                    select(_NODE_T.c.hash).where(
                        _NODE_T.c.log == log, _NODE_T.c.level == level, _NODE_T.c.idx == idx
                    )
                ).scalar()
            if h is None:
                raise KeyError((level, idx))
            return _checked(h, level, idx)

        return get

    def read_raw(self, cur: Any, coords: Sequence[tuple[int, int]]) -> list[Any]:
        """:meth:`read` on the driver's cursor (the per-batch head check: SQLAlchemy's
        statement handling would cost more than SQLite's work)."""
        stmt = self._raw_sql.get(len(coords))
        if stmt is None:
            stmt = self._raw_sql[len(coords)] = _compile_for(self._engine, _nodes_stmt(len(coords)))
        cur.execute(stmt.sql, stmt.params(**self._params(coords)))
        return list(cur.fetchall())

    def read(self, conn: Connection, coords: Sequence[tuple[int, int]]) -> Any:
        """Rows ``(level, idx, hash)`` of the stored nodes at ``coords`` (levels >= 1)."""
        return conn.execute(_nodes_stmt(len(coords)), self._params(coords))

    def _params(self, coords: Sequence[tuple[int, int]]) -> dict[str, Any]:
        values: dict[str, Any] = {"log": self.log}
        for i, (level, idx) in enumerate(coords):
            values[f"lv{i}"] = level
            values[f"ix{i}"] = idx
        return values

    def prefetched(self, conn: Connection, plan: Callable[[NodeGetter], object]) -> NodeGetter:
        """A getter over the nodes ``plan`` reads, fetched in two queries, not one per node.

        Merkle proofs visit nodes by position only, never by value, so a dry run
        of ``plan`` with placeholder hashes lists exactly the nodes the real run
        reads. Any node the dry run missed is still read on its own (and a
        missing node still raises KeyError).
        """
        want: dict[tuple[int, int], None] = {}

        def record(level: int, idx: int) -> bytes:
            want[(level, idx)] = None
            return _PLACEHOLDER_HASH

        plan(record)
        leaves = [idx for level, idx in want if level == 0]
        upper = [(level, idx) for level, idx in want if level > 0]
        got: dict[tuple[int, int], Any] = {}
        if leaves:
            rows = conn.execute(_LEAVES_STMT, {"log": self.log, "seqs": leaves})
            for r in rows:
                got[(0, int(r.seq))] = r.leaf_hash
        if upper:
            for r in self.read(conn, upper):
                got[(int(r.level), int(r.idx))] = r.hash
        one_by_one = self.getter(conn)

        def get(level: int, idx: int) -> bytes:
            h = got.get((level, idx))
            if h is None:
                return one_by_one(level, idx)
            return _checked(h, level, idx)

        return get


def _checked(h: Any, level: int, idx: int) -> bytes:
    h = _b(h)
    if len(h) != HASH_SIZE:
        raise StoreError(f"stored node ({level}, {idx}) is not {HASH_SIZE} bytes")
    return h


def _inclusion_proof(
    nodes: _Nodes, cps: _Checkpoints, seq: int, size: int | None
) -> tuple[list[bytes], bytes]:
    """:meth:`LogStore.inclusion_proof <axid.audit.store.LogStore.inclusion_proof>`."""
    log = cps.log
    with cps.engine.connect() as conn:
        if size is None:
            cp = cps.latest(conn)
            if cp is None:
                raise NotFound(f"log {log!r} has no checkpoint yet")
            size, note = cp
        else:
            raw = cps.note_at(conn, size)
            if raw is None:
                raise NotFound(f"log {log!r} has no checkpoint at size {size}")
            note = raw
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < size:
            raise NotFound(f"entry {seq!r} is not in the tree of size {size}")
        n = size
        get = nodes.prefetched(conn, lambda g: _merkle_inclusion_proof(seq, n, g))
        return _merkle_inclusion_proof(seq, size, get), note


def _consistency_proof(nodes: _Nodes, cps: _Checkpoints, size1: int, size2: int) -> list[bytes]:
    """:meth:`LogStore.consistency_proof <axid.audit.store.LogStore.consistency_proof>`."""
    with cps.engine.connect() as conn:
        have = cps.tree_size(conn)
        if not 0 <= size1 <= size2 <= have:
            raise NotFound(f"no consistency proof for sizes {size1}, {size2} (log size {have})")
        if size1 == 0 or size1 == size2:
            return []
        get = nodes.prefetched(conn, lambda g: _merkle_consistency_proof(size1, size2, g))
        return _merkle_consistency_proof(size1, size2, get)
