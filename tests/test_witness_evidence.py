"""A log operator who re-signs a rewritten history WITH THE REAL KEY is refused, and the
refusal is kept: `axid witness evidence` lists the exact request bodies (SQLite and
PostgreSQL state)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from _pg import require_pg
from _spec_cosignature import verify_line
from _witness_helpers import (
    LogSide,
    add_checkpoint,
    body_text,
    init_witness,
    serving,
    unique_origin,
    write_config,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from axid.audit.note import NoteSigner
from axid.cli import _app

SAME_SIZE = b"same size as the latest cosigned checkpoint with another root"
BAD_PROOF = b"consistency proof does not verify"


def _database(kind: str, tmp_path: Path) -> str:
    return require_pg() if kind == "postgresql" else f"sqlite:///{tmp_path}/state.db"


def _evidence(config: Path, *args: str) -> str:
    """`axid witness evidence` (in process: the same command, without a 2 s start-up)."""
    out = CliRunner().invoke(_app.app, ["witness", "evidence", "--config", str(config), *args])
    assert out.exit_code == 0, out.output
    return out.stdout


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rewritten_history_signed_with_the_real_key(kind: str, tmp_path: Path) -> None:
    database = _database(kind, tmp_path)
    witness = init_witness(tmp_path)
    honest = LogSide(unique_origin()).grow(12)
    rewritten = honest.fork(3, b"rewritten").grow(12)  # same key, leaves 3.. replaced
    bystander = LogSide(unique_origin()).grow(4)
    config = write_config(
        tmp_path / "witness.yaml", keys=witness.keys, database=database, logs=[honest, bystander]
    )
    with serving(config) as url, httpx.Client(timeout=10) as client:

        def post(body: bytes) -> httpx.Response:
            return add_checkpoint(client, url, body)

        assert post(honest.body(0, 8)).status_code == 200
        same_size = rewritten.body(8, 8)
        r = post(same_size)
        assert (r.status_code, r.content) == (422, SAME_SIZE + b"\n")
        bigger = rewritten.body(8, 12)  # a "proof" from the rewritten tree
        r = post(bigger)
        assert (r.status_code, r.content) == (422, BAD_PROOF + b"\n")
        # The same fork with a wrong old size: 409, and kept (same size, another root).
        fork_409 = rewritten.body(0, 8)
        r = post(fork_409)
        assert (r.status_code, r.content) == (409, b"8\n")
        # Not evidence: a 409 without a conflict, a forged signature, an unknown log.
        assert post(honest.body(0, 12)).status_code == 409
        impostor = NoteSigner(honest.origin, Ed25519PrivateKey.generate())
        assert post(rewritten.body(8, 8, note=rewritten.note(8, impostor))).status_code == 403
        assert post(LogSide(unique_origin()).grow(2).body(0, 2)).status_code == 404
        # Seen again: counted, not duplicated.
        assert post(same_size).status_code == 422
        # The honest log still gets cosigned; the rewritten one still does not.
        r = post(honest.body(8, 12))
        assert r.status_code == 200
        verify_line(r.text.splitlines()[0], body_text(honest, 12), witness.ed25519)
        r = post(rewritten.body(12, 12))
        assert (r.status_code, r.content) == (422, SAME_SIZE + b"\n")
        assert post(bystander.body(0, 4)).status_code == 200

        rows = json.loads(_evidence(config, "--json", "--origin", honest.origin))
    assert [(e["status"], e["reason"].encode(), e["count"]) for e in rows] == [
        (422, SAME_SIZE, 2),
        (422, BAD_PROOF, 1),
        (
            409,
            b"old size is not the latest cosigned size, and the checkpoint has that size"
            b" with another root",
            1,
        ),
        (422, SAME_SIZE, 1),
    ]
    assert [e["body"].encode() for e in rows] == [
        same_size,
        bigger,
        fork_409,
        rewritten.body(12, 12),
    ]
    assert all(e["origin"] == honest.origin for e in rows)
    assert all(e["first_seen"].endswith("Z") for e in rows)

    text = _evidence(config, "--origin", honest.origin)
    assert text.count(f" {honest.origin} 422 {SAME_SIZE.decode()}") == 2
    assert "(2 times, last " in text
    # The body is shown, indented, line by line: the rewritten root is there.
    for line in same_size.decode().splitlines():
        assert f"    {line}\n" in text
