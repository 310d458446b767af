"""The witness's state: the latest cosigned checkpoint per origin, and evidence.

Tables (SQLAlchemy Core, SQLite or PostgreSQL via psycopg 3):

- ``witness_state``: one row per origin: ``size``, ``root``, ``timestamp`` (of the
  last cosignature), ``note`` (the signed checkpoint as submitted). An origin
  without a row, or with size 0 and the empty root, was never cosigned.
- ``witness_evidence``: validly signed submissions the witness refused as
  misbehaviour (see :mod:`axid.witness.protocol`): the exact request body,
  status, reason, first and last time seen and how often (one row per origin
  and body).

:meth:`WitnessStore.submit` reads the origin's row, decides and writes in ONE
transaction under a lock on that row, so concurrent submissions (threads,
processes, hosts on one PostgreSQL) are serialized per origin: SQLite ``BEGIN
IMMEDIATE`` (one writer for the whole file); PostgreSQL ``INSERT ... ON
CONFLICT DO NOTHING`` then ``SELECT ... FOR UPDATE`` on the origin's row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from axid.witness.errors import WitnessError
from axid.witness.protocol import LogState, Outcome

__all__ = ["Evidence", "WitnessStore", "WitnessStoreError"]

_PG_SCHEMA_LOCK: Final = 0x41584957  # "AXIW": serializes CREATE TABLE across processes
_metadata = MetaData()
_STATE = Table(
    "witness_state",
    _metadata,
    Column("origin", String(1024), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("root", LargeBinary(32), nullable=False),
    Column("timestamp", BigInteger, nullable=False),
    Column("note", LargeBinary, nullable=True),
)
_EVIDENCE = Table(
    "witness_evidence",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("origin", String(1024), nullable=False),
    Column("body_sha256", LargeBinary(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("status", Integer, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("count", Integer, nullable=False),
    UniqueConstraint("origin", "body_sha256", name="witness_evidence_body"),
)

Step = Callable[[LogState], tuple[Outcome, list[str]]]


class WitnessStoreError(WitnessError):
    """The state database URL is unusable."""


@dataclass(frozen=True)
class Evidence:
    """One refused, validly signed submission."""

    id: int
    origin: str
    status: int
    reason: str
    body: bytes
    first_seen: float
    last_seen: float
    count: int


def make_engine(url: str, *, lock_timeout: float = 10.0) -> Engine:
    """An engine for ``sqlite:///FILE`` (WAL, synchronous=FULL, every transaction
    ``BEGIN IMMEDIATE``) or ``postgresql://`` (psycopg 3, ``lock_timeout``)."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise WitnessStoreError("malformed database URL") from None
    backend, _, driver = u.drivername.partition("+")
    timeout_ms = max(1, int(lock_timeout * 1000))
    if backend == "postgresql" and driver in ("", "psycopg"):
        return create_engine(
            u.set(drivername="postgresql+psycopg"),
            pool_pre_ping=True,
            connect_args={"options": f"-c lock_timeout={timeout_ms}"},
        )
    if backend != "sqlite" or driver not in ("", "pysqlite"):
        raise WitnessStoreError("database must be sqlite:///FILE or postgresql://...")
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or u.query or u.host:
        raise WitnessStoreError("SQLite needs a file: sqlite:///path/to/file.db")
    Path(db).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = create_engine(
        u.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": lock_timeout, "check_same_thread": False},
    )
    event.listen(engine, "connect", _sqlite_connect(timeout_ms))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise WitnessStoreError(f"SQLite refused WAL journal mode (got {mode!r})")
            cur.execute("PRAGMA synchronous = FULL")
        finally:
            cur.close()

    return on_connect


def _sqlite_begin(conn: Connection) -> None:
    # The witness's transactions all decide from what they read: take the write lock first.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class WitnessStore:
    """The witness's tables in one database (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    @classmethod
    def open(cls, url: str, *, lock_timeout: float = 10.0) -> WitnessStore:
        store = cls(make_engine(url, lock_timeout=lock_timeout))
        store.create_schema()
        return store

    def close(self) -> None:
        self._engine.dispose()

    def create_schema(self) -> None:
        """Create the tables if absent (safe to call from many processes)."""
        with self._engine.begin() as conn:
            if self._pg:
                conn.execute(select(func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
            _metadata.create_all(conn, checkfirst=True)

    def _insert(self) -> Any:
        return pg_insert if self._pg else sqlite_insert

    def submit(self, origin: str, body: bytes, now: float, step: Step) -> tuple[Outcome, list[str]]:
        """Lock ``origin``'s row, run ``step`` on its state, store what it decided
        (the new state on 200, evidence when marked) and commit: one transaction."""
        initial = LogState.initial()
        with self._engine.begin() as conn:
            conn.execute(
                self._insert()(_STATE)
                .values(origin=origin, size=initial.size, root=initial.root, timestamp=0)
                .on_conflict_do_nothing(index_elements=["origin"])
            )
            row = conn.execute(
                select(_STATE.c.size, _STATE.c.root, _STATE.c.timestamp)
                .where(_STATE.c.origin == origin)
                .with_for_update()
            ).one()
            outcome, lines = step(LogState(int(row.size), bytes(row.root), int(row.timestamp)))
            if outcome.new_state is not None:
                new = outcome.new_state
                conn.execute(
                    update(_STATE)
                    .where(_STATE.c.origin == origin)
                    .values(size=new.size, root=new.root, timestamp=new.timestamp, note=body)
                )
            if outcome.evidence:
                self._keep(conn, origin, body, outcome, now)
        return outcome, lines

    def _keep(
        self, conn: Connection, origin: str, body: bytes, outcome: Outcome, now: float
    ) -> None:
        stmt = self._insert()(_EVIDENCE).values(
            origin=origin,
            body_sha256=hashlib.sha256(body).digest(),
            body=body,
            status=outcome.status,
            reason=outcome.reason,
            first_seen=now,
            last_seen=now,
            count=1,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["origin", "body_sha256"],
                set_={"last_seen": now, "count": _EVIDENCE.c.count + 1},
            )
        )

    def latest(self, origin: str) -> LogState | None:
        """The stored latest cosigned checkpoint of ``origin`` (None: never submitted)."""
        with self._engine.begin() as conn:
            row = conn.execute(
                select(_STATE.c.size, _STATE.c.root, _STATE.c.timestamp).where(
                    _STATE.c.origin == origin
                )
            ).one_or_none()
        return None if row is None else LogState(int(row.size), bytes(row.root), int(row.timestamp))

    def evidence(self, origin: str | None = None) -> list[Evidence]:
        """Every kept refusal (of ``origin``, when given), oldest first."""
        query = select(_EVIDENCE).order_by(_EVIDENCE.c.id)
        if origin is not None:
            query = query.where(_EVIDENCE.c.origin == origin)
        with self._engine.begin() as conn:
            rows = conn.execute(query).all()
        return [
            Evidence(
                id=int(r.id),
                origin=r.origin,
                status=int(r.status),
                reason=r.reason,
                body=bytes(r.body),
                first_seen=float(r.first_seen),
                last_seen=float(r.last_seen),
                count=int(r.count),
            )
            for r in rows
        ]
