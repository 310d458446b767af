"""Noticing that a SQLite log file was replaced under a running writer.

A restored copy put at the path: pooled connections would go on writing to
the old file. The store reconnects, so that the head checks (see
:mod:`axid.audit._store_head`) see what is at the path now.
"""

from __future__ import annotations

import logging
import os

from sqlalchemy import Engine

_log = logging.getLogger("axid.audit.store")  # the store's logger, as before the split


def _sqlite_file_id(engine: Engine) -> tuple[int, int] | None:
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return None
    try:
        st = os.stat(engine.url.database)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _SQLiteFileWatch:
    """The (device, inode) of a SQLite engine's file, checked before each append."""

    __slots__ = ("_engine", "_file_id", "_log_name")

    def __init__(self, engine: Engine, log: str) -> None:
        self._engine = engine
        self._log_name = log
        self._file_id = _sqlite_file_id(engine)

    def reconnect_if_replaced(self) -> None:
        if self._engine.dialect.name != "sqlite":
            return
        now = _sqlite_file_id(self._engine)
        if self._file_id is None:
            self._file_id = now  # the file did not exist when this store was made
        elif now != self._file_id:
            _log.warning(
                "decision log %s: the database file was replaced; reconnecting", self._log_name
            )
            self._engine.dispose()
            self._file_id = now
