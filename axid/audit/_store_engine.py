"""The decision-log store's engines: URLs, SQLite settings, write locks, driver statements.

Re-exported by :mod:`axid.audit.store`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlmodel import SQLModel

from axid.audit._store_errors import DatabaseURLError, StoreError
from axid.audit._store_tables import _LOG_T, _TABLES

__all__ = ["create_schema", "list_logs", "make_engine"]

_IMMEDIATE = "axid_sqlite_immediate"  # execution option: BEGIN IMMEDIATE on SQLite
# Serialises concurrent create_schema() calls on one PostgreSQL database
# (CREATE TABLE IF NOT EXISTS races on the catalog otherwise).
_PG_SCHEMA_LOCK = 0x41584944_41554454  # "AXIDAUDT"


def make_engine(url: str, *, lock_timeout: float = 30.0) -> Engine:
    """An engine for ``sqlite:///FILE`` or ``postgresql://...`` (psycopg 3).

    ``lock_timeout`` (seconds) bounds how long a writer waits for the log lock
    (SQLite ``busy_timeout``, PostgreSQL ``lock_timeout``) before failing.
    """
    if not isinstance(url, str) or not url:
        raise DatabaseURLError("database URL must be a non-empty string")
    if not (isinstance(lock_timeout, int | float) and 0 < lock_timeout < 86400):
        raise ValueError("lock_timeout must be a number of seconds in (0, 86400)")
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise DatabaseURLError("malformed database URL") from e
    backend, _, driver = u.drivername.partition("+")
    timeout_ms = max(1, int(lock_timeout * 1000))
    if backend == "sqlite":
        return _make_sqlite_engine(u, driver, timeout_ms)
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise DatabaseURLError(
                f"unsupported PostgreSQL driver {driver!r}: only psycopg 3 (postgresql://)"
            )
        return create_engine(
            u.set(drivername="postgresql+psycopg"),
            pool_pre_ping=True,
            connect_args={"options": f"-c lock_timeout={timeout_ms}"},
        )
    raise DatabaseURLError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


def _make_sqlite_engine(u: Any, driver: str, timeout_ms: int) -> Engine:
    if driver not in ("", "pysqlite"):
        raise DatabaseURLError(f"unsupported SQLite driver {driver!r}")
    db = u.database
    # Several processes share the log: it must be a real file, named plainly.
    if not db or db == ":memory:" or db.startswith("file:") or "mode=memory" in db:
        raise DatabaseURLError("SQLite needs a file: sqlite:///path/to/file.db (not :memory:)")
    if u.query or u.host or u.username or u.password or u.port:
        raise DatabaseURLError("SQLite URL takes only a file path: sqlite:///path/to/file.db")
    Path(db).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = create_engine(
        u.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": timeout_ms / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; we emit BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite refused WAL journal mode (got {mode!r})")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers lock the database before they read the head; readers do not lock.
        stmt = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN"
        # On the driver's cursor: through exec_driver_sql this cost ~40 µs of CPU
        # a transaction, more than SQLite's BEGIN. Its errors keep SQLAlchemy's
        # types (e.g. OperationalError for a lock timeout), as they had.
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(stmt)
        except sqlite3.Error as e:
            raise DBAPIError.instance(stmt, None, e, sqlite3.Error) from e
        finally:
            cur.close()

    return engine


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _write_conn(engine: Engine) -> Connection:
    conn = engine.connect()
    if _is_sqlite(engine):
        conn.execution_options(**{_IMMEDIATE: True})
    return conn


def create_schema(engine: Engine) -> None:
    """Create the audit tables if absent (safe to call from many processes)."""
    with _write_conn(engine) as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
        SQLModel.metadata.create_all(conn, tables=_TABLES, checkfirst=True)


def list_logs(engine: Engine) -> list[str]:
    """Names of the logs in this database, sorted."""
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(_LOG_T.c.name).order_by(_LOG_T.c.name))]


def log_with_origin(engine: Engine, origin: str) -> str | None:
    """The name of the first log (by name) whose stored origin is ``origin``, else None."""
    stmt = select(_LOG_T.c.name).where(_LOG_T.c.origin == origin).order_by(_LOG_T.c.name)
    with engine.connect() as conn:
        row = conn.execute(stmt.limit(1)).first()
    return None if row is None else str(row[0])


# --------------------------------------------------------------------------- driver statements


@dataclass(frozen=True, slots=True)
class _DriverStmt:
    """A SQLAlchemy statement compiled once to driver SQL with positional parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]

    def params(self, **values: Any) -> tuple[Any, ...]:
        return tuple(values[n] if n in values else self.defaults[n] for n in self.names)


def _compile_for(engine: Engine, stmt: Any, cols: tuple[str, ...] | None = None) -> _DriverStmt:
    """``stmt`` as driver SQL with positional parameters (in the order ``cols``, if given)."""
    dialect = engine.dialect
    if dialect.paramstyle != "qmark":
        # psycopg takes positional %s as well as %(name)s: compile for that.
        dialect = type(dialect)(paramstyle="format")
    c = stmt.compile(dialect=dialect)
    names = tuple(c.positiontup or ())
    if cols is not None and names != cols:  # pragma: no cover - schema drift
        raise StoreError(f"append statement parameters {names} are not {cols}")
    return _DriverStmt(str(c), names, dict(c.construct_params(_check=False)))


def _fetch_all(engine: Engine, stmt: _DriverStmt, params: tuple[Any, ...]) -> list[Any]:
    """Run a read on the driver's own cursor in a short transaction; all its rows.

    Driver errors are raised as SQLAlchemy's, as from the rest of the store.
    """
    dialect = engine.dialect
    db_error: type[Exception] = dialect.loaded_dbapi.Error
    with engine.connect() as conn:
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(stmt.sql, params)
            return list(cur.fetchall())
        except db_error as e:
            raise DBAPIError.instance(stmt.sql, params, e, db_error, dialect=dialect) from e
        finally:
            cur.close()
