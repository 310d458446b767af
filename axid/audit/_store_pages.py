"""Reading a log's entries: seq-range pages (verification, export) and filtered queries.

Pages are read on the driver's own cursor, one short transaction each, so a
long read neither pays SQLAlchemy's per-row work nor pins a database snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from sqlalchemy import Engine, bindparam, select

from axid.audit._store_engine import _compile_for, _DriverStmt, _fetch_all
from axid.audit._store_tables import _ENTRY_T, _b

_MAX_BIGINT = 2**63 - 1
_COL0, _COL1, _COL2 = itemgetter(0), itemgetter(1), itemgetter(2)

_Rows = list[Any]


class _EntryPages:
    """The entries of one log, read by seq range or by filter (the range statement cached)."""

    __slots__ = ("_engine", "_entries_sql", "_log")

    def __init__(self, engine: Engine, log: str) -> None:
        self._engine = engine
        self._log = log
        self._entries_sql: _DriverStmt | None = None

    def entry_pages(self, start: int, end: int | None, batch: int) -> Iterator[_Rows]:
        """Pages of ``(seq, data, leaf_hash)``; ``start`` may be negative."""
        if (end is not None and end < start) or batch < 1:
            raise ValueError("invalid entries range")
        return self._pages(self._read_sql(), start, _end(end), batch, _as_entry_rows)

    def indexed_entry_pages(self, start: int, end: int | None, batch: int) -> Iterator[_Rows]:
        """Pages of ``(seq, data, leaf_hash, decision, reason, tenant, agent, run, ts)``."""
        if (end is not None and end < start) or batch < 1:
            raise ValueError("invalid entries range")
        t = _ENTRY_T.c
        cols = (t.seq, t.data, t.leaf_hash, t.decision, t.reason, t.tenant, t.agent, t.run, t.ts)
        stmt = _compile_for(self._engine, _range_select(*cols))
        return self._pages(stmt, start, _end(end), batch, _as_indexed_rows)

    def _pages(
        self, stmt: _DriverStmt, nxt: int, end: int, batch: int, fix: Callable[[_Rows], _Rows]
    ) -> Iterator[_Rows]:
        while nxt < end:
            rows = _fetch_all(
                self._engine, stmt, stmt.params(log=self._log, lo=nxt, hi=end, n=batch)
            )
            if not rows:
                return
            # The drivers give int and bytes; anything else (a value of another
            # type written into a column behind our back) is converted by ``fix``.
            if (
                set(map(type, map(_COL0, rows))) != {int}
                or set(map(type, map(_COL1, rows))) != {bytes}
                or set(map(type, map(_COL2, rows))) != {bytes}
            ):
                rows = fix(rows)
            yield rows
            if len(rows) < batch:
                return
            nxt = rows[-1][0] + 1

    def _read_sql(self) -> _DriverStmt:
        if self._entries_sql is None:
            t = _ENTRY_T.c
            self._entries_sql = _compile_for(
                self._engine, _range_select(t.seq, t.data, t.leaf_hash)
            )
        return self._entries_sql

    def query(
        self,
        decision: str | None,
        tenant: str | None,
        agent: str | None,
        run: str | None,
        since_ms: int | None,
        limit: int | None,
        batch: int,
    ) -> Iterator[bytes]:
        """Entry bytes matching every given filter, in seq order (a generator: checks lazily)."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        conds = [_ENTRY_T.c.log == self._log]
        for col, val in (
            ("decision", decision),
            ("tenant", tenant),
            ("agent", agent),
            ("run", run),
        ):
            if val is not None:
                conds.append(_ENTRY_T.c[col] == val)
        if since_ms is not None:
            conds.append(_ENTRY_T.c.ts >= since_ms)
        left = limit
        after = -1
        while left is None or left > 0:
            n = batch if left is None else min(batch, left)
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(_ENTRY_T.c.seq, _ENTRY_T.c.data)
                    .where(*conds, _ENTRY_T.c.seq > after)
                    .order_by(_ENTRY_T.c.seq)
                    .limit(n)
                ).all()
            for r in rows:
                yield _b(r.data)
            if len(rows) < n:
                return
            after = int(rows[-1].seq)
            if left is not None:
                left -= len(rows)


def _range_select(*cols: Any) -> Any:
    t = _ENTRY_T.c
    return (
        select(*cols)
        .where(t.log == bindparam("log"), t.seq >= bindparam("lo"), t.seq < bindparam("hi"))
        .order_by(t.seq)
        .limit(bindparam("n"))
    )


def _end(end: int | None) -> int:
    return _MAX_BIGINT if end is None else end


def _as_entry_rows(rows: _Rows) -> _Rows:
    return [(int(q), _b(d), _b(h)) for q, d, h in rows]


def _as_indexed_rows(rows: _Rows) -> _Rows:
    # The auditor compares the columns with the entry bytes: only seq, data
    # and leaf_hash are converted, the rest stay exactly as the driver gives them.
    return [(int(r[0]), _raw_bytes(r[1]), _raw_bytes(r[2]), *r[3:]) for r in rows]


def _raw_bytes(value: Any) -> bytes:
    """A binary column's value as bytes; text (written behind the log's back) as UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8")
