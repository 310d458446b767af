"""Decision-log storage: SQLModel tables, append-only batches, proofs, log keys.

Synchronous (SQLAlchemy Core); the asyncio group-commit appender in
:mod:`axid.audit.log` runs it in a worker thread.

Invariants the code keeps:

- Rows are only ever inserted. No statement in this module changes or
  removes a row, so a committed entry, node or checkpoint is final.
- Every :meth:`LogStore.append_batch` is ONE transaction that inserts the
  batch's entries, the perfect Merkle nodes they complete and the signed
  checkpoint of the new size. A crash at any point leaves either all of it or
  none of it.
- Appends are sequenced under a database lock taken before the head is read
  (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a row lock, ``with_for_update()``,
  on the log's row), so several processes or hosts appending to one log
  produce one linear chain. The primary key (log, seq) makes any fork an integrity error.
- Level-0 Merkle nodes are the entries' ``leaf_hash`` column; the node table
  holds levels >= 1 only (one row fewer per entry, same O(log n) proofs).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlmodel import Field, SQLModel

from axid.audit.entry import ZERO_HASH_HEX, DecisionFields, EntryError, encode_entry, format_ts
from axid.audit.head import (
    IntegrityFailure,
    check_complete,
    check_extends,
    check_last_leaf,
    check_signed,
)
from axid.audit.merkle import (
    HASH_SIZE,
    CompactRange,
    NodeGetter,
    leaf_hash,
)
from axid.audit.merkle import (
    consistency_proof as _merkle_consistency_proof,
)
from axid.audit.merkle import (
    inclusion_proof as _merkle_inclusion_proof,
)
from axid.audit.note import (
    Checkpoint,
    NoteError,
    NoteSigner,
    _b64decode_strict,
    is_valid_key_name,
    open_checkpoint,
    sign_checkpoint,
)
from axid.audit.receipt import Receipt
from axid.keys import KeyringError, read_private_key_file, write_private_key_file

__all__ = [
    "KEY_PASSPHRASE_ENV",
    "LOG_NAME_RE",
    "PROOF_HEADER",
    "AuditCheckpoint",
    "AuditCosignature",
    "AuditEntry",
    "AuditLog",
    "AuditNode",
    "DatabaseURLError",
    "LogKeyError",
    "LogKeyMismatch",
    "LogNameError",
    "LogNotFound",
    "LogStore",
    "NotFound",
    "StoreError",
    "consistency_text",
    "cosignature_key",
    "create_schema",
    "generate_log_key",
    "list_logs",
    "load_log_key",
    "make_engine",
    "origin_for",
    "proof_text",
    "validate_log_name",
]

LOG_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KEY_PASSPHRASE_ENV = "AXID_KEY_PASSPHRASE"  # noqa: S105 - an env var name, not a secret
PROOF_HEADER = "c2sp.org/tlog-proof@v1"
_ORIGIN_PREFIX = "axid/"
_IMMEDIATE = "axid_sqlite_immediate"  # execution option: BEGIN IMMEDIATE on SQLite
# Serialises concurrent create_schema() calls on one PostgreSQL database
# (CREATE TABLE IF NOT EXISTS races on the catalog otherwise).
_PG_SCHEMA_LOCK = 0x41584944_41554454  # "AXIDAUDT"
_PLACEHOLDER_HASH = bytes(HASH_SIZE)  # what a proof's dry run sees (see _prefetched)
_ZERO_HASH = bytes.fromhex(ZERO_HASH_HEX)
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """The decision-log storage cannot do what was asked (bad state, bad input)."""


class DatabaseURLError(StoreError, ValueError):
    """The database URL is not one this store accepts."""


class LogNameError(StoreError, ValueError):
    """A log name is not ``[a-z0-9][a-z0-9._-]{0,63}``."""


class NotFound(StoreError, LookupError):
    """A log, entry or checkpoint that was asked for does not exist."""


class LogNotFound(NotFound):
    """No ``axid_audit_log`` row for this log name."""


class LogKeyMismatch(StoreError):
    """The log exists with a different verifier key (one log, one key)."""


class LogKeyError(ValueError):
    """A log signing key file is missing, unsafe, unreadable or not Ed25519."""


# --------------------------------------------------------------------------- schema


class AuditLog(SQLModel, table=True):
    """One row per log sharing the database."""

    __tablename__ = "axid_audit_log"

    name: str = Field(primary_key=True, max_length=64)
    origin: str
    vkey: str
    created_at: int = Field(sa_type=BigInteger)  # unix ms


class AuditEntry(SQLModel, table=True):
    """One decision; ``data`` holds exactly the bytes that were hashed."""

    __tablename__ = "axid_audit_entry"
    __table_args__ = (
        Index("ix_axid_audit_entry_log_ts", "log", "ts"),
        Index("ix_axid_audit_entry_log_decision", "log", "decision"),
        Index("ix_axid_audit_entry_log_tenant", "log", "tenant"),
        Index("ix_axid_audit_entry_log_agent", "log", "agent"),
        Index("ix_axid_audit_entry_log_run", "log", "run"),
    )

    log: str = Field(primary_key=True, max_length=64, foreign_key="axid_audit_log.name")
    seq: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    leaf_hash: bytes = Field(sa_type=LargeBinary)
    data: bytes = Field(sa_type=LargeBinary)
    # Filter copies of fields inside ``data`` (for ``axid audit show``); never trusted
    # by verification, which re-parses ``data``.
    ts: int = Field(sa_type=BigInteger)  # unix ms
    decision: str
    reason: str
    tenant: str | None = None
    agent: str | None = None
    run: str | None = None


class AuditNode(SQLModel, table=True):
    """A perfect Merkle subtree hash, level >= 1 (level 0 is ``AuditEntry.leaf_hash``)."""

    __tablename__ = "axid_audit_node"

    log: str = Field(primary_key=True, max_length=64, foreign_key="axid_audit_log.name")
    level: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idx: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    hash: bytes = Field(sa_type=LargeBinary)


class AuditCheckpoint(SQLModel, table=True):
    """The signed checkpoint note written at the end of each commit batch."""

    __tablename__ = "axid_audit_checkpoint"

    log: str = Field(primary_key=True, max_length=64, foreign_key="axid_audit_log.name")
    size: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    note: bytes = Field(sa_type=LargeBinary)
    created_at: int = Field(sa_type=BigInteger)  # unix ms


class AuditCosignature(SQLModel, table=True):
    """A witness's cosignature line on one checkpoint (C2SP tlog-cosignature).

    ``line`` is the exact signature line, newline included; ``witness`` and
    ``key_id`` (8 hex digits) are its key name and key ID. One line per key and
    checkpoint: a later cosignature by the same key on the same checkpoint is
    not stored. The log's own checkpoint note stays as signed, in
    :class:`AuditCheckpoint`; the cosigned note is that note with these lines
    appended (see :meth:`LogStore.cosigned_note`).
    """

    __tablename__ = "axid_audit_cosignature"
    __table_args__ = (
        ForeignKeyConstraint(
            ["log", "size"], ["axid_audit_checkpoint.log", "axid_audit_checkpoint.size"]
        ),
    )

    log: str = Field(primary_key=True, max_length=64)
    size: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    witness: str = Field(primary_key=True)
    key_id: str = Field(primary_key=True, max_length=8)
    line: bytes = Field(sa_type=LargeBinary)
    created_at: int = Field(sa_type=BigInteger)  # unix ms


_LOG_T: Any = AuditLog.__table__
_ENTRY_T: Any = AuditEntry.__table__
_NODE_T: Any = AuditNode.__table__
_CP_T: Any = AuditCheckpoint.__table__
_COSIG_T: Any = AuditCosignature.__table__
_TABLES = [_LOG_T, _ENTRY_T, _NODE_T, _CP_T, _COSIG_T]
_COSIG_TABLE = "axid_audit_cosignature"
_MAX_COSIG_LINE = 8192  # an ML-DSA-44 cosignature line is ~3.3 KB


# Statements built once (building SQLAlchemy expressions costs more than running them).
_LEAVES_STMT = select(_ENTRY_T.c.seq, _ENTRY_T.c.leaf_hash).where(
    _ENTRY_T.c.log == bindparam("log"), _ENTRY_T.c.seq.in_(bindparam("seqs", expanding=True))
)


@functools.lru_cache(maxsize=128)
def _nodes_stmt(n: int) -> Any:
    """SELECT of ``n`` nodes of one log by primary key (params log, lv<i>, ix<i>)."""
    # The log goes into every OR term: with "log = ? AND (... OR ...)" SQLite
    # reads the index by log alone, i.e. scans every node of the log.
    t = _NODE_T.c
    return select(t.level, t.idx, t.hash).where(
        or_(
            *(
                and_(
                    t.log == bindparam("log"),
                    t.level == bindparam(f"lv{i}"),
                    t.idx == bindparam(f"ix{i}"),
                )
                for i in range(n)
            )
        )
    )


# --------------------------------------------------------------------------- names


def validate_log_name(log: object) -> str:
    """Return ``log`` if it is a valid log name (``[a-z0-9][a-z0-9._-]{0,63}``)."""
    if not isinstance(log, str) or not LOG_NAME_RE.fullmatch(log):
        raise LogNameError(f"invalid log name {log!r}: want [a-z0-9][a-z0-9._-]{{0,63}}")
    return log


def origin_for(log: str) -> str:
    """The checkpoint origin (and note key name) of log ``log``: ``axid/<log>``."""
    return _ORIGIN_PREFIX + validate_log_name(log)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- engine


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
        if conn.get_execution_options().get(_IMMEDIATE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

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


# --------------------------------------------------------------------------- store


# Row layouts of the append path's executemany calls (checked against the
# compiled statements in _AppendSQL.for_engine).
_ENTRY_COLS = (
    "log",
    "seq",
    "leaf_hash",
    "data",
    "ts",
    "decision",
    "reason",
    "tenant",
    "agent",
    "run",
)
_NODE_COLS = ("log", "level", "idx", "hash")
_CP_COLS = ("log", "size", "note", "created_at")


@dataclass(frozen=True, slots=True)
class _DriverStmt:
    """A SQLAlchemy statement compiled once to driver SQL with positional parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]

    def params(self, **values: Any) -> tuple[Any, ...]:
        return tuple(values[n] if n in values else self.defaults[n] for n in self.names)


@dataclass(frozen=True, slots=True)
class _AppendSQL:
    """The per-batch append path's statements, run on the driver's own cursor."""

    entry: _DriverStmt
    node: _DriverStmt
    checkpoint: _DriverStmt
    lock_log: _DriverStmt
    head: _DriverStmt
    latest_cp: _DriverStmt

    @classmethod
    def for_engine(cls, engine: Engine) -> _AppendSQL:
        dialect = engine.dialect
        if dialect.paramstyle != "qmark":
            # psycopg takes positional %s as well as %(name)s: compile for that.
            dialect = type(dialect)(paramstyle="format")

        def compiled(stmt: Any, cols: tuple[str, ...] | None = None) -> _DriverStmt:
            c = stmt.compile(dialect=dialect)
            names = tuple(c.positiontup or ())
            if cols is not None and names != cols:  # pragma: no cover - schema drift
                raise StoreError(f"append statement parameters {names} are not {cols}")
            return _DriverStmt(str(c), names, dict(c.construct_params(_check=False)))

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
        return cls(
            entry=compiled(insert(_ENTRY_T), _ENTRY_COLS),
            node=compiled(insert(_NODE_T), _NODE_COLS),
            checkpoint=compiled(insert(_CP_T), _CP_COLS),
            lock_log=compiled(lock),
            head=compiled(head),
            latest_cp=compiled(
                select(_CP_T.c.note)
                .where(_CP_T.c.log == bindparam("log"))
                .order_by(_CP_T.c.size.desc())
                .limit(1)
            ),
        )


def _compile_for(engine: Engine, stmt: Any) -> _DriverStmt:
    """A read statement as driver SQL with positional parameters (as _AppendSQL's)."""
    dialect = engine.dialect
    if dialect.paramstyle != "qmark":
        dialect = type(dialect)(paramstyle="format")
    c = stmt.compile(dialect=dialect)
    return _DriverStmt(str(c), tuple(c.positiontup or ()), dict(c.construct_params(_check=False)))


_MAX_BIGINT = 2**63 - 1
_COL0, _COL1, _COL2 = itemgetter(0), itemgetter(1), itemgetter(2)


def _b(value: Any) -> bytes:
    # Drivers may hand back memoryview/bytearray for binary columns.
    return bytes(value)


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


def _sqlite_file_id(engine: Engine) -> tuple[int, int] | None:
    if not _is_sqlite(engine) or not engine.url.database:
        return None
    try:
        st = os.stat(engine.url.database)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class LogStore:
    """One log in a database: append batches, read entries, checkpoints and proofs."""

    def __init__(self, engine: Engine, log: str, *, signer: NoteSigner | None = None) -> None:
        self._engine = engine
        self.log = validate_log_name(log)
        self.origin = origin_for(log)
        if signer is not None:
            if not isinstance(signer, NoteSigner):
                raise TypeError("signer must be a NoteSigner")
            if signer.name != self.origin:
                raise StoreError(f"signer key name {signer.name!r} is not {self.origin!r}")
        self._signer = signer
        self._signer_vkey = signer.vkey() if signer is not None else None
        self._sql = _AppendSQL.for_engine(engine)
        self._entries_sql: _DriverStmt | None = None
        self._nodes_sql: dict[int, _DriverStmt] = {}  # by number of nodes read
        self._verifier = signer.verifier() if signer is not None else None
        # The authenticated head (see axid.audit.head): the last checkpoint this
        # store signed or verified. Every batch proves the database extends it.
        self._trusted: _Head | None = None
        self._failure: IntegrityFailure | None = None  # sticky: until restart
        self.integrity_failures = 0
        self._file_id = _sqlite_file_id(engine)
        self._cosig_table = False  # seen the cosignature table (see _has_cosignature_table)

    @property
    def engine(self) -> Engine:
        return self._engine

    # ------------------------------------------------------------------ log row

    def ensure_log(self, origin: str, vkey: str) -> None:
        """Create this log's row if absent; refuse an existing log with another key."""
        if origin != self.origin:
            raise StoreError(f"origin {origin!r} is not {self.origin!r} for log {self.log!r}")
        if not isinstance(vkey, str) or not vkey:
            raise StoreError("vkey must be a non-empty string")
        row = {"name": self.log, "origin": origin, "vkey": vkey, "created_at": _now_ms()}
        dialect = self._engine.dialect.name
        if dialect == "sqlite":
            stmt: Any = sqlite_insert(_LOG_T).values(row).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = pg_insert(_LOG_T).values(row).on_conflict_do_nothing()
        else:  # pragma: no cover - make_engine only builds the two above
            raise StoreError(f"unsupported dialect {dialect}")
        with _write_conn(self._engine) as conn, conn.begin():
            conn.execute(stmt)
            got = conn.execute(
                select(_LOG_T.c.origin, _LOG_T.c.vkey).where(_LOG_T.c.name == self.log)
            ).one()
        if got.origin != origin:
            raise LogKeyMismatch(f"log {self.log!r} exists with origin {got.origin!r}")
        if got.vkey != vkey:
            raise LogKeyMismatch(
                f"log {self.log!r} exists with another key ({got.vkey}); one log, one key"
            )

    def vkey(self) -> str:
        """The log's verifier key (``name+keyid+base64``)."""
        with self._engine.connect() as conn:
            v = conn.execute(select(_LOG_T.c.vkey).where(_LOG_T.c.name == self.log)).scalar()
        if v is None:
            raise LogNotFound(f"no log {self.log!r} in this database")
        return str(v)

    def list_logs(self) -> list[str]:
        return list_logs(self._engine)

    # ------------------------------------------------------------------ append

    def append_batch(self, items: Sequence[DecisionFields]) -> list[Receipt]:
        """Append entries in one transaction; return a :class:`Receipt` per item.

        The transaction takes the log lock, reads the head, inserts the entries,
        the perfect nodes they complete and the signed checkpoint of the new
        size, and commits. Raises (and commits nothing) on any error; an
        :class:`~axid.audit.entry.EntryError` if an item is not a
        :class:`~axid.audit.entry.DecisionFields`. Those were checked when they
        were made (the group-commit appender makes one per caller before
        queueing it, so a malformed decision fails that caller alone): here
        they are only completed with the log's fields and serialised.
        """
        if self._signer is None or self._signer_vkey is None:
            raise StoreError("this LogStore has no signing key: cannot append")
        if not items:
            return []
        # Before taking the lock: a bad item costs no transaction.
        valid = list(items)
        if not all(type(f) is DecisionFields for f in valid):
            raise EntryError("append_batch takes DecisionFields")
        if self._failure is not None:
            raise self._failure
        self._reconnect_if_replaced()
        # The driver's own cursor, inside SQLAlchemy's transaction: per statement,
        # SQLAlchemy's result and parameter handling cost more than SQLite's work.
        # (Driver errors propagate as they are.) If the commit fails, the trusted
        # head stays: a commit that did happen is then proven like another writer's.
        with self._locked() as (conn, cur):
            out, head = self._append_locked(conn, cur, valid, self._signer)
        self._trusted = head
        return out

    def authenticate(self, head_note: bytes | None, *, required: bool = False) -> bytes | None:
        """Prove, under the log lock, that the database extends ``head_note``.

        ``head_note`` is the head file's signed checkpoint (None: no file yet,
        a first use, unless ``required``). On success the database's latest
        checkpoint becomes the trusted head and is returned (to be written to
        the head file). On failure every later append raises
        :class:`~axid.audit.head.IntegrityFailure`.
        """
        if self._verifier is None:
            raise StoreError("this LogStore has no signing key: cannot authenticate")
        if self._failure is not None:
            raise self._failure
        if head_note is None and required:
            self._fail(IntegrityFailure("head", "the head file is missing (head_required)"))
        if head_note is not None:
            try:
                cp = open_checkpoint(head_note, [self._verifier], origin=self.origin)
            except NoteError as e:
                self._fail(IntegrityFailure("head", f"the head file does not verify: {e}"))
            self._trusted = _Head(head_note, cp, None, ())
        with self._locked() as (conn, cur):
            self._lock_and_check_key(cur)
            head = self._authenticated_head(conn, cur)
        self._trusted = head
        return None if head is None else head.note

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[Connection, Any]]:
        """A write transaction and the driver's cursor; integrity failures become sticky."""
        try:
            with _write_conn(self._engine) as conn, conn.begin():
                cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    yield conn, cur
                finally:
                    cur.close()
        except IntegrityFailure as e:
            self._fail(e)

    def refuse(self, e: IntegrityFailure) -> None:
        """Record an integrity failure found outside the store (e.g. a bad head file)."""
        with contextlib.suppress(IntegrityFailure):
            self._fail(e)

    def _fail(self, e: IntegrityFailure) -> NoReturn:
        if self._failure is None:
            self._failure = e
            self.integrity_failures += 1
            _log.error(
                "decision log %s: integrity check %r failed: %s; nothing is signed or "
                "appended until an operator has looked and restarted the process",
                self.log,
                e.check,
                e.detail,
            )
        raise self._failure

    def _reconnect_if_replaced(self) -> None:
        # A SQLite file replaced under a running writer (a restored copy): pooled
        # connections would go on writing to the old file. Reconnect, so that the
        # head checks see what is at the path now.
        if not _is_sqlite(self._engine):
            return
        now = _sqlite_file_id(self._engine)
        if self._file_id is None:
            self._file_id = now  # the file did not exist when this store was made
        elif now != self._file_id:
            _log.warning("decision log %s: the database file was replaced; reconnecting", self.log)
            self._engine.dispose()
            self._file_id = now

    def _append_locked(
        self, conn: Connection, cur: Any, valid: list[DecisionFields], signer: NoteSigner
    ) -> tuple[list[Receipt], _Head]:
        """:meth:`append_batch` inside its transaction; returns (receipts, new head)."""
        self._lock_and_check_key(cur)
        head = self._authenticated_head(conn, cur)
        if head is None:
            size, prev, cr = 0, _ZERO_HASH, CompactRange()
        else:
            size, prev, cr = head.cp.size, head.last_leaf, CompactRange(head.cp.size, head.edge)
        log = self.log
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
        cp = Checkpoint(self.origin, size, cr.root())
        note = sign_checkpoint(cp, signer)
        sql = self._sql
        cur.executemany(sql.entry.sql, entry_rows)
        if node_rows:
            cur.executemany(sql.node.sql, node_rows)
        cur.execute(sql.checkpoint.sql, (log, size, note, _now_ms()))
        receipts = [Receipt(q, lh, data, note) for q, lh, data in out]
        return receipts, _Head(note, cp, prev, cr.hashes)

    def _lock_and_check_key(self, cur: Any) -> None:
        # Takes the log's lock on PostgreSQL (see _AppendSQL).
        stmt = self._sql.lock_log
        cur.execute(stmt.sql, stmt.params(name=self.log))
        row = cur.fetchone()
        if row is None:
            raise LogNotFound(f"no log {self.log!r} in this database (ensure_log first)")
        origin, vkey = row
        if origin != self.origin or vkey != self._signer_vkey:
            # The log row names another key: someone re-keyed the log behind our back.
            raise IntegrityFailure("key", f"log {self.log!r} is registered with another key")

    def _authenticated_head(self, conn: Connection, cur: Any) -> _Head | None:
        """The database's head, proven to extend the trusted head (lock held).

        None for an empty log. Raises :class:`~axid.audit.head.IntegrityFailure`.
        O(log n) node reads; the signature is verified only when the latest
        checkpoint is not the one this store signed or verified last.
        """
        assert self._verifier is not None
        sql = self._sql
        cur.execute(sql.head.sql, sql.head.params(log=self.log))
        last = cur.fetchone()
        stored_size, last_leaf = (0, _ZERO_HASH) if last is None else (last[0] + 1, _b(last[1]))
        cur.execute(sql.latest_cp.sql, sql.latest_cp.params(log=self.log))
        row = cur.fetchone()
        note = None if row is None else _b(row[0])
        t = self._trusted
        if t is not None and note is not None and hmac.compare_digest(note, t.note):
            cp: Checkpoint | None = t.cp
        else:
            cp = check_signed(note, self._verifier, stored_size)
        if cp is None:
            check_extends(t.cp if t is not None else None, None, [])
            return None
        edge: list[bytes] = []
        check_complete(cp, stored_size, lambda: self._stored_root(cur, cp, last_leaf, edge))
        own_tail = t is not None and t.cp.size == cp.size and t.last_leaf is not None
        if cp.size % 2 == 0 and not (own_tail and hmac.compare_digest(t.last_leaf, last_leaf)):
            # Odd sizes: the last leaf is on the right edge, covered by the root.
            n = cp.size
            proof = self._proof(conn, lambda g: _merkle_inclusion_proof(n - 1, n, g))
            check_last_leaf(cp, last_leaf, proof)
        proof = []
        if t is not None and 0 < t.cp.size < cp.size:
            m, n = t.cp.size, cp.size
            proof = self._proof(conn, lambda g: _merkle_consistency_proof(m, n, g))
        check_extends(t.cp if t is not None else None, cp, proof)
        return _Head(note, cp, last_leaf, tuple(edge))

    def _stored_root(self, cur: Any, cp: Checkpoint, last_leaf: bytes, out: list) -> bytes:
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
            for level, idx, h in self._read_nodes_raw(cur, upper):
                got[(int(level), int(idx))] = _b(h)
        missing = [c for c in want if c not in got or len(got[c]) != HASH_SIZE]
        if missing:
            raise IntegrityFailure("complete", f"stored tree nodes {missing} are missing")
        out.extend(got[c] for c in want)
        return CompactRange(size, out).root()

    def _proof(self, conn: Connection, plan: Callable[[NodeGetter], list[bytes]]) -> list[bytes]:
        """A proof from the stored nodes; a missing or malformed node is an integrity failure."""
        try:
            return plan(self._prefetched(conn, plan))
        except (KeyError, StoreError) as e:
            raise IntegrityFailure("complete", f"stored tree node missing: {e}") from None

    # ------------------------------------------------------------------ reads

    def size(self) -> int:
        """Number of committed entries."""
        with self._engine.connect() as conn:
            return self._size(conn)

    def _size(self, conn: Connection) -> int:
        last = conn.execute(
            select(func.max(_ENTRY_T.c.seq)).where(_ENTRY_T.c.log == self.log)
        ).scalar()
        return 0 if last is None else int(last) + 1

    def latest_checkpoint(self) -> bytes | None:
        """The signed checkpoint note of the largest size, or None for an empty log."""
        with self._engine.connect() as conn:
            row = self._latest_cp(conn)
        return None if row is None else row[1]

    def _latest_cp(self, conn: Connection) -> tuple[int, bytes] | None:
        row = conn.execute(
            select(_CP_T.c.size, _CP_T.c.note)
            .where(_CP_T.c.log == self.log)
            .order_by(_CP_T.c.size.desc())
            .limit(1)
        ).first()
        return None if row is None else (int(row.size), _b(row.note))

    def checkpoint(self, size: int) -> bytes | None:
        """The signed checkpoint note at exactly ``size``, or None if there is none."""
        with self._engine.connect() as conn:
            note = conn.execute(
                select(_CP_T.c.note).where(_CP_T.c.log == self.log, _CP_T.c.size == size)
            ).scalar()
        return None if note is None else _b(note)

    def checkpoints(self, batch: int = 1000) -> Iterator[tuple[int, bytes]]:
        """Every ``(size, signed note)`` in increasing size, as stored."""
        after = -1
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(_CP_T.c.size, _CP_T.c.note)
                    .where(_CP_T.c.log == self.log, _CP_T.c.size > after)
                    .order_by(_CP_T.c.size)
                    .limit(batch)
                ).all()
            for r in rows:
                yield int(r.size), _b(r.note)
            if len(rows) < batch:
                return
            after = int(rows[-1].size)

    # ------------------------------------------------------------------ cosignatures

    def add_cosignatures(self, size: int, lines: Sequence[bytes | str]) -> None:
        """Store witnesses' cosignature lines on the stored checkpoint of ``size``.

        Insert-only: a line by a key (name and key ID) that already cosigned
        this checkpoint is ignored, the first one stays. Only the lines' form
        is checked here; the caller verifies them against the witnesses' keys
        first (:mod:`axid.audit.witnessing`). The checkpoint must be stored.
        """
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
        dialect = self._engine.dialect.name
        if dialect == "sqlite":
            stmt: Any = sqlite_insert(_COSIG_T).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = pg_insert(_COSIG_T).on_conflict_do_nothing()
        else:  # pragma: no cover - make_engine only builds the two above
            raise StoreError(f"unsupported dialect {dialect}")
        with _write_conn(self._engine) as conn, conn.begin():
            conn.execute(stmt, rows)

    def cosignatures(self, size: int) -> list[bytes]:
        """The stored cosignature lines on the checkpoint of ``size``, by witness and key ID."""
        with self._engine.connect() as conn:
            return self._cosignature_lines(conn, size, size).get(size, [])

    def cosigned_note(self, size: int) -> bytes | None:
        """The checkpoint note of ``size`` with its cosignature lines appended (C2SP
        form: the log's signature line, then the witnesses'), or None if none."""
        with self._engine.connect() as conn:
            note = conn.execute(
                select(_CP_T.c.note).where(_CP_T.c.log == self.log, _CP_T.c.size == size)
            ).scalar()
            if note is None:
                return None
            lines = self._cosignature_lines(conn, size, size).get(size, [])
        return _b(note) + b"".join(lines)

    def cosigned_checkpoints(self, batch: int = 1000) -> Iterator[tuple[int, bytes]]:
        """:meth:`checkpoints` with each note's cosignature lines appended."""
        after = -1
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(_CP_T.c.size, _CP_T.c.note)
                    .where(_CP_T.c.log == self.log, _CP_T.c.size > after)
                    .order_by(_CP_T.c.size)
                    .limit(batch)
                ).all()
                cosigs = (
                    self._cosignature_lines(conn, after + 1, int(rows[-1].size)) if rows else {}
                )
            for r in rows:
                size = int(r.size)
                yield size, _b(r.note) + b"".join(cosigs.get(size, []))
            if len(rows) < batch:
                return
            after = int(rows[-1].size)

    def cosigned_sizes(self) -> dict[tuple[str, str], int]:
        """The largest checkpoint size each witness key, ``(name, key ID hex)``, cosigned."""
        with self._engine.connect() as conn:
            if not self._has_cosignature_table(conn):
                return {}
            t = _COSIG_T.c
            rows = conn.execute(
                select(t.witness, t.key_id, func.max(t.size))
                .where(t.log == self.log)
                .group_by(t.witness, t.key_id)
            ).all()
        return {(str(w), str(k)): int(n) for w, k, n in rows}

    def _cosignature_lines(self, conn: Connection, lo: int, hi: int) -> dict[int, list[bytes]]:
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

    def entries(
        self, start: int = 0, end: int | None = None, batch: int = 10000
    ) -> Iterator[tuple[int, bytes, bytes]]:
        """``(seq, data, leaf_hash)`` for seq in ``[start, end)``, in order.

        Reads page by page, each in its own short transaction, so a long
        export does not pin a database snapshot.
        """
        if start < 0:
            raise ValueError("invalid entries range")
        return chain.from_iterable(self.entry_pages(start, end, batch))

    def entry_pages(
        self, start: int = 0, end: int | None = None, batch: int = 10000
    ) -> Iterator[list[tuple[int, bytes, bytes]]]:
        """:meth:`entries` a page (a list of up to ``batch`` rows) at a time.

        One statement per page on the driver's own cursor: rows arrive as the
        driver's tuples, with no per-row SQLAlchemy work (verification reads
        every entry of the log this way). Driver errors are raised as
        SQLAlchemy's, as from the rest of this class. ``start`` may be
        negative: no log writes such a seq, but verification must see a row
        stored there.
        """
        if (end is not None and end < start) or batch < 1:
            raise ValueError("invalid entries range")
        return self._entry_pages(start, _MAX_BIGINT if end is None else end, batch)

    def _entry_pages(
        self, nxt: int, end: int, batch: int
    ) -> Iterator[list[tuple[int, bytes, bytes]]]:
        stmt = self._read_sql()
        while nxt < end:
            rows = self._fetch_page(stmt, nxt, end, batch)
            if not rows:
                return
            # The drivers give int and bytes; anything else (a value of another
            # type written into a column behind our back) is converted as before.
            if (
                set(map(type, map(_COL0, rows))) != {int}
                or set(map(type, map(_COL1, rows))) != {bytes}
                or set(map(type, map(_COL2, rows))) != {bytes}
            ):
                rows = [(int(q), _b(d), _b(h)) for q, d, h in rows]
            yield rows
            if len(rows) < batch:
                return
            nxt = rows[-1][0] + 1

    def _read_sql(self) -> _DriverStmt:
        if self._entries_sql is None:
            t = _ENTRY_T.c
            q = (
                select(t.seq, t.data, t.leaf_hash)
                .where(t.log == bindparam("log"), t.seq >= bindparam("lo"), t.seq < bindparam("hi"))
                .order_by(t.seq)
                .limit(bindparam("n"))
            )
            self._entries_sql = _compile_for(self._engine, q)
        return self._entries_sql

    def query(
        self,
        *,
        decision: str | None = None,
        tenant: str | None = None,
        agent: str | None = None,
        run: str | None = None,
        since_ms: int | None = None,
        limit: int | None = None,
        batch: int = 1000,
    ) -> Iterator[bytes]:
        """Entry bytes matching every given filter, in seq order (``axid audit show``)."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        conds = [_ENTRY_T.c.log == self.log]
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

    # ------------------------------------------------------------------ nodes and proofs

    def node(self, level: int, idx: int) -> bytes:
        """The perfect subtree hash at ``(level, idx)`` (a :data:`NodeGetter`)."""
        with self._engine.connect() as conn:
            return self._getter(conn)(level, idx)

    def _getter(self, conn: Connection) -> NodeGetter:
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
            h = _b(h)
            if len(h) != HASH_SIZE:
                raise StoreError(f"stored node ({level}, {idx}) is not {HASH_SIZE} bytes")
            return h

        return get

    def _read_nodes_raw(self, cur: Any, coords: Sequence[tuple[int, int]]) -> list[Any]:
        """:meth:`_read_nodes` on the driver's cursor (the per-batch head check: SQLAlchemy's
        statement handling would cost more than SQLite's work)."""
        stmt = self._nodes_sql.get(len(coords))
        if stmt is None:
            stmt = self._nodes_sql[len(coords)] = _compile_for(
                self._engine, _nodes_stmt(len(coords))
            )
        values: dict[str, Any] = {"log": self.log}
        for i, (level, idx) in enumerate(coords):
            values[f"lv{i}"] = level
            values[f"ix{i}"] = idx
        cur.execute(stmt.sql, stmt.params(**values))
        return list(cur.fetchall())

    def _read_nodes(self, conn: Connection, coords: Sequence[tuple[int, int]]) -> Any:
        """Rows ``(level, idx, hash)`` of the stored nodes at ``coords`` (levels >= 1)."""
        params: dict[str, Any] = {"log": self.log}
        for i, (level, idx) in enumerate(coords):
            params[f"lv{i}"] = level
            params[f"ix{i}"] = idx
        return conn.execute(_nodes_stmt(len(coords)), params)

    def _prefetched(self, conn: Connection, plan: Callable[[NodeGetter], object]) -> NodeGetter:
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
            for r in self._read_nodes(conn, upper):
                got[(int(r.level), int(r.idx))] = r.hash
        one_by_one = self._getter(conn)

        def get(level: int, idx: int) -> bytes:
            h = got.get((level, idx))
            if h is None:
                return one_by_one(level, idx)
            h = _b(h)
            if len(h) != HASH_SIZE:
                raise StoreError(f"stored node ({level}, {idx}) is not {HASH_SIZE} bytes")
            return h

        return get

    def inclusion_proof(self, seq: int, size: int | None = None) -> tuple[list[bytes], bytes]:
        """Inclusion proof of entry ``seq`` in the checkpoint of ``size`` (default: latest).

        Returns ``(proof hashes, signed checkpoint note)``; ``size`` must be a
        checkpointed size, so the proof always comes with its signature.
        """
        with self._engine.connect() as conn:
            if size is None:
                cp = self._latest_cp(conn)
                if cp is None:
                    raise NotFound(f"log {self.log!r} has no checkpoint yet")
                size, note = cp
            else:
                raw = conn.execute(
                    select(_CP_T.c.note).where(_CP_T.c.log == self.log, _CP_T.c.size == size)
                ).scalar()
                if raw is None:
                    raise NotFound(f"log {self.log!r} has no checkpoint at size {size}")
                note = _b(raw)
            if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < size:
                raise NotFound(f"entry {seq!r} is not in the tree of size {size}")
            n = size
            get = self._prefetched(conn, lambda g: _merkle_inclusion_proof(seq, n, g))
            return _merkle_inclusion_proof(seq, size, get), note

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 consistency proof between tree sizes ``size1 <= size2``."""
        with self._engine.connect() as conn:
            have = self._size(conn)
            if not 0 <= size1 <= size2 <= have:
                raise NotFound(f"no consistency proof for sizes {size1}, {size2} (log size {have})")
            if size1 == 0 or size1 == size2:
                return []
            get = self._prefetched(conn, lambda g: _merkle_consistency_proof(size1, size2, g))
            return _merkle_consistency_proof(size1, size2, get)

    # ------------------------------------------------------------------ auditor reads

    def indexed_entry_pages(
        self, start: int = 0, end: int | None = None, batch: int = 10000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """:meth:`entry_pages` with each row's index columns, as stored.

        Rows are ``(seq, data, leaf_hash, decision, reason, tenant, agent, run,
        ts)``. The auditor compares the columns with the entry bytes (``axid
        audit verify``, ``show``), so they come exactly as the driver gives them,
        never converted; ``data`` and ``leaf_hash`` are bytes. Read-only, one
        short transaction per page; ``start`` may be negative (see
        :meth:`entry_pages`).
        """
        if (end is not None and end < start) or batch < 1:
            raise ValueError("invalid entries range")
        t = _ENTRY_T.c
        cols = (t.seq, t.data, t.leaf_hash, t.decision, t.reason, t.tenant, t.agent, t.run, t.ts)
        q = (
            select(*cols)
            .where(t.log == bindparam("log"), t.seq >= bindparam("lo"), t.seq < bindparam("hi"))
            .order_by(t.seq)
            .limit(bindparam("n"))
        )
        stmt = _compile_for(self._engine, q)
        return self._indexed_pages(stmt, start, _MAX_BIGINT if end is None else end, batch)

    def _indexed_pages(
        self, stmt: _DriverStmt, nxt: int, end: int, batch: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        while nxt < end:
            rows = self._fetch_page(stmt, nxt, end, batch)
            if not rows:
                return
            if (
                set(map(type, map(_COL0, rows))) != {int}
                or set(map(type, map(_COL1, rows))) != {bytes}
                or set(map(type, map(_COL2, rows))) != {bytes}
            ):
                raw = self._raw_bytes
                rows = [(int(r[0]), raw(r[1]), raw(r[2]), *r[3:]) for r in rows]
            yield rows
            if len(rows) < batch:
                return
            nxt = rows[-1][0] + 1

    def _fetch_page(self, stmt: _DriverStmt, lo: int, hi: int, n: int) -> list[Any]:
        """One page of a seq-range read, on the driver's own cursor in a short transaction.

        Driver errors are raised as SQLAlchemy's, as from the rest of this class.
        """
        dialect = self._engine.dialect
        db_error: type[Exception] = dialect.loaded_dbapi.Error
        params = stmt.params(log=self.log, lo=lo, hi=hi, n=n)
        with self._engine.connect() as conn:
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(stmt.sql, params)
                return list(cur.fetchall())
            except db_error as e:
                raise DBAPIError.instance(stmt.sql, params, e, db_error, dialect=dialect) from e
            finally:
                cur.close()

    @staticmethod
    def _raw_bytes(value: Any) -> bytes:
        """A binary column's value as bytes; text (written behind the log's back) as UTF-8."""
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        return str(value).encode("utf-8")


# --------------------------------------------------------------------------- cosignature lines


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


# --------------------------------------------------------------------------- proof text


def proof_text(seq: int, proof: Sequence[bytes], note: bytes) -> str:
    """A C2SP ``tlog-proof`` (c2sp.org/tlog-proof@v1) for entry ``seq``.

    Header line, ``index N``, the inclusion proof (leaf's sibling first, one
    base64 hash a line), an empty line, then the signed checkpoint verbatim.
    """
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"invalid entry index {seq!r}")
    lines = [PROOF_HEADER, f"index {seq}", *(_b64_hash(h, i) for i, h in enumerate(proof))]
    return "\n".join(lines) + "\n\n" + _note_text(note)


def consistency_text(old: int, proof: Sequence[bytes], note: bytes) -> str:
    """A consistency proof in the C2SP tlog-witness ``add-checkpoint`` request form.

    ``old M``, the RFC 9162 consistency proof from size M to the checkpoint's
    size (one base64 hash a line), an empty line, the signed checkpoint verbatim.
    """
    if not isinstance(old, int) or isinstance(old, bool) or old < 0:
        raise ValueError(f"invalid old size {old!r}")
    lines = [f"old {old}", *(_b64_hash(h, i) for i, h in enumerate(proof))]
    return "\n".join(lines) + "\n\n" + _note_text(note)


def _b64_hash(h: object, i: int) -> str:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise ValueError(f"proof[{i}] is not a {HASH_SIZE}-byte hash")
    return base64.b64encode(h).decode("ascii")


def _note_text(note: bytes) -> str:
    try:
        cp = note.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("checkpoint note is not UTF-8") from e
    if not cp.endswith("\n"):
        raise ValueError("checkpoint note must end with a newline")
    return cp


# --------------------------------------------------------------------------- log keys


def load_log_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the log's Ed25519 key (PEM PKCS#8, passphrase from ``AXID_KEY_PASSPHRASE``).

    The same file rules as the token keys (:func:`axid.keys.read_private_key_file`):
    refuses a symbolic link, a non-regular file, and any group/other access.
    """
    try:
        return read_private_key_file(path)
    except KeyringError as e:
        raise LogKeyError(f"log key {e}") from None


def generate_log_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Create a new Ed25519 log key at ``path`` (mode 0600, never overwriting),
    encrypted with ``AXID_KEY_PASSPHRASE`` when that is set."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    try:
        write_private_key_file(p, key)
    except KeyringError as e:
        raise LogKeyError(f"log key {e}") from None
    return key
