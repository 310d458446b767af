"""Signed checkpoints as stored, and the witnesses' cosignature lines on them.

The log's own checkpoint note stays as signed (``axid_audit_checkpoint``);
a cosigned note is that note with the stored cosignature lines appended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, func, inspect, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from axid.audit._store_engine import _write_conn
from axid.audit._store_errors import StoreError
from axid.audit._store_tables import _COSIG_T, _COSIG_TABLE, _CP_T, _ENTRY_T, _b, _now_ms
from axid.audit.note import NoteError, _b64decode_strict, is_valid_key_name

__all__ = ["cosignature_key"]

_MAX_COSIG_LINE = 8192  # an ML-DSA-44 cosignature line is ~3.3 KB


class _Checkpoints:
    """The checkpoints and cosignatures of one log (and whether the cosignature table exists)."""

    __slots__ = ("_cosig_table", "engine", "log")

    def __init__(self, engine: Engine, log: str) -> None:
        self.engine = engine
        self.log = log
        self._cosig_table = False  # seen the cosignature table (see _has_cosignature_table)

    def tree_size(self, conn: Connection) -> int:
        """Number of committed entries."""
        last = conn.execute(
            select(func.max(_ENTRY_T.c.seq)).where(_ENTRY_T.c.log == self.log)
        ).scalar()
        return 0 if last is None else int(last) + 1

    def latest(self, conn: Connection) -> tuple[int, bytes] | None:
        """``(size, note)`` of the largest checkpoint, or None."""
        row = conn.execute(
            select(_CP_T.c.size, _CP_T.c.note)
            .where(_CP_T.c.log == self.log)
            .order_by(_CP_T.c.size.desc())
            .limit(1)
        ).first()
        return None if row is None else (int(row.size), _b(row.note))

    def note_at(self, conn: Connection, size: int) -> bytes | None:
        """The signed note at exactly ``size``, or None."""
        note = conn.execute(
            select(_CP_T.c.note).where(_CP_T.c.log == self.log, _CP_T.c.size == size)
        ).scalar()
        return None if note is None else _b(note)

    def pages(self, batch: int, *, cosigned: bool) -> Iterator[tuple[int, bytes]]:
        """Every ``(size, note)`` in increasing size; ``cosigned``: with its cosignature lines."""
        after = -1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(_CP_T.c.size, _CP_T.c.note)
                    .where(_CP_T.c.log == self.log, _CP_T.c.size > after)
                    .order_by(_CP_T.c.size)
                    .limit(batch)
                ).all()
                cosigs = (
                    self.cosignature_lines(conn, after + 1, int(rows[-1].size))
                    if cosigned and rows
                    else {}
                )
            for r in rows:
                size = int(r.size)
                yield size, _b(r.note) + b"".join(cosigs.get(size, []))
            if len(rows) < batch:
                return
            after = int(rows[-1].size)

    def cosigned_note(self, size: int) -> bytes | None:
        """The note of ``size`` with its cosignature lines appended, or None."""
        with self.engine.connect() as conn:
            note = self.note_at(conn, size)
            if note is None:
                return None
            lines = self.cosignature_lines(conn, size, size).get(size, [])
        return note + b"".join(lines)

    def add_cosignatures(self, size: int, lines: Sequence[bytes | str]) -> None:
        """Insert the lines' rows; a line by a key that already cosigned ``size`` is ignored."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"invalid checkpoint size {size!r}")
        now = _now_ms()
        rows: list[dict[str, object]] = []
        for line in lines:
            raw = line.encode("utf-8") if isinstance(line, str) else bytes(line)
            name, key_id = cosignature_key(raw)
            row = {"log": self.log, "size": size, "witness": name, "key_id": key_id}
            rows.append({**row, "line": raw, "created_at": now})
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            stmt: Any = sqlite_insert(_COSIG_T).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = pg_insert(_COSIG_T).on_conflict_do_nothing()
        else:  # pragma: no cover - make_engine only builds the two above
            raise StoreError(f"unsupported dialect {dialect}")
        with _write_conn(self.engine) as conn, conn.begin():
            conn.execute(stmt, rows)

    def cosigned_sizes(self) -> dict[tuple[str, str], int]:
        """The largest size each witness key, ``(name, key ID hex)``, cosigned."""
        with self.engine.connect() as conn:
            if not self._has_cosignature_table(conn):
                return {}
            t = _COSIG_T.c
            rows = conn.execute(
                select(t.witness, t.key_id, func.max(t.size))
                .where(t.log == self.log)
                .group_by(t.witness, t.key_id)
            ).all()
        return {(str(w), str(k)): int(n) for w, k, n in rows}

    def cosignature_lines(self, conn: Connection, lo: int, hi: int) -> dict[int, list[bytes]]:
        """Stored cosignature lines of the checkpoints with sizes in ``[lo, hi]``."""
        if not self._has_cosignature_table(conn):
            return {}  # a database from before witnessing, read by an auditor
        t = _COSIG_T.c
        rows = conn.execute(
            select(t.size, t.line)
            .where(t.log == self.log, t.size >= lo, t.size <= hi)
            .order_by(t.size, t.witness, t.key_id)
        ).all()
        out: dict[int, list[bytes]] = {}
        for r in rows:
            out.setdefault(int(r.size), []).append(_b(r.line))
        return out

    def _has_cosignature_table(self, conn: Connection) -> bool:
        # Readers never create tables; once seen, the table stays.
        if not self._cosig_table:
            self._cosig_table = inspect(conn).has_table(_COSIG_TABLE)
        return self._cosig_table


def cosignature_key(line: bytes) -> tuple[str, str]:
    """``(key name, key ID hex)`` of one signature line ``— name base64\\n``.

    Checks the form only (one line, newline-terminated, a valid key name,
    canonical base64 of at least a key ID and a byte), not the signature.
    """
    if not isinstance(line, bytes) or len(line) > _MAX_COSIG_LINE:
        raise StoreError("a cosignature line must be at most 8192 bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError("a cosignature line must be UTF-8") from None
    if not text.startswith("\u2014 ") or not text.endswith("\n") or "\n" in text[:-1]:
        raise StoreError("a cosignature line is '\u2014 name base64' and one newline")
    name, sep, b64 = text[2:-1].partition(" ")
    if not sep or not is_valid_key_name(name):
        raise StoreError("a cosignature line needs a valid key name")
    try:
        raw = _b64decode_strict(b64, "cosignature line")
    except NoteError as e:
        raise StoreError(str(e)) from None
    if len(raw) < 5:
        raise StoreError("a cosignature line's signature is too short")
    return name, raw[:4].hex()
