"""Export a decision log as an offline bundle an auditor can verify without the database.

Layout (the contract in DESIGN.md):

- ``DIR/entries.jsonl``: every entry's exact stored bytes followed by ``\\n``;
- ``DIR/checkpoints/<size>``: every signed checkpoint note exactly as stored,
  followed by the witnesses' cosignature lines stored beside it (the C2SP
  form of a cosigned checkpoint: the log's signature line, then each witness's);
- ``DIR/vkey``: the log's verifier key line followed by ``\\n``.

Nothing is re-encoded: the bundle holds the bytes that were hashed and signed
(and cosigned),
so ``axid audit verify DIR`` checks the very same data. The export reads one
consistent cut of the log (see :class:`axid.audit.verify.DatabaseSource`).
Files are created exclusively with mode 0644, each fsynced, then the
directories, so a bundle that exists after a crash is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axid.audit.findings import VerifyUsageError
from axid.audit.sources import DatabaseSource

__all__ = ["ExportError", "ExportResult", "export_bundle"]

_FILE_MODE = 0o644
_DIR_MODE = 0o755
_FLUSH_AT = 1 << 20


class ExportError(VerifyUsageError):
    """The bundle cannot be written (target not empty, I/O error) or the log not read."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote."""

    path: Path
    log: str
    entries: int
    checkpoints: int
    vkey: str


def export_bundle(
    store_or_url: Any, log: str | None, out_dir: str | os.PathLike[str]
) -> ExportResult:
    """Write the bundle of ``log`` into ``out_dir`` (created if absent; must be empty).

    ``store_or_url`` is a database URL (then ``log`` may be None when the
    database holds exactly one log) or an open
    :class:`~axid.audit.store.LogStore` (then ``log`` must be None or its name).
    """
    if isinstance(store_or_url, str):
        try:
            source = DatabaseSource(store_or_url, log)
        except VerifyUsageError as e:
            raise ExportError(str(e)) from e
    else:
        if log is not None and log != store_or_url.log:
            raise ExportError(f"store is for log {store_or_url.log!r}, not {log!r}")
        source = DatabaseSource.from_store(store_or_url)
    try:
        return _export(source, Path(out_dir))
    finally:
        source.close()


def _prepare_dir(out: Path) -> None:
    try:
        out.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError as e:
        raise ExportError(f"{out} exists and is not a directory") from e
    except OSError as e:
        raise ExportError(f"cannot create {out}: {e.strerror}") from e
    if not out.is_dir():
        raise ExportError(f"{out} is not a directory")
    try:
        if any(out.iterdir()):
            raise ExportError(f"refusing to export into non-empty directory {out}")
    except OSError as e:
        raise ExportError(f"cannot list {out}: {e.strerror}") from e


def _create(path: Path) -> int:
    # O_EXCL: never overwrite or follow a planted symlink; fchmod makes the mode exact.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), _FILE_MODE)
    os.fchmod(fd, _FILE_MODE)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: Path, data: bytes) -> None:
    fd = _create(path)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _export(source: DatabaseSource, out: Path) -> ExportResult:
    _prepare_dir(out)
    log = source.log_name or ""
    vkey = source.vkey()
    if vkey is None:  # pragma: no cover - a stored log always has a vkey
        raise ExportError(f"log {log!r} has no verifier key")
    try:
        cp_dir = out / "checkpoints"
        cp_dir.mkdir(mode=_DIR_MODE)
        os.chmod(cp_dir, _DIR_MODE)  # the umask may have narrowed it

        n = 0
        fd = _create(out / "entries.jsonl")
        try:
            buf: list[bytes] = []
            pending = 0
            for row in source.entries():  # (seq, data, leaf hash, index columns...)
                data = row[1]
                buf.append(data)
                buf.append(b"\n")
                pending += len(data) + 1
                n += 1
                if pending >= _FLUSH_AT:
                    _write_all(fd, b"".join(buf))
                    buf, pending = [], 0
            _write_all(fd, b"".join(buf))
            os.fsync(fd)
        finally:
            os.close(fd)

        c = 0
        for size, note in source.checkpoints():
            _write_file(cp_dir / str(size), note)
            c += 1
        _fsync_dir(cp_dir)
        _write_file(out / "vkey", vkey.encode("ascii") + b"\n")
        _fsync_dir(out)
    except OSError as e:
        raise ExportError(f"cannot write the bundle in {out}: {e}") from e
    return ExportResult(path=out, log=log, entries=n, checkpoints=c, vkey=vkey)
