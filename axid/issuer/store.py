"""The issuer's state: the runs table (spawn tree) and the revocation list.

Tables (SQLModel, on the same engines as the decision log: ``sqlite:///FILE`` or
``postgresql://``, via :func:`axid.audit.store.make_engine`):

* ``axid_issuer_run``: one row per run id, written by the run's first mint and
  never changed: ``run`` (PK), ``tenant``, ``agent``, ``spiffe_id``, ``parent``
  (``NULL`` for a root run), ``root``, ``depth`` (= length of the token's chain),
  ``created_at`` (Unix ms).
* ``axid_issuer_revocation``: append-only, ``seq`` (PK, 1, 2, 3, ...), ``kind``
  (``jti`` | ``run`` | ``agent`` | ``tenant``), ``value``, ``reason``,
  ``created_at`` (Unix ms), ``created_by`` (the admin's SPIFFE ID).

Revocation scope across tenants (a known limit of the wire contract, not a bug to
rely on): a revocation row is ``(kind, value)`` with no tenant column, and both this
store (:meth:`IssuerStore.find_revocation`, used at mint time) and the verifier
(``verifier.revocation``, fed by ``GET /v1/revocations``) match on the value alone.

* ``agent`` revocations are GLOBAL: revoking agent slug ``planner`` refuses mints and
  denies tokens for ``agent == "planner"`` in EVERY tenant, not only the tenant the
  admin had in mind. Where several tenants share one issuer, give agents
  tenant-qualified slugs in the registration file (``acme-planner``,
  ``globex-planner``) so an agent revocation names exactly one tenant's agent.
* ``tenant`` values are unique by definition; ``jti`` values are 128-bit random;
  ``run`` ids are unique across tenants because the runs table binds each run id to
  one tenant for good. These three kinds therefore hit one tenant only (a ``run``
  revocation of an id never minted hits whichever tenant later tries to use it).

Changing ``agent`` to a tenant-scoped match would change the revocation feed's
contract (DESIGN.md) for the issuer and every verifier at once: a contract decision.

Concurrency (several issuer replicas on one PostgreSQL, or processes on one SQLite
file):

* Run binding reads the run's row first: a committed row is final (never updated
  nor deleted), so an equal row means "already bound" with no write at all. Only a
  run not seen yet takes the insert-or-compare path, in ONE write transaction with
  the primary key as the arbiter: ``INSERT ... ON CONFLICT (run) DO NOTHING`` then
  read the row back. Two replicas binding the same run to different parents:
  exactly one insert wins, the other sees the winner's row and gets
  :class:`RunConflict`.
* Revocation ``seq`` values are assigned under a lock held to commit (SQLite
  ``BEGIN IMMEDIATE``; PostgreSQL a transaction advisory lock), so they become
  visible in ``seq`` order and a verifier polling ``since=N`` never skips one
  (an auto-increment sequence could commit 6 before 5).

Speed: :meth:`IssuerStore.check_mint` (every ``POST /v1/tokens``) does the
revocation lookup and the run binding on one pooled DBAPI connection with
hand-written SQL (two indexed reads when the run is already bound). Building and
compiling SQLAlchemy statements cost some twenty times the queries themselves. Driver
errors still surface as :class:`sqlalchemy.exc.DBAPIError` (the service's 503).
The rarer admin paths (revoke, the revocation feed) stay on SQLAlchemy Core.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final

from sqlalchemy import BigInteger, Connection, Engine, Index, func, select
from sqlalchemy.exc import DBAPIError
from sqlmodel import Field, SQLModel

from axid.audit.entry import format_ts
from axid.audit.store import make_engine
from axid.issuer.errors import IssuerBaseError

__all__ = [
    "MAX_REVOCATIONS_PAGE",
    "REVOCATION_KINDS",
    "IssuerRevocation",
    "IssuerRun",
    "IssuerStore",
    "MintCheck",
    "Revocation",
    "RunConflict",
    "RunRecord",
]

REVOCATION_KINDS: Final = ("jti", "run", "agent", "tenant")
MAX_REVOCATIONS_PAGE: Final = 1000
# axid.audit.store.make_engine emits BEGIN IMMEDIATE on SQLite for connections
# carrying this execution option (writers lock before they read).
_SQLITE_IMMEDIATE: Final = "axid_sqlite_immediate"
# Serialises CREATE TABLE and revocation inserts on PostgreSQL ("AXIDISSR", "AXIDREVK").
_PG_SCHEMA_LOCK: Final = 0x41584944_49535352
_PG_REVOCATION_LOCK: Final = 0x41584944_5245564B


class IssuerRun(SQLModel, table=True):
    """A run id's binding, fixed by its first mint."""

    __tablename__ = "axid_issuer_run"

    run: str = Field(primary_key=True, max_length=128)
    tenant: str = Field(max_length=63, index=True)
    agent: str = Field(max_length=63)
    spiffe_id: str = Field(max_length=2048)
    parent: str | None = Field(default=None, max_length=128, index=True)
    root: str = Field(max_length=128, index=True)
    depth: int
    created_at: int = Field(sa_type=BigInteger)  # unix ms


class IssuerRevocation(SQLModel, table=True):
    """One revocation; rows are only ever inserted."""

    __tablename__ = "axid_issuer_revocation"
    __table_args__ = (Index("ix_axid_issuer_revocation_kind_value", "kind", "value"),)

    seq: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    kind: str = Field(max_length=16)
    value: str = Field(max_length=256)
    reason: str = Field(max_length=1024)
    created_at: int = Field(sa_type=BigInteger)  # unix ms
    created_by: str = Field(max_length=2048)


_RUN_T: Any = IssuerRun.__table__
_REV_T: Any = IssuerRevocation.__table__
_TABLES: Final = [_RUN_T, _REV_T]


class RunConflict(IssuerBaseError):
    """The run id is already bound to another tenant, agent, workload or parent."""

    existing: RunRecord

    def __init__(self, existing: RunRecord, what: str) -> None:
        super().__init__(f"run is already bound with another {what}")
        self.existing = existing
        self.what = what


@dataclass(frozen=True, slots=True)
class RunRecord:
    run: str
    tenant: str
    agent: str
    spiffe_id: str
    parent: str | None
    root: str
    depth: int
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class MintCheck:
    """One mint's database work (:meth:`IssuerStore.check_mints`): look for a revocation
    of any of the values, and if there is none bind ``record``."""

    record: RunRecord
    jtis: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Revocation:
    seq: int
    kind: str
    value: str
    reason: str
    created_at: int  # unix ms
    created_by: str

    def to_json(self) -> dict[str, Any]:
        """The public form served by ``GET /v1/revocations`` (``created_at`` RFC 3339)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "value": self.value,
            "reason": self.reason,
            "created_at": format_ts(self.created_at),
        }


# Column orders of the hand-written SQL; the same as the tables' (select(_RUN_T) rows
# and DBAPI tuples are read by position alike).
_RUN_COLS: Final = "run, tenant, agent, spiffe_id, parent, root, depth, created_at"
_REV_COLS: Final = "seq, kind, value, reason, created_at, created_by"
_SELECT_RUN: Final = f"SELECT {_RUN_COLS} FROM axid_issuer_run WHERE run = ?"  # noqa: S608
_INSERT_RUN: Final = (
    "INSERT INTO axid_issuer_run (run, tenant, agent, spiffe_id, parent, root, depth, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run) DO NOTHING"
)
_BOUND_FIELDS: Final = (("tenant", "tenant"), ("agent", "agent"), ("spiffe_id", "workload"))


def _run_record(row: Any) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], row[3], row[4], row[5], int(row[6]), int(row[7]))


def _revocation(row: Any) -> Revocation:
    return Revocation(int(row[0]), row[1], row[2], row[3], int(row[4]), row[5])


def _first_revocation(kind: str, value: str) -> Any:
    """The query for the oldest revocation of ``kind``/``value``."""
    return (
        select(_REV_T)
        .where(_REV_T.c.kind == kind, _REV_T.c.value == value)
        .order_by(_REV_T.c.seq)
        .limit(1)
    )


def _placeholders(sql: str, ph: str) -> str:
    # The SQL here holds no literal "?": every one is a placeholder (values are bound).
    return sql if ph == "?" else sql.replace("?", ph)


@functools.lru_cache(maxsize=256)
def _revocation_sql(ph: str, counts: tuple[int, ...]) -> str:
    """The oldest-matching-revocation query for ``counts[i]`` values of kind ``i``."""
    where = " OR ".join(f"(kind = ? AND value IN ({', '.join('?' * n)}))" for n in counts if n)
    # Only fixed names and placeholders are interpolated; values are bound.
    sql = f"SELECT {_REV_COLS} FROM axid_issuer_revocation WHERE {where} ORDER BY seq LIMIT 1"  # noqa: S608
    return _placeholders(sql, ph)


def _revocation_query(
    ph: str,
    jtis: Iterable[str],
    runs: Iterable[str],
    agents: Iterable[str],
    tenants: Iterable[str],
) -> tuple[str, list[str]] | None:
    """SQL and parameters matching any of the values (None: nothing to look for)."""
    counts: list[int] = []
    params: list[str] = []
    for kind, values in zip(REVOCATION_KINDS, (jtis, runs, agents, tenants), strict=True):
        wanted = sorted({v for v in values if v})
        counts.append(len(wanted))
        if wanted:
            params.append(kind)
            params += wanted
    if not params:
        return None
    return _revocation_sql(ph, tuple(counts)), params


def _check_binding(stored: RunRecord, record: RunRecord) -> None:
    for attr, what in _BOUND_FIELDS:
        if getattr(stored, attr) != getattr(record, attr):
            raise RunConflict(stored, what)
    if stored.parent != record.parent:
        raise RunConflict(stored, "parent")
    # root and depth follow from the parent; equal parents give equal values.


class IssuerStore:
    """Synchronous access to the issuer's tables (the app calls it from a thread pool)."""

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._pg = engine.dialect.name == "postgresql"
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError("IssuerStore needs a SQLite or PostgreSQL engine")
        # psycopg 3 and sqlite3: the placeholder of the hand-written SQL.
        self._ph = "%s" if self._pg else "?"
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._select_run = _placeholders(_SELECT_RUN, self._ph)
        self._insert_run = _placeholders(_INSERT_RUN, self._ph)

    @classmethod
    def open(cls, url: str, *, lock_timeout: float = 30.0) -> IssuerStore:
        """An engine for ``url`` (SQLite file or PostgreSQL) with the tables created."""
        engine = make_engine(url, lock_timeout=lock_timeout)
        store = cls(engine, owns_engine=True)
        try:
            store.create_schema()
        except BaseException:
            engine.dispose()
            raise
        return store

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def _write(self) -> Connection:
        conn = self._engine.connect()
        if not self._pg:
            conn = conn.execution_options(**{_SQLITE_IMMEDIATE: True})
        return conn

    @contextmanager
    def _raw(self) -> Iterator[Any]:
        """A pooled DBAPI cursor. A driver error invalidates the connection (its state
        is unknown) and is raised as SQLAlchemy's DBAPIError, as Core would; the pool
        rolls back whatever is left open when the connection goes back."""
        conn = self._engine.raw_connection()  # connect errors come wrapped already
        try:
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()
        except self._dbapi_error as exc:
            conn.invalidate(exc)
            raise DBAPIError.instance(
                None, None, exc, self._dbapi_error, hide_parameters=True
            ) from exc
        finally:
            conn.close()

    def _read_run(self, cur: Any, run: str) -> RunRecord | None:
        cur.execute(self._select_run, (run,))
        rows = cur.fetchall()  # fetchall: a finished statement holds no SQLite read lock
        return _run_record(rows[0]) if rows else None

    def _bind(self, cur: Any, record: RunRecord) -> tuple[RunRecord, bool]:
        """Read first; insert only a run not seen yet (the PK arbitrates races)."""
        stored = self._read_run(cur, record.run)
        if stored is not None:
            _check_binding(stored, record)
            return stored, False
        row = (
            record.run,
            record.tenant,
            record.agent,
            record.spiffe_id,
            record.parent,
            record.root,
            record.depth,
            record.created_at,
        )
        if self._pg:
            # READ COMMITTED: a racing insert of the same run makes ours wait for its
            # commit and do nothing; the next statement's snapshot sees the winner.
            cur.execute(self._insert_run, row)
            created = cur.rowcount == 1
            stored = self._read_run(cur, record.run)
            cur.connection.commit()
        else:
            cur.execute("BEGIN IMMEDIATE")  # the write lock, held to COMMIT
            try:
                cur.execute(self._insert_run, row)
                created = cur.rowcount == 1
                stored = self._read_run(cur, record.run)
                cur.execute("COMMIT")
            except BaseException:
                if cur.connection.in_transaction:
                    cur.connection.rollback()
                raise
        if stored is None:  # inserted or conflicting, the row must be there
            raise RuntimeError(f"run {record.run!r} is missing right after its insert")
        _check_binding(stored, record)
        return stored, created

    def create_schema(self) -> None:
        """Create the issuer tables if absent (safe from several processes)."""
        with self._write() as conn, conn.begin():
            if self._pg:
                conn.execute(select(func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
            SQLModel.metadata.create_all(conn, tables=_TABLES, checkfirst=True)

    # ------------------------------------------------------------------ runs

    def bind_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Bind ``record.run`` to the record's tenant, agent, workload and parent.

        Returns ``(stored, created)``. The same binding again is fine (a run mints
        many tokens) and writes nothing; any difference raises :class:`RunConflict`.
        """
        with self._raw() as cur:
            return self._bind(cur, record)

    def check_mint(
        self,
        record: RunRecord,
        *,
        jtis: Iterable[str] = (),
        runs: Iterable[str] = (),
        agents: Iterable[str] = (),
        tenants: Iterable[str] = (),
    ) -> Revocation | None:
        """A mint's database work in one go: the oldest revocation matching the values
        (returned, and nothing is bound), else :meth:`bind_run` of ``record``
        (None; :class:`RunConflict` if the run is bound otherwise)."""
        [result] = self.check_mints(
            [MintCheck(record, tuple(jtis), tuple(runs), tuple(agents), tuple(tenants))]
        )
        if isinstance(result, RunConflict):
            raise result
        return result

    def check_mints(self, checks: Sequence[MintCheck]) -> list[Revocation | RunConflict | None]:
        """:meth:`check_mint` for several mints, in order, on one connection: per check
        its revocation, its :class:`RunConflict` (returned, not raised), or None (bound).

        A driver error fails the whole call (DBAPIError): no check of it is reported
        done, though bindings committed before the error stay (they are final anyway).
        """
        results: list[Revocation | RunConflict | None] = []
        with self._raw() as cur:
            for check in checks:
                query = _revocation_query(
                    self._ph, check.jtis, check.runs, check.agents, check.tenants
                )
                if query is not None:
                    cur.execute(*query)
                    rows = cur.fetchall()
                    if rows:
                        results.append(_revocation(rows[0]))
                        continue
                try:
                    self._bind(cur, check.record)
                except RunConflict as exc:
                    results.append(exc)
                else:
                    results.append(None)
        return results

    def get_run(self, run: str) -> RunRecord | None:
        with self._raw() as cur:
            return self._read_run(cur, run)

    def descendants(self, run: str) -> list[str]:
        """Every run spawned (directly or not) from ``run``, by the runs table."""
        with self._engine.connect() as conn:
            return self._descendants(conn, run)

    @staticmethod
    def _descendants(conn: Connection, run: str) -> list[str]:
        tree = select(_RUN_T.c.run).where(_RUN_T.c.parent == run).cte("tree", recursive=True)
        # UNION (not UNION ALL): a cycle, impossible by construction, would still end.
        tree = tree.union(select(_RUN_T.c.run).join(tree, _RUN_T.c.parent == tree.c.run))
        rows = conn.execute(select(tree.c.run).order_by(tree.c.run)).all()
        return [r.run for r in rows]

    # ------------------------------------------------------------------ revocations

    def revoke(
        self,
        kind: str,
        value: str,
        reason: str,
        *,
        created_by: str,
        now_ms: int,
        cascade: bool = True,
    ) -> tuple[Revocation, list[Revocation]]:
        """Revoke ``kind``/``value``; returns ``(revocation, cascaded)``.

        Idempotent: an existing revocation of the same kind and value is returned
        instead of a new row. For ``kind == "run"`` with ``cascade``, every
        descendant run in the runs table that is not revoked yet gets its own row
        (reason ``"cascade from run <value>"``); tokens of runs spawned later are
        caught by their ``chain`` anyway.
        """
        if kind not in REVOCATION_KINDS:
            raise ValueError(f"kind must be one of {REVOCATION_KINDS}")
        with self._write() as conn, conn.begin():
            if self._pg:
                conn.execute(select(func.pg_advisory_xact_lock(_PG_REVOCATION_LOCK)))
            next_seq = int(conn.execute(select(func.coalesce(func.max(_REV_T.c.seq), 0))).scalar())

            def add(k: str, v: str, why: str) -> Revocation | None:
                nonlocal next_seq
                if conn.execute(_first_revocation(k, v)).one_or_none() is not None:
                    return None
                next_seq += 1
                row = Revocation(next_seq, k, v, why, now_ms, created_by)
                conn.execute(_REV_T.insert().values(**asdict(row)))
                return row

            primary = add(kind, value, reason)
            if primary is None:
                primary = _revocation(conn.execute(_first_revocation(kind, value)).one())
            cascaded: list[Revocation] = []
            if kind == "run" and cascade:
                for child in self._descendants(conn, value):
                    row = add("run", child, f"cascade from run {value}")
                    if row is not None:
                        cascaded.append(row)
        return primary, cascaded

    def find_revocation(
        self,
        *,
        jtis: Iterable[str] = (),
        runs: Iterable[str] = (),
        agents: Iterable[str] = (),
        tenants: Iterable[str] = (),
    ) -> Revocation | None:
        """The oldest revocation matching any of the given values, or None.

        Values are matched without regard to tenant: an ``agent`` revocation applies
        to that slug in every tenant (see the module docstring).
        """
        query = _revocation_query(self._ph, jtis, runs, agents, tenants)
        if query is None:
            return None
        with self._raw() as cur:
            cur.execute(*query)
            rows = cur.fetchall()
        return _revocation(rows[0]) if rows else None

    def revocations(self, since: int = 0, limit: int = MAX_REVOCATIONS_PAGE) -> list[Revocation]:
        """Revocations with ``seq > since``, oldest first, at most ``limit``."""
        if since < 0 or not 1 <= limit <= MAX_REVOCATIONS_PAGE:
            raise ValueError("since must be >= 0 and limit in [1, 1000]")
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_REV_T).where(_REV_T.c.seq > since).order_by(_REV_T.c.seq).limit(limit)
            ).all()
        return [_revocation(r) for r in rows]

    def last_revocation_seq(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(_REV_T.c.seq), 0))).scalar())
