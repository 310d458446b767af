"""The authenticated head in-process: its pure checks, the head file, open-time checks,
several writers on one database, and the integrity-failure counter."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from _audit_storage_helpers import db_url, fields, fresh_log
from _insider import Snapshot, checkpoints, rewrite_tail
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from axid.audit import AuditUnavailable, DecisionLog
from axid.audit.head import (
    IntegrityFailure,
    check_complete,
    check_extends,
    check_signed,
    read_head_file,
    write_head_file,
)
from axid.audit.merkle import consistency_proof, root_from_leaf_hashes
from axid.audit.metrics import LogCollector
from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint

KINDS = ["sqlite", "postgresql"]


# --------------------------------------------------------------------------- pure checks


def _leaves(n: int) -> list[bytes]:
    return [bytes([i % 256]) * 32 for i in range(n)]


def _cp(n: int, leaves: list[bytes] | None = None) -> Checkpoint:
    return Checkpoint("axid/t", n, root_from_leaf_hashes((leaves or _leaves(n))[:n]))


def test_check_signed() -> None:
    signer = NoteSigner("axid/t", Ed25519PrivateKey.generate())
    other = NoteSigner("axid/t", Ed25519PrivateKey.generate())
    assert check_signed(None, signer.verifier(), 0) is None
    with pytest.raises(IntegrityFailure, match="complete"):
        check_signed(None, signer.verifier(), 3)  # entries but no checkpoint
    note = sign_checkpoint(_cp(3), signer)
    assert check_signed(note, signer.verifier(), 3) == _cp(3)
    with pytest.raises(IntegrityFailure, match="signature"):
        check_signed(sign_checkpoint(_cp(3), other), signer.verifier(), 3)
    with pytest.raises(IntegrityFailure, match="signature"):
        check_signed(note.replace(b"\n3\n", b"\n4\n"), signer.verifier(), 3)


def test_check_complete() -> None:
    cp = _cp(5)
    check_complete(cp, 5, lambda: cp.root)
    with pytest.raises(IntegrityFailure, match="size 5 but 6"):
        check_complete(cp, 6, lambda: cp.root)
    with pytest.raises(IntegrityFailure, match="signed root"):
        check_complete(cp, 5, lambda: bytes(32))


def test_check_extends() -> None:
    leaves = _leaves(13)
    nodes = {(0, i): h for i, h in enumerate(leaves)}

    def get(level: int, idx: int) -> bytes:
        lo = idx << level
        return root_from_leaf_hashes(leaves[lo : lo + (1 << level)]) if level else nodes[(0, idx)]

    check_extends(None, _cp(4, leaves), [])
    check_extends(_cp(0, leaves), None, [])
    check_extends(_cp(4, leaves), _cp(4, leaves), [])
    check_extends(_cp(4, leaves), _cp(13, leaves), consistency_proof(4, 13, get))
    with pytest.raises(IntegrityFailure, match="rolled back"):
        check_extends(_cp(5, leaves), _cp(4, leaves), [])
    with pytest.raises(IntegrityFailure, match="rolled back"):
        check_extends(_cp(5, leaves), None, [])
    with pytest.raises(IntegrityFailure, match="forked"):
        check_extends(_cp(4, leaves), _cp(4, _leaves(20)[::-1]), [])
    forked = [*leaves[:3], bytes(32), *leaves[4:]]
    with pytest.raises(IntegrityFailure, match="consistent"):
        check_extends(_cp(4, forked), _cp(13, leaves), consistency_proof(4, 13, get))


# --------------------------------------------------------------------------- head file


def test_head_file_is_written_atomically_0600(tmp_path: Path) -> None:
    p = tmp_path / "x.head"
    assert read_head_file(p) is None
    write_head_file(p, b"one\n")
    write_head_file(p, b"two\n")
    assert read_head_file(p) == b"two\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ["x.head"]  # no temporary left
    os.chmod(p, 0o644)
    with pytest.raises(IntegrityFailure, match="group or others"):
        read_head_file(p)
    os.chmod(p, 0o600)
    link = tmp_path / "link.head"
    link.symlink_to(p)
    with pytest.raises(OSError):
        read_head_file(link)


# --------------------------------------------------------------------------- DecisionLog


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return db_url(request.param, tmp_path)


async def test_head_file_follows_commits(url: str, tmp_path: Path) -> None:
    log = fresh_log()
    key = tmp_path / "k.pem"
    async with await DecisionLog.open(url, log=log, key=key, create_key=True) as dl:
        r = await dl.append(fields(0))
        await dl.append(fields(1))
    head = tmp_path / f"{log}.head"  # default: beside the key
    assert read_head_file(head) == checkpoints(url, log)[-1]
    assert r.checkpoint in checkpoints(url, log)
    async with await DecisionLog.open(url, log=log, key=key) as dl:
        assert (await dl.append(fields(2))).seq == 2
    assert read_head_file(head) == checkpoints(url, log)[-1]


async def test_rollback_is_refused_on_open(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = fresh_log()
    key = tmp_path / "k.pem"
    async with await DecisionLog.open(url, log=log, key=key, create_key=True) as dl:
        await dl.append(fields(0))
        snap = Snapshot(url, log, tmp_path)
        await dl.append(fields(1))
    snap.restore()
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR, logger="axid.audit"):
        dl = await DecisionLog.open(url, log=log, key=key)
    async with dl:
        registry.register(LogCollector(lambda: [dl]))
        for _ in range(2):
            with pytest.raises(AuditUnavailable):
                await dl.append(fields(2))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "rolled back" in errors[0].getMessage()
    assert registry.get_sample_value("axid_log_integrity_failures_total", {"log": log}) == 1
    assert len(checkpoints(url, log)) == 1


async def test_head_required(url: str, tmp_path: Path) -> None:
    log = fresh_log()
    key = tmp_path / "k.pem"
    async with await DecisionLog.open(
        url, log=log, key=key, create_key=True, head_required=True
    ) as dl:
        with pytest.raises(AuditUnavailable):
            await dl.append(fields(0))


async def test_head_file_of_another_key_is_refused(url: str, tmp_path: Path) -> None:
    log = fresh_log()
    key = tmp_path / "k.pem"
    head = tmp_path / "h.head"
    write_head_file(
        head,
        sign_checkpoint(_cp(0), NoteSigner(f"axid/{log}", Ed25519PrivateKey.generate())).replace(
            b"axid/t", f"axid/{log}".encode()
        ),
    )
    async with await DecisionLog.open(url, log=log, key=key, create_key=True, head=head) as dl:
        with pytest.raises(AuditUnavailable):
            await dl.append(fields(0))


async def test_two_writers_authenticate_each_other(url: str, tmp_path: Path) -> None:
    # Replicas: each proves the other's batches extend what it last signed.
    log = fresh_log()
    key = tmp_path / "k.pem"
    a = await DecisionLog.open(url, log=log, key=key, create_key=True, head=tmp_path / "a.head")
    b = await DecisionLog.open(url, log=log, key=key, head=tmp_path / "b.head")
    async with a, b:
        for i in range(12):
            await (a if i % 3 else b).append(fields(i))
        # The insider rewrites what both signed; neither signs on top of it.
        rewrite_tail(url, log, 5, lambda t: t[::-1])
        for w in (a, b):
            with pytest.raises(AuditUnavailable):
                await w.append(fields(99))
    assert len(checkpoints(url, log)) == 12
