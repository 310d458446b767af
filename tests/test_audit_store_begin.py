"""The SQLite engine's BEGIN, issued on the driver's cursor by the store's ``begin`` event:
writers lock at BEGIN, readers do not, and a lock timeout keeps SQLAlchemy's error type."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from axid.audit._store_engine import _write_conn
from axid.audit.store import create_schema, make_engine


def _engine(tmp_path: Path) -> tuple[Engine, Path]:
    path = tmp_path / "axid.db"
    eng = make_engine(f"sqlite:///{path}", lock_timeout=0.1)
    create_schema(eng)
    return eng, path


def _other_can_lock(path: Path) -> bool:
    """Whether another connection can take the write lock now."""
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    return True


def test_write_transaction_locks_at_begin_read_does_not(tmp_path: Path) -> None:
    eng, path = _engine(tmp_path)
    try:
        with _write_conn(eng) as conn, conn.begin():
            assert not _other_can_lock(path)  # BEGIN IMMEDIATE, before any statement
        assert _other_can_lock(path)  # committed: released
        with eng.connect() as conn, conn.begin():
            assert _other_can_lock(path)  # a plain BEGIN takes no lock
    finally:
        eng.dispose()


def test_lock_timeout_is_sqlalchemy_operational_error_and_engine_recovers(
    tmp_path: Path,
) -> None:
    eng, path = _engine(tmp_path)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError) as info, _write_conn(eng) as conn, conn.begin():
            pass
        assert isinstance(info.value.orig, sqlite3.OperationalError)
        assert "BEGIN IMMEDIATE" in str(info.value)
        holder.execute("ROLLBACK")
        with _write_conn(eng) as conn, conn.begin():  # the pool's connection is usable again
            assert not _other_can_lock(path)
    finally:
        holder.close()
        eng.dispose()
