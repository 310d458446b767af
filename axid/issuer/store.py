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

* Run binding is insert-or-compare in ONE transaction with the primary key as the
  arbiter: ``INSERT ... ON CONFLICT (run) DO NOTHING`` then read the row back. Two
  replicas binding the same run to different parents: exactly one insert wins, the
  other sees the winner's row and gets :class:`RunConflict`.
* Revocation ``seq`` values are assigned under a lock held to commit (SQLite
  ``BEGIN IMMEDIATE``; PostgreSQL a transaction advisory lock), so they become
  visible in ``seq`` order and a verifier polling ``since=N`` never skips one
  (an auto-increment sequence could commit 6 before 5).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import BigInteger, Connection, Engine, Index, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, SQLModel

from axid.audit.entry import format_ts
from axid.audit.store import make_engine

__all__ = [
    "MAX_REVOCATIONS_PAGE",
    "REVOCATION_KINDS",
    "IssuerRevocation",
    "IssuerRun",
    "IssuerStore",
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


class RunConflict(Exception):
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


def _run_record(row: Any) -> RunRecord:
    return RunRecord(
        row.run,
        row.tenant,
        row.agent,
        row.spiffe_id,
        row.parent,
        row.root,
        int(row.depth),
        int(row.created_at),
    )


def _revocation(row: Any) -> Revocation:
    return Revocation(
        int(row.seq), row.kind, row.value, row.reason, int(row.created_at), row.created_by
    )


class IssuerStore:
    """Synchronous access to the issuer's tables (the app calls it from a thread pool)."""

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._pg = engine.dialect.name == "postgresql"

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
        many tokens); any difference raises :class:`RunConflict`.
        """
        values = {
            "run": record.run,
            "tenant": record.tenant,
            "agent": record.agent,
            "spiffe_id": record.spiffe_id,
            "parent": record.parent,
            "root": record.root,
            "depth": record.depth,
            "created_at": record.created_at,
        }
        insert = pg_insert if self._pg else sqlite_insert
        with self._write() as conn, conn.begin():
            # RETURNING yields the row only if this statement inserted it.
            inserted = conn.execute(
                insert(_RUN_T)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["run"])
                .returning(_RUN_T.c.run)
            ).first()
            created = inserted is not None
            row = conn.execute(select(_RUN_T).where(_RUN_T.c.run == record.run)).one()
        stored = _run_record(row)
        for what in ("tenant", "agent", "spiffe_id", "parent"):
            if getattr(stored, what) != getattr(record, what):
                raise RunConflict(stored, "workload" if what == "spiffe_id" else what)
        # root and depth follow from the parent; equal parents give equal values.
        return stored, created

    def get_run(self, run: str) -> RunRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(_RUN_T).where(_RUN_T.c.run == run)).one_or_none()
        return None if row is None else _run_record(row)

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
                existing = conn.execute(
                    select(_REV_T)
                    .where(_REV_T.c.kind == k, _REV_T.c.value == v)
                    .order_by(_REV_T.c.seq)
                    .limit(1)
                ).one_or_none()
                if existing is not None:
                    return None
                next_seq += 1
                row = Revocation(next_seq, k, v, why, now_ms, created_by)
                conn.execute(
                    _REV_T.insert().values(
                        seq=row.seq,
                        kind=row.kind,
                        value=row.value,
                        reason=row.reason,
                        created_at=row.created_at,
                        created_by=row.created_by,
                    )
                )
                return row

            primary = add(kind, value, reason)
            if primary is None:
                primary = _revocation(
                    conn.execute(
                        select(_REV_T)
                        .where(_REV_T.c.kind == kind, _REV_T.c.value == value)
                        .order_by(_REV_T.c.seq)
                        .limit(1)
                    ).one()
                )
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
        conds = []
        for kind, values in (("jti", jtis), ("run", runs), ("agent", agents), ("tenant", tenants)):
            wanted = sorted({v for v in values if v})
            if wanted:
                conds.append((_REV_T.c.kind == kind) & _REV_T.c.value.in_(wanted))
        if not conds:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(
                select(_REV_T).where(or_(*conds)).order_by(_REV_T.c.seq).limit(1)
            ).one_or_none()
        return None if row is None else _revocation(row)

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
