"""What the budget tests share: a fresh database per test (a SQLite file, or a new
PostgreSQL database on the AXID_TEST_DATABASE_URL server, dropped afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from _pg import require_pg
from sqlalchemy.engine import make_url

BACKENDS = ("sqlite", "postgresql")


@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of ``backend``; a PostgreSQL one is dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/budget-{uuid.uuid4().hex[:8]}.db"
        return
    server = require_pg()
    name = f"axid_budget_{uuid.uuid4().hex[:12]}"
    admin = make_url(server).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
