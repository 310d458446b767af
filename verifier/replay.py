"""Single-use tokens: a ``jti`` passes a ``single_use`` rule once, across replicas.

The table ``axid_verifier_jti`` (``jti`` primary key, ``service``, ``exp``,
``used_at``) is insert-only: the first verifier (of any process or host sharing
the database) to insert a jti wins; every later insert of it hits the primary
key and the request is ``replayed``. ``INSERT ... ON CONFLICT DO NOTHING`` makes
the database the arbiter, on SQLite and PostgreSQL alike, with no read-then-write
race. A jti is single-use across every service sharing the table (stricter than
per service: a multi-audience token is still used once).

Rows whose token has expired (``exp`` plus leeway in the past) can be purged: the
token is refused as expired anyway.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.schema import CreateIndex, CreateTable

from axid.audit.store import make_engine

__all__ = ["ReplayGuard"]

_log = logging.getLogger(__name__)

_PG_SCHEMA_LOCK: Final = 0x41584944_4A544953  # "AXIDJTIS"

_METADATA: Final = MetaData()
JTI_TABLE: Final = Table(
    "axid_verifier_jti",
    _METADATA,
    Column("jti", String(64), primary_key=True),
    Column("service", String(255), nullable=False),
    Column("exp", BigInteger, nullable=False, index=True),
    Column("used_at", BigInteger, nullable=False),
)


class ReplayGuard:
    """Claims jtis in the shared table. Synchronous: call it from a worker thread."""

    def __init__(self, engine: Engine, *, service: str, owns_engine: bool = False) -> None:
        self._engine = engine
        self._service = service
        self._owns = owns_engine
        self._pg = engine.dialect.name == "postgresql"

    @classmethod
    def open(cls, url: str, *, service: str, lock_timeout: float = 5.0) -> ReplayGuard:
        """An engine for ``url`` (SQLite file or PostgreSQL) with the table created."""
        engine = make_engine(url, lock_timeout=lock_timeout)
        guard = cls(engine, service=service, owns_engine=True)
        try:
            guard.create_schema()
        except BaseException:
            engine.dispose()
            raise
        return guard

    def create_schema(self) -> None:
        """Create the table if absent; safe when several processes start at once."""
        with self._engine.begin() as conn:
            if self._pg:
                conn.execute(select(func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
            conn.execute(CreateTable(JTI_TABLE, if_not_exists=True))
            for index in JTI_TABLE.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))

    def claim(self, jti: str, exp: int, now: int) -> bool:
        """Record the first use of ``jti``: True if this call was it, False if a replay."""
        insert = pg_insert if self._pg else sqlite_insert
        stmt = (
            insert(JTI_TABLE)
            .values(jti=jti, service=self._service, exp=exp, used_at=now)
            .on_conflict_do_nothing(index_elements=["jti"])
            # RETURNING yields the row only if this statement inserted it (rowcount is
            # not reliable for ON CONFLICT on every driver).
            .returning(JTI_TABLE.c.jti)
        )
        with self._engine.begin() as conn:
            inserted = conn.execute(stmt).first()
        return inserted is not None

    def used_by(self, jti: str) -> str | None:
        """The service that used ``jti`` first, if any (for the decision note)."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(JTI_TABLE.c.service).where(JTI_TABLE.c.jti == jti)
            ).one_or_none()
        return None if row is None else str(row.service)

    def purge(self, before: int) -> int:
        """Delete rows whose ``exp`` is before ``before``; returns how many."""
        with self._engine.begin() as conn:
            result = conn.execute(delete(JTI_TABLE).where(JTI_TABLE.c.exp < before))
        return int(result.rowcount or 0)

    def close(self) -> None:
        if self._owns:
            self._engine.dispose()
