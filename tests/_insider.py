"""An insider with write access to the log's database but not the log key.

Written from the DESIGN's description of the tables and the entry format, with
hashlib and rfc8785, not with the writer's code: what an attacker would script.
Every forgery here is self-consistent (hash chain, leaf hashes, tree nodes all
recomputed) so that only the signatures and the authenticated head can catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from axid.audit.store import make_engine

Entry = dict[str, Any]
ZERO = "0" * 64


def _ts_ms(ts: str) -> int:
    dt = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _nodes(leaves: list[bytes]) -> list[tuple[int, int, bytes]]:
    """Every perfect subtree hash of level >= 1 over ``leaves`` (RFC 6962)."""
    out: list[tuple[int, int, bytes]] = []
    layer, level = leaves, 0
    while len(layer) > 1:
        level += 1
        layer = [
            hashlib.sha256(b"\x01" + layer[2 * i] + layer[2 * i + 1]).digest()
            for i in range(len(layer) // 2)
        ]
        out += [(level, i, h) for i, h in enumerate(layer)]
    return out


def entries(url: str, log: str) -> list[Entry]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT data FROM axid_audit_entry WHERE log = :l ORDER BY seq"), {"l": log}
            ).all()
    finally:
        engine.dispose()
    return [json.loads(bytes(r[0])) for r in rows]


def checkpoints(url: str, log: str) -> list[bytes]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT note FROM axid_audit_checkpoint WHERE log = :l ORDER BY size"),
                {"l": log},
            ).all()
    finally:
        engine.dispose()
    return [bytes(r[0]) for r in rows]


def rewrite_tail(
    url: str,
    log: str,
    start: int,
    edit: Callable[[list[Entry]], list[Entry]],
    *,
    drop_checkpoints_after: int | None = None,
) -> None:
    """Replace entries ``start..`` by ``edit(them)``, re-chained, with every node recomputed.

    ``drop_checkpoints_after``: also delete the checkpoints of larger sizes.
    """
    old = entries(url, log)
    tail = edit([dict(e) for e in old[start:]])
    prev = _leaf(rfc8785.dumps(old[start - 1])).hex() if start else ZERO
    new: list[tuple[int, bytes, Entry]] = []
    for i, e in enumerate(tail):
        e = {**e, "seq": start + i, "prev": prev}
        data = rfc8785.dumps(e)
        new.append((start + i, data, e))
        prev = _leaf(data).hex()
    leaves = [_leaf(rfc8785.dumps(e)) for e in old[:start]] + [_leaf(d) for _, d, _ in new]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("DELETE FROM axid_audit_entry WHERE log = :l AND seq >= :s"),
                {"l": log, "s": start},
            )
            for seq, data, e in new:
                conn.execute(
                    text(
                        "INSERT INTO axid_audit_entry (log, seq, leaf_hash, data, ts, decision,"
                        " reason, tenant, agent, run) VALUES (:l, :q, :h, :d, :ts, :dec, :r,"
                        " :t, :a, :run)"
                    ),
                    {
                        "l": log, "q": seq, "h": _leaf(data), "d": data, "ts": _ts_ms(e["ts"]),
                        "dec": e["decision"], "r": e["reason"], "t": e.get("tenant"),
                        "a": e.get("agent"), "run": e.get("run"),
                    },
                )
            conn.execute(text("DELETE FROM axid_audit_node WHERE log = :l"), {"l": log})
            for level, idx, h in _nodes(leaves):
                conn.execute(
                    text("INSERT INTO axid_audit_node (log, level, idx, hash) "
                         "VALUES (:l, :v, :i, :h)"),
                    {"l": log, "v": level, "i": idx, "h": h},
                )
            if drop_checkpoints_after is not None:
                conn.execute(
                    text("DELETE FROM axid_audit_checkpoint WHERE log = :l AND size > :s"),
                    {"l": log, "s": drop_checkpoints_after},
                )
    finally:
        engine.dispose()


def append_signed_by(url: str, log: str, key: Ed25519PrivateKey, entry: Entry) -> None:
    """A second writer with its own key appends one entry and signs the new size."""
    old = entries(url, log)
    leaves = [_leaf(rfc8785.dumps(e)) for e in old]
    prev = leaves[-1].hex() if leaves else ZERO
    e = {**old[-1], **entry, "seq": len(old), "prev": prev}
    data = rfc8785.dumps(e)
    leaves.append(_leaf(data))
    root = _root(leaves)
    origin = f"axid/{log}"
    note = sign_checkpoint(Checkpoint(origin, len(leaves), root), NoteSigner(origin, key))
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO axid_audit_entry (log, seq, leaf_hash, data, ts, decision,"
                    " reason) VALUES (:l, :q, :h, :d, :ts, :dec, :r)"
                ),
                {"l": log, "q": e["seq"], "h": leaves[-1], "d": data, "ts": _ts_ms(e["ts"]),
                 "dec": e["decision"], "r": e["reason"]},
            )
            conn.execute(text("DELETE FROM axid_audit_node WHERE log = :l"), {"l": log})
            for level, idx, h in _nodes(leaves):
                conn.execute(
                    text("INSERT INTO axid_audit_node (log, level, idx, hash) "
                         "VALUES (:l, :v, :i, :h)"),
                    {"l": log, "v": level, "i": idx, "h": h},
                )
            conn.execute(
                text("INSERT INTO axid_audit_checkpoint (log, size, note, created_at) "
                     "VALUES (:l, :s, :n, 0)"),
                {"l": log, "s": len(leaves), "n": note},
            )
    finally:
        engine.dispose()


def _root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _root(leaves[:k]) + _root(leaves[k:])).digest()


def set_column(url: str, log: str, seq: int, column: str, value: str) -> None:
    """Edit one index column of one row, leaving the entry bytes alone."""
    assert column in ("decision", "reason", "tenant", "agent", "run")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"UPDATE axid_audit_entry SET {column} = :v WHERE log = :l AND seq = :q"),
                {"v": value, "l": log, "q": seq},
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- snapshots

_TABLES = ("axid_audit_entry", "axid_audit_node", "axid_audit_checkpoint")


class Snapshot:
    """An older copy of the log: a SQLite file copy, or PostgreSQL rows of the log."""

    def __init__(self, url: str, log: str, directory: Path) -> None:
        self.url, self.log = url, log
        self._file: Path | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {}
        if url.startswith("sqlite"):
            db = Path(url.split("///", 1)[1])
            self._file = directory / f"{db.name}.copy"
            src, dst = sqlite3.connect(db), sqlite3.connect(self._file)
            try:
                src.backup(dst)  # a consistent copy, WAL included
            finally:
                src.close()
                dst.close()
            return
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                for t in _TABLES:
                    rows = conn.execute(text(f"SELECT * FROM {t} WHERE log = :l"), {"l": log})
                    self._rows[t] = [dict(r._mapping) for r in rows]
        finally:
            engine.dispose()

    def restore(self) -> None:
        """Put the copy back in place (the file is swapped in, as a backup restore does)."""
        if self._file is not None:
            db = Path(self.url.split("///", 1)[1])
            tmp = db.with_name(db.name + ".restoring")
            tmp.write_bytes(self._file.read_bytes())
            os.replace(tmp, db)
            for suffix in ("-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
            return
        engine = make_engine(self.url)
        try:
            with engine.begin() as conn:
                for t in reversed(_TABLES):
                    conn.execute(text(f"DELETE FROM {t} WHERE log = :l"), {"l": self.log})
                for t in _TABLES:
                    for row in self._rows[t]:
                        cols = ", ".join(row)
                        vals = ", ".join(f":{c}" for c in row)
                        conn.execute(text(f"INSERT INTO {t} ({cols}) VALUES ({vals})"), row)
        finally:
            engine.dispose()
