"""Decision-log storage: :class:`LogStore`, one log in a SQL database.

Synchronous (SQLAlchemy Core); the asyncio group-commit appender in
:mod:`axid.audit.log` runs it in a worker thread. Storage is kept apart from
the math (:mod:`axid.audit.merkle`, :mod:`axid.audit.head`), and each part of
storage has its own module; this one holds :class:`LogStore` and re-exports
the store's public names:

- :mod:`~axid.audit._store_tables`  the SQL schema: log names, the five tables
- :mod:`~axid.audit._store_engine`  engines, SQLite settings, write locks, driver statements
- :mod:`~axid.audit._store_append`  the append path: sequencing, node rows, checkpoint signing
- :mod:`~axid.audit._store_head`    the authenticated head: lock, read and prove the head
- :mod:`~axid.audit._store_nodes`   stored Merkle nodes and the proofs read from them
- :mod:`~axid.audit._store_checkpoints`  signed checkpoints and their cosignature lines
- :mod:`~axid.audit._store_pages`   entry reads: seq-range pages and filtered queries
- :mod:`~axid.audit._store_sqlite_file`  noticing a SQLite file replaced under a writer
- :mod:`~axid.audit._store_errors`, :mod:`~axid.audit._logkeys`, :mod:`~axid.audit._prooftext`

Invariants the code keeps:

- Rows are only ever inserted. No statement in the store changes or
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

import contextlib
import logging
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any, NoReturn

from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from axid.audit._logkeys import KEY_PASSPHRASE_ENV, LogKeyError, generate_log_key, load_log_key
from axid.audit._prooftext import PROOF_HEADER, consistency_text, proof_text
from axid.audit._store_append import _AppendSQL, _compute_batch, _insert_batch
from axid.audit._store_checkpoints import _Checkpoints, cosignature_key
from axid.audit._store_engine import _write_conn, create_schema, list_logs, make_engine
from axid.audit._store_errors import (
    DatabaseURLError,
    LogKeyMismatch,
    LogNameError,
    LogNotFound,
    NotFound,
    StoreError,
)
from axid.audit._store_head import _authenticated_head, _Head, _HeadSQL, _lock_and_check_key
from axid.audit._store_nodes import _consistency_proof, _inclusion_proof, _Nodes
from axid.audit._store_pages import _EntryPages
from axid.audit._store_sqlite_file import _SQLiteFileWatch
from axid.audit._store_tables import (
    _LOG_T,
    LOG_NAME_RE,
    AuditCheckpoint,
    AuditCosignature,
    AuditEntry,
    AuditLog,
    AuditNode,
    _now_ms,
    origin_for,
    validate_log_name,
    validate_origin,
)
from axid.audit.entry import DecisionFields, EntryError
from axid.audit.head import IntegrityFailure
from axid.audit.note import NoteError, NoteSigner, open_checkpoint
from axid.audit.receipt import Receipt

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
    "validate_origin",
]

_log = logging.getLogger(__name__)


class LogStore:
    """One log in a database: append batches, read entries, checkpoints and proofs."""

    def __init__(
        self,
        engine: Engine,
        log: str,
        *,
        signer: NoteSigner | None = None,
        origin: str | None = None,
    ) -> None:
        self._engine = engine
        self.log = validate_log_name(log)
        # A writer's origin is the configured one (else axid/<log>); a reader's
        # is the one stored in the log's row, read when first asked for.
        self._origin: str | None = None
        if signer is not None or origin is not None:
            self._origin = origin_for(log, origin)
        if signer is not None:
            if not isinstance(signer, NoteSigner):
                raise TypeError("signer must be a NoteSigner")
            if signer.name != self._origin:
                raise StoreError(f"signer key name {signer.name!r} is not {self._origin!r}")
        self._signer = signer
        self._signer_vkey = signer.vkey() if signer is not None else None
        self._sql = _AppendSQL.for_engine(engine)
        self._head_sql = _HeadSQL.for_engine(engine)
        self._verifier = signer.verifier() if signer is not None else None
        # The authenticated head (see axid.audit.head): the last checkpoint this
        # store signed or verified. Every batch proves the database extends it.
        self._trusted: _Head | None = None
        self._failure: IntegrityFailure | None = None  # sticky: until restart
        self.integrity_failures = 0
        self._file = _SQLiteFileWatch(engine, self.log)
        self._nodes = _Nodes(engine, self.log)
        self._checkpoints = _Checkpoints(engine, self.log)
        self._pages = _EntryPages(engine, self.log)

    @property
    def engine(self) -> Engine:
        return self._engine

    # ------------------------------------------------------------------ log row

    @property
    def origin(self) -> str:
        """The log's checkpoint origin: the one this store was opened with, else
        (a reader) the one stored in the log's row (:class:`LogNotFound` if none)."""
        if self._origin is None:
            with self._engine.connect() as conn:
                got = conn.execute(
                    select(_LOG_T.c.origin).where(_LOG_T.c.name == self.log)
                ).scalar()
            if got is None:
                raise LogNotFound(f"no log {self.log!r} in this database")
            self._origin = str(got)
        return self._origin

    def ensure_log(self, origin: str, vkey: str) -> None:
        """Create this log's row if absent; refuse an existing log with another key."""
        mine = self._origin if self._origin is not None else origin_for(self.log)
        if origin != mine:
            raise StoreError(f"origin {origin!r} is not {mine!r} for log {self.log!r}")
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
            raise LogKeyMismatch(
                f"log {self.log!r} exists with origin {got.origin!r}, not {origin!r}; "
                "one log, one origin"
            )
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
        self._file.reconnect_if_replaced()
        # The driver's own cursor, inside SQLAlchemy's transaction: per statement,
        # SQLAlchemy's result and parameter handling cost more than SQLite's work.
        # (Driver errors propagate as they are.) If the commit fails, the trusted
        # head stays: a commit that did happen is then proven like another writer's.
        with self._locked() as (conn, cur):
            head = self._lock_and_authenticate(conn, cur)
            batch = _compute_batch(head, valid, self.log, self.origin, self._signer)
            out = _insert_batch(cur, self._sql, self.log, batch)
        self._trusted = batch.head
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
            head = self._lock_and_authenticate(conn, cur)
        self._trusted = head
        return None if head is None else head.note

    def _lock_and_authenticate(self, conn: Connection, cur: Any) -> _Head | None:
        """Lock the log, check its key, prove the database's head (see _store_head)."""
        _lock_and_check_key(cur, self._head_sql, self.log, self.origin, self._signer_vkey)
        assert self._verifier is not None
        return _authenticated_head(
            conn, cur, self._head_sql, self._nodes, self._verifier, self._trusted
        )

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

    # ------------------------------------------------------------------ checkpoints

    def size(self) -> int:
        """Number of committed entries."""
        with self._engine.connect() as conn:
            return self._checkpoints.tree_size(conn)

    def latest_checkpoint(self) -> bytes | None:
        """The signed checkpoint note of the largest size, or None for an empty log."""
        with self._engine.connect() as conn:
            row = self._checkpoints.latest(conn)
        return None if row is None else row[1]

    def checkpoint(self, size: int) -> bytes | None:
        """The signed checkpoint note at exactly ``size``, or None if there is none."""
        with self._engine.connect() as conn:
            return self._checkpoints.note_at(conn, size)

    def checkpoints(self, batch: int = 1000) -> Iterator[tuple[int, bytes]]:
        """Every ``(size, signed note)`` in increasing size, as stored."""
        return self._checkpoints.pages(batch, cosigned=False)

    # ------------------------------------------------------------------ cosignatures

    def add_cosignatures(self, size: int, lines: Sequence[bytes | str]) -> None:
        """Store witnesses' cosignature lines on the stored checkpoint of ``size``.

        Insert-only: a line by a key (name and key ID) that already cosigned
        this checkpoint is ignored, the first one stays. Only the lines' form
        is checked here; the caller verifies them against the witnesses' keys
        first (:mod:`axid.audit.witnessing`). The checkpoint must be stored.
        """
        self._checkpoints.add_cosignatures(size, lines)

    def cosignatures(self, size: int) -> list[bytes]:
        """The stored cosignature lines on the checkpoint of ``size``, by witness and key ID."""
        with self._engine.connect() as conn:
            return self._checkpoints.cosignature_lines(conn, size, size).get(size, [])

    def cosigned_note(self, size: int) -> bytes | None:
        """The checkpoint note of ``size`` with its cosignature lines appended (C2SP
        form: the log's signature line, then the witnesses'), or None if none."""
        return self._checkpoints.cosigned_note(size)

    def cosigned_checkpoints(self, batch: int = 1000) -> Iterator[tuple[int, bytes]]:
        """:meth:`checkpoints` with each note's cosignature lines appended."""
        return self._checkpoints.pages(batch, cosigned=True)

    def cosigned_sizes(self) -> dict[tuple[str, str], int]:
        """The largest checkpoint size each witness key, ``(name, key ID hex)``, cosigned."""
        return self._checkpoints.cosigned_sizes()

    # ------------------------------------------------------------------ entries

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
        return self._pages.entry_pages(start, end, batch)

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
        return self._pages.indexed_entry_pages(start, end, batch)

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
        return self._pages.query(decision, tenant, agent, run, since_ms, limit, batch)

    # ------------------------------------------------------------------ nodes and proofs

    def node(self, level: int, idx: int) -> bytes:
        """The perfect subtree hash at ``(level, idx)`` (a :data:`NodeGetter`)."""
        with self._engine.connect() as conn:
            return self._nodes.getter(conn)(level, idx)

    def inclusion_proof(self, seq: int, size: int | None = None) -> tuple[list[bytes], bytes]:
        """Inclusion proof of entry ``seq`` in the checkpoint of ``size`` (default: latest).

        Returns ``(proof hashes, signed checkpoint note)``; ``size`` must be a
        checkpointed size, so the proof always comes with its signature.
        """
        return _inclusion_proof(self._nodes, self._checkpoints, seq, size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 consistency proof between tree sizes ``size1 <= size2``."""
        return _consistency_proof(self._nodes, self._checkpoints, size1, size2)
