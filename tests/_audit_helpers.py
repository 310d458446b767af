"""Helpers for the decision-log auditor tests: build real logs, run the real CLI, tamper."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _pg import PG_URL, require_pg  # noqa: F401  (PG_URL re-exported to tests)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from axid.audit.log import DecisionLog
from axid.audit.store import load_log_key, make_engine
from axid.cli import app

# Batch sizes of the standard test log: checkpoints at 50, 90, 150, 180, 230, 290, 300.
BATCHES: tuple[int, ...] = (50, 40, 60, 30, 50, 60, 10)
N_ENTRIES = sum(BATCHES)
CP_SIZES: tuple[int, ...] = tuple(sum(BATCHES[: i + 1]) for i in range(len(BATCHES)))

AXID_BIN = str(Path(sys.executable).parent / "axid")

runner = CliRunner()


def fields_for(i: int) -> dict[str, object]:
    """Varied, deterministic decision fields for entry number ``i``."""
    return {
        "decision": "deny" if i % 7 == 3 else "allow",
        "reason": "scope_denied" if i % 7 == 3 else "ok",
        "method": "GET" if i % 2 else "POST",
        "path": f"/payments/{i}",
        "service": "payments",
        "tenant": "acme" if i % 3 else "globex",
        "agent": f"agent-{i % 4}",
        "run": f"run-{i // 100}",
        "chain": [f"run-{i // 100}"],
    }


async def _build(url: str, log: str, key: Path, batches: Sequence[int]) -> str:
    # gather() queues all of a batch's appends before the batcher's delay runs
    # out, so each gather() is one commit batch (checked through the receipts).
    dlog = await DecisionLog.open(url, log=log, key=key, create_key=True, max_delay=0.03)
    try:
        i = 0
        for n in batches:
            receipts = await asyncio.gather(*(dlog.append(fields_for(i + j)) for j in range(n)))
            i += n
            assert {r.checkpoint_size for r in receipts} == {i}, "batch was split"
            await asyncio.sleep(0.003)  # distinct batch timestamps for --since
        return dlog.vkey
    finally:
        await dlog.close()


def build_log(url: str, log: str, key: Path, batches: Sequence[int] = BATCHES) -> str:
    """Build a log with :class:`DecisionLog`, one commit batch per item; return its vkey."""
    return asyncio.run(_build(url, log, key, batches))


@dataclass
class LogFx:
    """A real log in a real database, with raw SQL access for tampering."""

    url: str
    log: str
    key_path: Path
    vkey: str
    tmp: Path
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url)
        return self._engine

    @property
    def key(self) -> Ed25519PrivateKey:
        return load_log_key(self.key_path)

    def db_args(self) -> list[str]:
        return ["--db", self.url, "--log", self.log]

    def sql(self, stmt: str, **params: Any) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(text(stmt), {"log": self.log, **params})

    def rows(self, stmt: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(stmt), {"log": self.log, **params}))

    def entry(self, seq: int) -> tuple[bytes, bytes]:
        (row,) = self.rows(
            "SELECT data, leaf_hash FROM axid_audit_entry WHERE log = :log AND seq = :seq",
            seq=seq,
        )
        return bytes(row[0]), bytes(row[1])

    def set_entry(self, seq: int, data: bytes, leaf: bytes | None = None) -> None:
        if leaf is None:
            self.sql(
                "UPDATE axid_audit_entry SET data = :d WHERE log = :log AND seq = :seq",
                d=data,
                seq=seq,
            )
        else:
            self.sql(
                "UPDATE axid_audit_entry SET data = :d, leaf_hash = :h "
                "WHERE log = :log AND seq = :seq",
                d=data,
                h=leaf,
                seq=seq,
            )

    def checkpoint(self, size: int) -> bytes:
        (row,) = self.rows(
            "SELECT note FROM axid_audit_checkpoint WHERE log = :log AND size = :size",
            size=size,
        )
        return bytes(row[0])

    def set_checkpoint(self, size: int, note: bytes) -> None:
        self.sql(
            "UPDATE axid_audit_checkpoint SET note = :n WHERE log = :log AND size = :size",
            n=note,
            size=size,
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def copy_sqlite(src_dir: Path, dst_dir: Path) -> None:
    """Copy a closed SQLite log (database file plus any WAL files) and its key."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in src_dir.iterdir():
        if p.is_file():
            shutil.copy2(p, dst_dir / p.name)


def sqlite_template(tmp_path_factory: pytest.TempPathFactory, log: str = "payments") -> Path:
    """Build the standard log once into a directory (db.sqlite + log.pem)."""
    d = tmp_path_factory.mktemp("audit-template")
    build_log(f"sqlite:///{d / 'db.sqlite'}", log, d / "log.pem")
    return d


def sqlite_fx(template: Path, tmp: Path, log: str = "payments") -> LogFx:
    d = tmp / "db"
    copy_sqlite(template, d)
    key = d / "log.pem"
    os.chmod(key, 0o600)
    vkey = _vkey_of(f"sqlite:///{d / 'db.sqlite'}", log)
    return LogFx(f"sqlite:///{d / 'db.sqlite'}", log, key, vkey, tmp)


def _vkey_of(url: str, log: str) -> str:
    from axid.audit.store import LogStore

    engine = make_engine(url)
    try:
        return LogStore(engine, log).vkey()
    finally:
        engine.dispose()


def pg_fx(tmp: Path) -> Iterator[LogFx]:
    """A fresh log with a unique name in the shared PostgreSQL test database."""
    url = require_pg()
    log = f"t-{uuid.uuid4().hex[:16]}"
    key = tmp / "pg-log.pem"
    vkey = build_log(url, log, key)
    fx = LogFx(url, log, key, vkey, tmp)
    try:
        yield fx
    finally:
        for table in ("axid_audit_entry", "axid_audit_node", "axid_audit_checkpoint"):
            fx.sql(f"DELETE FROM {table} WHERE log = :log")
        fx.sql("DELETE FROM axid_audit_log WHERE name = :log")
        fx.close()


def verify_cli(*args: str) -> tuple[int, dict[str, Any] | None, Any]:
    """Run ``axid audit verify ARGS --json`` in-process; (exit code, report, result)."""
    result = runner.invoke(app, ["audit", "verify", *args, "--json"])
    report = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, report, result


def first_bad(report: dict[str, Any] | None) -> dict[str, Any]:
    assert report is not None
    assert report["ok"] is False, report
    fb = report["first_bad"]
    assert fb is not None
    return fb


def bundle_lines(bundle: Path) -> list[bytes]:
    data = (bundle / "entries.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def write_lines(bundle: Path, lines: Sequence[bytes]) -> None:
    (bundle / "entries.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def entry_obj(data: bytes) -> dict[str, Any]:
    return json.loads(data)
