"""Where the auditor reads a log from: an export bundle or the database; and its keys.

- :class:`ExportDirSource`: ``entries.jsonl``, ``checkpoints/<size>``, ``vkey``,
  read strictly (what is malformed is a :class:`SourceFormatError`: a finding);
- :class:`DatabaseSource`: one consistent cut of a log in the database, each
  entry with its row's :data:`INDEX_COLUMNS`;
- :func:`load_vkey_arg`, :func:`load_witness_arg`: the ``--vkey`` and
  ``--witness`` arguments (the key itself, or a file holding it).

Sources only read and say what they read; they decide nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from axid.audit.columns import INDEX_COLUMNS
from axid.audit.cosignature import CosignatureError, WitnessKey
from axid.audit.entry import MAX_ENTRY_SIZE
from axid.audit.findings import SourceFormatError, VerifyUsageError
from axid.audit.note import MAX_NOTE_SIZE, NoteError, NoteVerifier

__all__ = [
    "INDEX_COLUMNS",
    "DatabaseSource",
    "ExportDirSource",
    "LogSource",
    "load_vkey_arg",
    "load_witness_arg",
    "open_database",
]

_SIZE_NAME_RE = re.compile(r"0|[1-9][0-9]*")
_MAX_VKEY_FILE = 4096
_DB_PAGE = 8192  # rows per database read
_BUNDLE_BLOCK = 4 * MAX_ENTRY_SIZE  # bytes of entries.jsonl per read: whole lines, mostly


class LogSource(Protocol):
    """What the verifier reads. Sources may also offer ``log_name`` and ``origin``
    (str | None: the origin stored with the log) and ``size_hint() -> int | None``
    (for a progress bar); all are optional."""

    def entries(self) -> Iterator[tuple[Any, ...]]:
        """``(stored seq, exact entry bytes, stored leaf hash or None)`` in log order,
        each followed, from a database, by the row's :data:`INDEX_COLUMNS`."""
        ...

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        """``(size as stored/named, signed note bytes)``, ascending by size."""
        ...

    def vkey(self) -> str | None:
        """The verifier key stored with the log, if any."""
        ...


def load_vkey_arg(value: str) -> str:
    """A ``--vkey`` argument: the vkey itself, or a file holding it on one line."""
    value = _vkey_text(value, "--vkey")
    try:
        NoteVerifier.from_vkey(value)
    except NoteError as e:
        raise VerifyUsageError(f"bad --vkey: {e}") from e
    return value


def load_witness_arg(value: str) -> WitnessKey:
    """A ``--witness`` argument: a witness vkey (type 0x04 Ed25519 cosignature/v1 or
    0x06 ML-DSA-44 subtree/v1), or a file holding it on one line."""
    text = _vkey_text(value, "--witness")
    try:
        return WitnessKey.from_vkey(text)
    except CosignatureError as e:
        raise VerifyUsageError(f"bad --witness {_clip(text)}: {e}") from e


def _clip(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _vkey_text(value: str, option: str) -> str:
    """The vkey an option names: the value itself, or the one line of the file it names."""
    p = Path(value)
    try:
        is_file = p.is_file()
    except OSError:  # e.g. a name too long to be a path: then it is not a file
        is_file = False
    if is_file:
        text = _read_vkey_file(p, f"vkey file {value}")
        if text is None:
            raise VerifyUsageError(f"vkey file {value} is not ASCII")
        line = text[:-1] if text.endswith("\n") else text
        if not line or "\n" in line or "\r" in line or len(text) > _MAX_VKEY_FILE:
            raise VerifyUsageError(f"vkey file {value} must hold exactly one vkey line")
        return line
    if "+" not in value:
        raise VerifyUsageError(f"{option} {_clip(value)}: no such file, and not a vkey")
    return value


def _read_vkey_file(p: Path, name: str) -> str | None:
    """A vkey file's text, up to one character over the limit; None: not ASCII."""
    try:
        raw = p.read_bytes()[: _MAX_VKEY_FILE + 1]
    except OSError as e:
        raise VerifyUsageError(f"cannot read {name}: {e}") from e
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


class ExportDirSource:
    """An export bundle: ``entries.jsonl``, ``checkpoints/<size>``, ``vkey``.

    Strict: every line ends in ``\\n``, holds no CR and is not empty; checkpoint
    file names are decimal without leading zeros; nothing else is in
    ``checkpoints/``. Deviations are reported as findings (the bundle was
    altered); a missing or unreadable bundle is a :class:`VerifyUsageError`.
    """

    log_name: str | None = None
    origin: str | None = None  # a bundle's origin is its vkey's name: checked against --vkey

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VerifyUsageError(f"{self.path}: no such bundle directory")
        self._entries = self.path / "entries.jsonl"
        self._cps = self.path / "checkpoints"
        if not self._entries.is_file():
            raise VerifyUsageError(f"{self.path}: not an export bundle (no entries.jsonl)")
        if not self._cps.is_dir():
            raise VerifyUsageError(f"{self.path}: not an export bundle (no checkpoints/)")

    def size_hint(self) -> int | None:
        count = 0
        try:
            with self._entries.open("rb") as f:
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
        except OSError as e:
            raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
        return count

    def entries(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        return chain.from_iterable(self._entry_pages())

    def _entry_pages(self) -> Iterator[list[tuple[int, bytes, None]]]:
        """The lines a block at a time; a block with anything unusual in it, and
        everything after, line by line (which then says exactly what is wrong)."""
        try:
            f = self._entries.open("rb")
        except OSError as e:
            raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
        with f:
            seq = 0
            pos = 0  # offset of the first line not yet yielded
            while True:
                try:
                    f.seek(pos)
                    block = f.read(_BUNDLE_BLOCK)
                except OSError as e:
                    raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
                end = block.rfind(b"\n")
                if end < 0:  # the end of the file, or a line longer than a block
                    break
                head = block[:end]
                lines = head.split(b"\n")
                if b"\r" in head or b"" in lines or max(map(len, lines)) > MAX_ENTRY_SIZE + 1:
                    break
                yield [(seq + i, line, None) for i, line in enumerate(lines)]
                seq += len(lines)
                pos += end + 1
            try:
                f.seek(pos)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
            for row in self._lines(f, seq):
                yield [row]

    def _lines(self, f: Any, seq: int) -> Iterator[tuple[int, bytes, None]]:
        while True:
            try:
                line = f.readline(MAX_ENTRY_SIZE + 2)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
            if not line:
                return
            if not line.endswith(b"\n"):
                if len(line) > MAX_ENTRY_SIZE:
                    raise SourceFormatError(
                        f"entries.jsonl line {seq + 1} is longer than an entry can be",
                        seq=seq,
                    )
                raise SourceFormatError(
                    f"entries.jsonl line {seq + 1} does not end with a newline "
                    "(truncated or edited file)",
                    seq=seq,
                )
            body = line[:-1]
            if b"\r" in body:
                raise SourceFormatError(
                    f"entries.jsonl line {seq + 1} contains a carriage return", seq=seq
                )
            if not body:
                raise SourceFormatError(f"entries.jsonl line {seq + 1} is empty", seq=seq)
            yield seq, body, None
            seq += 1

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        sizes: list[int] = []
        try:
            with os.scandir(self._cps) as it:
                for de in it:
                    if not _SIZE_NAME_RE.fullmatch(de.name) or not de.is_file(
                        follow_symlinks=False
                    ):
                        raise SourceFormatError(
                            f"checkpoints/{de.name}: not a checkpoint file (a decimal size "
                            "without leading zeros)"
                        )
                    sizes.append(int(de.name))
        except OSError as e:
            raise VerifyUsageError(f"cannot list {self._cps}: {e}") from e
        sizes.sort()
        return self._read_cps(sizes)

    def _read_cps(self, sizes: list[int]) -> Iterator[tuple[int, bytes]]:
        for size in sizes:
            p = self._cps / str(size)
            try:
                with p.open("rb") as f:
                    # One byte over the limit is enough for open_checkpoint to refuse it.
                    note = f.read(MAX_NOTE_SIZE + 1)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {p}: {e}") from e
            yield size, note

    def vkey(self) -> str | None:
        p = self.path / "vkey"
        if not p.exists():
            return None
        text = _read_vkey_file(p, str(p))
        if text is None:
            raise SourceFormatError("vkey file is not ASCII")
        if (
            len(text) > _MAX_VKEY_FILE
            or not text.endswith("\n")
            or len(text) < 2
            or "\n" in text[:-1]
            or "\r" in text
        ):
            raise SourceFormatError("vkey file must hold exactly one line ending in a newline")
        return text[:-1]


class DatabaseSource:
    """A log in the database, read through :class:`axid.audit.store.LogStore`.

    ``log`` may be None only when the database holds exactly one log. A SQLite
    URL must name an existing file: verifying never creates a database.

    The source reads a consistent cut taken once, in ONE statement (one
    snapshot even under PostgreSQL READ COMMITTED): the entries up to the
    largest stored seq and the checkpoints up to the largest stored size at that
    moment. Batches committed while the pass runs are left out, so verifying a
    live log gives no false "unsigned tail"/"truncated" findings, while rows an
    attacker stored before the cut are all seen.
    """

    def __init__(self, url: str, log: str | None = None) -> None:
        from axid.audit.store import LogStore

        engine, logs = _open_database(url)
        if log is None:
            if len(logs) != 1:
                engine.dispose()
                if not logs:
                    raise VerifyUsageError("the database holds no decision log")
                raise VerifyUsageError(
                    f"the database holds several logs, pass --log: {', '.join(logs)}"
                )
            log = logs[0]
        elif log not in logs:
            engine.dispose()
            raise VerifyUsageError(
                f"no log {log!r} in the database (logs: {', '.join(logs) or 'none'})"
            )
        self._init(LogStore(engine, log), owns_engine=True)

    @classmethod
    def open_all(cls, url: str) -> list[DatabaseSource]:
        """One source per log in the database, by name, sharing one engine
        (closing any of them closes it: close them all when done)."""
        from axid.audit.store import LogStore

        engine, logs = _open_database(url)
        if not logs:
            engine.dispose()
            raise VerifyUsageError("the database holds no decision log")
        sources: list[DatabaseSource] = []
        try:
            for name in logs:
                source = cls.__new__(cls)
                source._init(LogStore(engine, name), owns_engine=True)
                sources.append(source)
        except BaseException:
            engine.dispose()
            raise
        return sources

    @classmethod
    def from_store(cls, store: Any) -> DatabaseSource:
        """Wrap an open :class:`~axid.audit.store.LogStore` (its engine stays the caller's)."""
        self = cls.__new__(cls)
        self._init(store, owns_engine=False)
        return self

    def _init(self, store: Any, *, owns_engine: bool) -> None:
        from sqlalchemy import func, select
        from sqlalchemy.exc import SQLAlchemyError

        from axid.audit.store import AuditCheckpoint, AuditEntry, LogNotFound

        self._sa_error = SQLAlchemyError
        self.store = store
        self.log_name: str | None = store.log
        self._owns_engine = owns_engine
        ent: Any = AuditEntry.__table__
        cps: Any = AuditCheckpoint.__table__
        q = select(
            select(func.max(ent.c.seq)).where(ent.c.log == store.log).scalar_subquery(),
            select(func.max(cps.c.size)).where(cps.c.log == store.log).scalar_subquery(),
            select(func.min(ent.c.seq)).where(ent.c.log == store.log).scalar_subquery(),
        )
        try:
            with store.engine.connect() as conn:
                max_seq, max_cp, min_seq = conn.execute(q).one()
            # The origin stored with the log: its checkpoints' and its key's name.
            self.origin: str | None = store.origin
        except SQLAlchemyError as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e
        except LogNotFound as e:  # its row went away since the log was listed
            raise VerifyUsageError(str(e)) from e
        # Upper bounds of the cut: entries with seq < end_seq, checkpoints <= max_cp.
        self.end_seq = 0 if max_seq is None else int(max_seq) + 1
        self.max_cp = -1 if max_cp is None else int(max_cp)
        self.min_seq = 0 if min_seq is None else int(min_seq)  # < 0 only if tampered with
        self._reader_pid = os.getpid()

    def _guard(self, it: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from it
        except self._sa_error as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e

    def size_hint(self) -> int | None:
        return self.end_seq

    def entries(self) -> Iterator[tuple[Any, ...]]:
        """``(seq, data, leaf_hash, decision, reason, tenant, agent, run, ts)`` rows:
        the entries with their index columns as stored (see :data:`INDEX_COLUMNS`)."""
        # From the lowest stored seq: a row an attacker stored at a negative
        # seq (no log writes one) is seen, and reported, too.
        return self.entries_from(min(self.min_seq, 0))

    def entries_from(self, seq: int) -> Iterator[tuple[Any, ...]]:
        """The stored entries with ``seq`` or above, up to the cut."""
        # A page at a time through the guard: no Python frame per row.
        pages = self.store.indexed_entry_pages(seq, max(seq, self.end_seq), _DB_PAGE)
        return chain.from_iterable(self._guard(pages))

    def read_range(self, start: int, count: int) -> list[Any]:
        """In a forked worker: the rows with seq in ``[start, start + count)``."""
        if self._reader_pid != os.getpid():
            # The connections in the pool are the parent's: leave them alone
            # (not even closed) and open our own (SQLAlchemy's fork recipe).
            self.store.engine.dispose(close=False)
            self._reader_pid = os.getpid()
        end = min(start + count, self.end_seq)
        for page in self.store.indexed_entry_pages(start, end, max(1, end - start)):
            return page
        return []

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        """The signed notes up to the cut, each with its witnesses' cosignature
        lines appended after the log's own (C2SP signed-note: unknown keys are ignored)."""

        def upto() -> Iterator[tuple[int, bytes]]:
            for size, note in self.store.cosigned_checkpoints():
                if size > self.max_cp:
                    return
                yield size, note

        return self._guard(upto())

    def vkey(self) -> str | None:
        from axid.audit.store import LogNotFound

        try:
            return self.store.vkey()
        except LogNotFound as e:
            raise VerifyUsageError(str(e)) from e
        except self._sa_error as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e

    def close(self) -> None:
        """Release the database connections (only if this source opened them)."""
        if self._owns_engine:
            self.store.engine.dispose()


def open_database(url: str) -> Any:
    """An engine for an existing decision-log database (VerifyUsageError if there is
    none at ``url``): the caller disposes of it."""
    engine, _ = _open_database(url)
    return engine


def _open_database(url: str) -> tuple[Any, list[str]]:
    """An engine for an existing decision-log database, and its log names."""
    # Imported here so that bundle verification needs no database layer.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from axid.audit.store import list_logs, make_engine

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise VerifyUsageError("invalid database URL") from e
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:" or not Path(db).is_file():
            raise VerifyUsageError(f"no database file at {db or '(none)'}")
    try:
        engine = make_engine(url)
    except ValueError as e:  # DatabaseURLError
        raise VerifyUsageError(f"invalid database URL: {e}") from e
    try:
        return engine, list_logs(engine)
    except SQLAlchemyError as e:
        engine.dispose()
        raise VerifyUsageError(f"cannot read the decision log tables: {_db_error(e)}") from e


def _db_error(e: Exception) -> str:
    # SQLAlchemy messages embed the SQL and parameters; the first line is enough.
    return str(e).splitlines()[0] if str(e) else type(e).__name__
