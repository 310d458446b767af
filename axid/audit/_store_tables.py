"""The decision-log store's SQL schema: log names, the five tables, row layouts.

Declarations only (plus the statements built once from them); the engine is
:mod:`axid.audit._store_engine`. Re-exported by :mod:`axid.audit.store`.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    and_,
    bindparam,
    or_,
    select,
)
from sqlmodel import Field, SQLModel

from axid.audit._store_errors import LogNameError
from axid.audit.note import is_valid_key_name

__all__ = [
    "LOG_NAME_RE",
    "AuditCheckpoint",
    "AuditCosignature",
    "AuditEntry",
    "AuditLog",
    "AuditNode",
    "origin_for",
    "validate_log_name",
    "validate_origin",
]

LOG_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ORIGIN_PREFIX = "axid/"
_MAX_ORIGIN_BYTES = 255  # subtree/v1 cosignatures carry it with a one-byte length


# --------------------------------------------------------------------------- names


def validate_log_name(log: object) -> str:
    """Return ``log`` if it is a valid log name (``[a-z0-9][a-z0-9._-]{0,63}``)."""
    if not isinstance(log, str) or not LOG_NAME_RE.fullmatch(log):
        raise LogNameError(f"invalid log name {log!r}: want [a-z0-9][a-z0-9._-]{{0,63}}")
    return log


def validate_origin(origin: object) -> str:
    """Return ``origin`` if it can be a log's checkpoint origin.

    It is the log key's note name (C2SP signed-note: non-empty, no whitespace,
    no ``+``, no control characters), at most 255 bytes, and schema-less (no
    ``://``: ``example.org/axid/payments``, not a URL with a scheme).
    """
    if not isinstance(origin, str) or not is_valid_key_name(origin):
        raise LogNameError(f"invalid origin {origin!r}: want a note key name (no space, no '+')")
    if len(origin.encode("utf-8")) > _MAX_ORIGIN_BYTES:
        raise LogNameError(f"invalid origin {origin!r}: more than {_MAX_ORIGIN_BYTES} bytes")
    if "://" in origin:
        raise LogNameError(f"invalid origin {origin!r}: schema-less, e.g. example.org/axid/log")
    return origin


def origin_for(log: str, origin: str | None = None) -> str:
    """The checkpoint origin (and note key name) of log ``log``: ``origin``
    (validated) when one is configured, else ``axid/<log>``."""
    validate_log_name(log)
    return _ORIGIN_PREFIX + log if origin is None else validate_origin(origin)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _b(value: Any) -> bytes:
    # Drivers may hand back memoryview/bytearray for binary columns.
    return bytes(value)


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
