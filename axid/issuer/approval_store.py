"""The issuer's approval requests: one table, ``axid_issuer_approval`` (SQLite or
PostgreSQL, on the issuer store's engine).

A row is one approval request for one exact request (DESIGN.md "Approvals"):
``id`` (PK, 16 random bytes base64url, first character a letter or digit),
``status`` (``pending`` -> ``approved`` | ``denied`` | ``expired``, each change
made once, by a conditional UPDATE whose ``WHERE status = 'pending'`` is the
arbiter between replicas), who filed it
(``filed_by``, a service SVID), the service (``aud``), tenant, agent, run, the
agent's ``sub`` and ``cnf``, the request (``method``, ``path``, ``body_sha256``),
scope, the action token's ``jti``, the approvers (JSON list of SPIFFE ID patterns),
``created_at`` / ``expires_at`` / ``decided_at`` (Unix s), ``decided_by``, ``note``,
and once approved the approval ``token`` (minted once, served on every poll).

Filing is insert-or-reuse under a write lock (SQLite ``BEGIN IMMEDIATE``,
PostgreSQL a transaction advisory lock): a pending, unexpired request of the same
(``sub``, ``run``, method, path, body) is returned instead of a new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.schema import CreateIndex, CreateTable

from axid.keys import b64url_encode

__all__ = ["APPROVAL_TABLE", "STATUSES", "ApprovalRecord", "ApprovalStore"]

STATUSES: Final = ("pending", "approved", "denied", "expired")
_SQLITE_IMMEDIATE: Final = "axid_sqlite_immediate"  # see axid.audit.store.make_engine
_PG_LOCK: Final = 0x41584944_41505052  # "AXIDAPPR"
_MAX_LIST: Final = 500

_METADATA: Final = MetaData()
APPROVAL_TABLE: Final = Table(
    "axid_issuer_approval",
    _METADATA,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("filed_by", String(2048), nullable=False),
    Column("aud", String(255), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("agent", String(63), nullable=False),
    Column("run", String(128), nullable=False),
    Column("sub", String(2048), nullable=False),
    Column("cnf", String(64), nullable=False),
    Column("method", String(32), nullable=False),
    Column("path", Text, nullable=False),
    Column("body_sha256", String(64), nullable=False),
    Column("scope", String(2048), nullable=True),
    Column("jti", String(64), nullable=True),
    Column("approvers", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("decided_at", BigInteger, nullable=True),
    Column("decided_by", String(2048), nullable=True),
    Column("note", String(1024), nullable=True),
    Column("token", Text, nullable=True),
    Index("ix_axid_issuer_approval_status", "status", "expires_at"),
    Index("ix_axid_issuer_approval_same", "sub", "run", "body_sha256"),
)


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """One approval request as stored; ``repr`` leaves the token out."""

    id: str
    status: str
    filed_by: str
    aud: str
    tenant: str
    agent: str
    run: str
    sub: str
    cnf: str
    method: str
    path: str
    body_sha256: str
    scope: str | None
    jti: str | None
    approvers: tuple[str, ...] | None
    created_at: int
    expires_at: int
    decided_at: int | None = None
    decided_by: str | None = None
    note: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return f"ApprovalRecord(id={self.id!r}, status={self.status!r})"

    def to_json(self, *, with_token: bool = False) -> dict[str, Any]:
        """The request as the approvals routes show it (the token only when asked)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "service": self.aud,
            "filed_by": self.filed_by,
            "tenant": self.tenant,
            "agent": self.agent,
            "run": self.run,
            "sub": self.sub,
            "req": {"method": self.method, "path": self.path, "body_sha256": self.body_sha256},
            "scope": self.scope,
            "jti": self.jti,
            "approvers": list(self.approvers) if self.approvers is not None else None,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "note": self.note,
        }
        if with_token and self.token is not None:
            doc["token"] = self.token
        return doc


def _record(row: Any) -> ApprovalRecord:
    m = row._mapping
    approvers = json.loads(m["approvers"]) if m["approvers"] is not None else None
    return ApprovalRecord(
        **{k: m[k] for k in m if k != "approvers"},
        approvers=tuple(approvers) if approvers is not None else None,
    )


def _new_id() -> str:
    """16 random bytes, base64url, never starting with '-' or '_': an id is typed as a
    command-line argument (``axid approvals approve ID``), where a leading '-' would
    read as an option."""
    while True:
        approval_id = b64url_encode(os.urandom(16))
        if approval_id[0].isalnum():
            return approval_id


class ApprovalStore:
    """The approvals table on an engine. Synchronous: call it from a worker thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    def create_schema(self) -> None:
        """Create the table if absent; safe when several processes start at once."""
        with self._locked() as conn:
            conn.execute(CreateTable(APPROVAL_TABLE, if_not_exists=True))
            for index in APPROVAL_TABLE.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        """One write transaction holding the approvals lock until it commits."""
        conn = self._engine.connect()
        if not self._pg:
            conn = conn.execution_options(**{_SQLITE_IMMEDIATE: True})
        try:
            with conn.begin():
                if self._pg:
                    conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK)))
                yield conn
        finally:
            conn.close()

    def file(
        self, fields: dict[str, Any], *, now: int, timeout: int
    ) -> tuple[ApprovalRecord, bool]:
        """A new pending request from ``fields`` (the table's columns but the ones the
        store sets), or the pending one of the same sub, run and request: (row, new?)."""
        t = APPROVAL_TABLE.c
        with self._locked() as conn:
            same = conn.execute(
                select(APPROVAL_TABLE).where(
                    t.status == "pending",
                    t.expires_at > now,
                    t.sub == fields["sub"],
                    t.run == fields["run"],
                    t.method == fields["method"],
                    t.path == fields["path"],
                    t.body_sha256 == fields["body_sha256"],
                )
            ).first()
            if same is not None:
                return _record(same), False
            approvers = fields.get("approvers")
            row = {
                **fields,
                "id": _new_id(),
                "status": "pending",
                "approvers": json.dumps(list(approvers)) if approvers is not None else None,
                "created_at": now,
                "expires_at": now + timeout,
            }
            conn.execute(APPROVAL_TABLE.insert().values(**row))
        return self.get(row["id"]), True  # type: ignore[return-value]

    def get(self, approval_id: str) -> ApprovalRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(APPROVAL_TABLE).where(APPROVAL_TABLE.c.id == approval_id)
            ).first()
        return None if row is None else _record(row)

    def list(self, status: str | None = None) -> list[ApprovalRecord]:
        """The newest requests first (at most 500), of one status if given."""
        query = select(APPROVAL_TABLE).order_by(APPROVAL_TABLE.c.created_at.desc())
        if status is not None:
            query = query.where(APPROVAL_TABLE.c.status == status)
        with self._engine.connect() as conn:
            rows = conn.execute(query.limit(_MAX_LIST)).all()
        return [_record(r) for r in rows]

    def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        note: str | None,
        now: int,
        token: Callable[[ApprovalRecord], str],
    ) -> ApprovalRecord | None:
        """Decide a pending, unexpired request once (across replicas); ``token`` mints
        the approval token of an approve. None: not pending (any more) or expired."""
        t = APPROVAL_TABLE.c
        with self._locked() as conn:
            row = conn.execute(
                select(APPROVAL_TABLE).where(
                    t.id == approval_id, t.status == "pending", t.expires_at > now
                )
            ).first()
            if row is None:
                return None
            values: dict[str, Any] = {
                "status": "approved" if approve else "denied",
                "decided_at": now,
                "decided_by": by,
                "note": note,
            }
            if approve:
                values["token"] = token(_record(row))
            conn.execute(
                update(APPROVAL_TABLE)
                .where(t.id == approval_id, t.status == "pending")
                .values(**values)
            )
        return self.get(approval_id)

    def expire_due(self, now: int) -> list[ApprovalRecord]:
        """Mark pending requests past their deadline ``expired`` (at most 500 a call);
        returns those this call expired, each once across replicas: the caller records
        them. Cheap when nothing is due: one query on the (status, expires_at) index,
        no write lock."""
        t = APPROVAL_TABLE.c
        due = (t.status == "pending", t.expires_at <= now)
        with self._engine.connect() as conn:
            if conn.execute(select(t.id).where(*due).limit(1)).first() is None:
                return []
        expired: list[ApprovalRecord] = []
        with self._locked() as conn:
            rows = conn.execute(select(APPROVAL_TABLE).where(*due).limit(_MAX_LIST)).all()
            for row in rows:
                # The conditional UPDATE's rowcount says who expired it (who records it),
                # even without the lock's serialisation.
                done = conn.execute(
                    update(APPROVAL_TABLE)
                    .where(t.id == row._mapping["id"], t.status == "pending")
                    .values(status="expired", decided_at=now)
                )
                if done.rowcount == 1:
                    expired.append(_record(row))
        return expired
