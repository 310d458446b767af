"""Shared helpers for the decision-log storage and group-commit tests.

``check_log`` re-verifies a stored log from scratch with the pure functions
only (entry parsing, leaf hashes, the hash chain, Merkle roots, checkpoint
signatures), independently of the official verifier.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from _pg import PG_URL, require_pg

from axid.audit.entry import ZERO_HASH_HEX, parse_entry
from axid.audit.merkle import CompactRange, leaf_hash, verify_consistency
from axid.audit.note import NoteVerifier, open_checkpoint
from axid.audit.store import LogStore


def pg_url() -> str | None:
    return PG_URL


def db_url(kind: str, tmp_path: os.PathLike[str]) -> str:
    """``sqlite`` -> a fresh file under tmp_path; ``pg`` -> the test server (or skip)."""
    if kind == "sqlite":
        return f"sqlite:///{os.fspath(tmp_path)}/audit/axid.db"
    return require_pg()


def fresh_log(prefix: str = "t") -> str:
    """A log name no other test (or earlier run on the shared PostgreSQL) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def fields(i: int, **extra: object) -> dict[str, object]:
    """Realistic decision fields, distinct per ``i``."""
    f: dict[str, object] = {
        "decision": "deny" if i % 7 == 3 else "allow",
        "reason": "scope_missing" if i % 7 == 3 else "ok",
        "method": "POST",
        "path": f"/payments/{i}/refund",
        "service": "payments",
        "peer": "spiffe://example.org/agent/planner",
        "kid": "k1",
        "jti": f"jti-{i}",
        "iss": "https://127.0.0.1:8443",
        "tenant": "acme" if i % 2 else "globex",
        "agent": f"agent-{i % 3}",
        "run": f"run-{i % 5}",
        "chain": ["run-0", f"run-{i % 5}"],
        "scope_required": "payments:refund",
        "note": f"n{i}",
    }
    f.update(extra)
    return f


@dataclass
class LogCheck:
    size: int
    checkpoint_sizes: list[int]
    leaf_hashes: list[bytes]
    entries: list[dict[str, object]]


def check_log(store: LogStore, vkey: str, *, consistency_checks: int | None = None) -> LogCheck:
    """Recompute everything of a stored log; assert it is one intact signed chain.

    Also checks the store's consistency proofs between successive checkpoints
    (at most ``consistency_checks`` evenly spaced pairs when given).
    """
    verifier = NoteVerifier.from_vkey(vkey)
    origin = f"axid/{store.log}"
    assert verifier.name == origin
    hashes: list[bytes] = []
    parsed: list[dict[str, object]] = []
    prev = ZERO_HASH_HEX
    for expect_seq, (seq, data, lh) in enumerate(store.entries(batch=3000)):
        assert seq == expect_seq, f"gap or duplicate at seq {expect_seq} (got {seq})"
        assert lh == leaf_hash(data), f"leaf hash of seq {seq} does not match its bytes"
        e = parse_entry(data)  # canonical form, all fields valid
        assert e["seq"] == seq
        assert e["log"] == store.log
        assert e["prev"] == prev, f"chain broken at seq {seq}"
        prev = lh.hex()
        hashes.append(lh)
        parsed.append(e)

    # Roots of every checkpoint from one pass over the leaves.
    cps = list(store.checkpoints())
    sizes = [s for s, _ in cps]
    assert sizes == sorted(set(sizes))
    roots: dict[int, bytes] = {}
    cr = CompactRange()
    want = iter(sizes)
    nxt = next(want, None)
    if nxt == 0:
        roots[0] = cr.root()
        nxt = next(want, None)
    for h in hashes:
        cr.append(h)
        if cr.size == nxt:
            roots[nxt] = cr.root()
            nxt = next(want, None)
    assert nxt is None, f"checkpoint of size {nxt} beyond the {len(hashes)} entries"
    stride = 1
    if consistency_checks is not None:
        stride = max(1, len(cps) // max(1, consistency_checks))
    prev_cp: tuple[int, bytes] | None = None
    for n, (size, note) in enumerate(cps):
        cp = open_checkpoint(note, [verifier], origin=origin)
        assert cp.size == size
        assert cp.root == roots[size], f"checkpoint {size} root does not match the entries"
        if prev_cp is not None and n % stride == 0:
            verify_consistency(
                prev_cp[0], size, prev_cp[1], cp.root, store.consistency_proof(prev_cp[0], size)
            )
        prev_cp = (size, cp.root)
    # Every entry is covered by a signature: the last checkpoint is the whole log.
    if hashes:
        assert sizes and sizes[-1] == len(hashes)
    assert store.size() == len(hashes)
    return LogCheck(len(hashes), sizes, hashes, parsed)
