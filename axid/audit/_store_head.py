"""The store's side of the authenticated head: lock the log, read its head, prove it.

Under the log lock, before anything is signed, the store proves that the
database's latest checkpoint is complete, signed by the log key, ends in the
stored last leaf and extends the trusted head (the last checkpoint this store
signed or verified). The checks themselves are pure, in :mod:`axid.audit.head`;
this module reads what they compare.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select

from axid.audit._store_engine import _compile_for, _DriverStmt
from axid.audit._store_errors import LogNotFound, StoreError
from axid.audit._store_nodes import _Nodes
from axid.audit._store_tables import _CP_T, _ENTRY_T, _LOG_T, _b
from axid.audit.entry import ZERO_HASH_HEX
from axid.audit.head import (
    IntegrityFailure,
    check_complete,
    check_extends,
    check_last_leaf,
    check_signed,
)
from axid.audit.merkle import HASH_SIZE, CompactRange, NodeGetter
from axid.audit.merkle import consistency_proof as _merkle_consistency_proof
from axid.audit.merkle import inclusion_proof as _merkle_inclusion_proof
from axid.audit.note import Checkpoint, NoteVerifier

_ZERO_HASH = bytes.fromhex(ZERO_HASH_HEX)


@dataclass(frozen=True, slots=True)
class _Head:
    """A trusted head: a checkpoint signed or verified by this store, and its tail.

    ``last_leaf`` and ``edge`` (the compact range) are known for heads this
    store computed itself; a head read from the head file has neither.
    """

    note: bytes
    cp: Checkpoint
    last_leaf: bytes | None
    edge: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _HeadSQL:
    """The locked transaction's reads, run on the driver's own cursor."""

    lock_log: _DriverStmt
    head: _DriverStmt
    latest_cp: _DriverStmt

    @classmethod
    def for_engine(cls, engine: Engine) -> _HeadSQL:
        lock = select(_LOG_T.c.origin, _LOG_T.c.vkey).where(_LOG_T.c.name == bindparam("name"))
        if engine.dialect.name == "postgresql":
            # Row lock on the log: appenders of this log queue here, other logs
            # don't. (SQLite: BEGIN IMMEDIATE already holds the write lock.)
            lock = lock.with_for_update()
        head = (
            select(_ENTRY_T.c.seq, _ENTRY_T.c.leaf_hash)
            .where(_ENTRY_T.c.log == bindparam("log"))
            .order_by(_ENTRY_T.c.seq.desc())
            .limit(1)
        )
        latest_cp = (
            select(_CP_T.c.note)
            .where(_CP_T.c.log == bindparam("log"))
            .order_by(_CP_T.c.size.desc())
            .limit(1)
        )
        return cls(
            lock_log=_compile_for(engine, lock),
            head=_compile_for(engine, head),
            latest_cp=_compile_for(engine, latest_cp),
        )


def _lock_and_check_key(cur: Any, sql: _HeadSQL, log: str, origin: str, vkey: str | None) -> None:
    """Take the log's lock (PostgreSQL; see _HeadSQL) and check its row names our key."""
    cur.execute(sql.lock_log.sql, sql.lock_log.params(name=log))
    row = cur.fetchone()
    if row is None:
        raise LogNotFound(f"no log {log!r} in this database (ensure_log first)")
    got_origin, got_vkey = row
    if got_origin != origin or got_vkey != vkey:
        # The log row names another key: someone re-keyed the log behind our back.
        raise IntegrityFailure("key", f"log {log!r} is registered with another key")


def _authenticated_head(
    conn: Connection,
    cur: Any,
    sql: _HeadSQL,
    nodes: _Nodes,
    verifier: NoteVerifier,
    trusted: _Head | None,
) -> _Head | None:
    """The database's head, proven to extend the trusted head (lock held).

    None for an empty log. Raises :class:`~axid.audit.head.IntegrityFailure`.
    O(log n) node reads; the signature is verified only when the latest
    checkpoint is not the one this store signed or verified last.
    """
    log = nodes.log
    cur.execute(sql.head.sql, sql.head.params(log=log))
    last = cur.fetchone()
    stored_size, last_leaf = (0, _ZERO_HASH) if last is None else (last[0] + 1, _b(last[1]))
    cur.execute(sql.latest_cp.sql, sql.latest_cp.params(log=log))
    row = cur.fetchone()
    note = None if row is None else _b(row[0])
    t = trusted
    if t is not None and note is not None and hmac.compare_digest(note, t.note):
        cp: Checkpoint | None = t.cp
    else:
        cp = check_signed(note, verifier, stored_size)
    if cp is None:
        check_extends(t.cp if t is not None else None, None, [])
        return None
    edge: list[bytes] = []
    check_complete(cp, stored_size, lambda: _stored_root(cur, nodes, cp, last_leaf, edge))
    own_tail = t is not None and t.cp.size == cp.size and t.last_leaf is not None
    if cp.size % 2 == 0 and not (own_tail and hmac.compare_digest(t.last_leaf, last_leaf)):
        # Odd sizes: the last leaf is on the right edge, covered by the root.
        n = cp.size
        proof = _stored_proof(conn, nodes, lambda g: _merkle_inclusion_proof(n - 1, n, g))
        check_last_leaf(cp, last_leaf, proof)
    proof = []
    if t is not None and 0 < t.cp.size < cp.size:
        m, n = t.cp.size, cp.size
        proof = _stored_proof(conn, nodes, lambda g: _merkle_consistency_proof(m, n, g))
    check_extends(t.cp if t is not None else None, cp, proof)
    return _Head(note, cp, last_leaf, tuple(edge))


def _stored_root(cur: Any, nodes: _Nodes, cp: Checkpoint, last_leaf: bytes, out: list) -> bytes:
    """The root of the stored tree of size ``cp.size`` from its right-edge nodes."""
    size = cp.size
    want: list[tuple[int, int]] = []  # one perfect node per set bit, largest first
    pos = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            want.append((level, pos >> level))
            pos += 1 << level
    got: dict[tuple[int, int], bytes] = {}
    if size & 1:
        got[(0, size - 1)] = last_leaf  # the lowest edge node is the last leaf itself
    upper = [(lv, i) for lv, i in want if lv > 0]
    if upper:
        for level, idx, h in nodes.read_raw(cur, upper):
            got[(int(level), int(idx))] = _b(h)
    missing = [c for c in want if c not in got or len(got[c]) != HASH_SIZE]
    if missing:
        raise IntegrityFailure("complete", f"stored tree nodes {missing} are missing")
    out.extend(got[c] for c in want)
    return CompactRange(size, out).root()


def _stored_proof(
    conn: Connection, nodes: _Nodes, plan: Callable[[NodeGetter], list[bytes]]
) -> list[bytes]:
    """A proof from the stored nodes; a missing or malformed node is an integrity failure."""
    try:
        return plan(nodes.prefetched(conn, plan))
    except (KeyError, StoreError) as e:
        raise IntegrityFailure("complete", f"stored tree node missing: {e}") from None
