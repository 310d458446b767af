"""`axid audit proof SEQ [--size N]` and `axid audit consistency OLD [--size N]`.

Each printed proof is checked with the RFC 9162 verification functions against
roots recomputed here from the stored entries and against the printed signed
checkpoint, which must be the stored note of exactly that size.
"""

from __future__ import annotations

import base64

import _spec_rfc9162 as rfc9162
from _audit_helpers import LogFx, runner
from test_audit_cli_verify import N
from test_audit_cli_verify import fx as fx  # the fixtures
from test_audit_cli_verify import sfx as sfx

from axid.audit.merkle import root_from_leaf_hashes, verify_consistency, verify_inclusion
from axid.audit.note import Checkpoint, NoteVerifier, open_checkpoint
from axid.cli import app

CP_SIZES = (12, 21, 40)  # test_audit_cli_verify.BATCHES




def leaves(fx: LogFx) -> list[bytes]:
    return [fx.entry(i)[1] for i in range(N)]


def run(fx: LogFx, *args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, ["audit", *args, *fx.db_args()])
    return r.exit_code, r.stdout, r.stderr


def split_proof(fx: LogFx, text: str, first: list[str]) -> tuple[list[bytes], Checkpoint, str]:
    """The proof's head lines must be ``first``; returns (hashes, checkpoint, note text)."""
    head, note = text.split("\n\n", 1)
    lines = head.split("\n")
    assert lines[: len(first)] == first
    hashes = [base64.b64decode(x, validate=True) for x in lines[len(first) :]]
    cp = open_checkpoint(note.encode(), [NoteVerifier.from_vkey(fx.vkey)], origin=f"axid/{fx.log}")
    return hashes, cp, note


def test_proof_at_each_checkpoint_size(fx: LogFx) -> None:
    hashes = leaves(fx)
    for size in CP_SIZES:
        for seq in (0, size // 2, size - 1):
            code, out, err = run(fx, "proof", str(seq), "--size", str(size))
            assert code == 0, err
            proof, cp, note = split_proof(fx, out, ["c2sp.org/tlog-proof@v1", f"index {seq}"])
            assert cp.size == size and note.encode() == fx.checkpoint(size)
            assert cp.root == root_from_leaf_hashes(hashes[:size])
            verify_inclusion(seq, size, hashes[seq], proof, cp.root)
            assert rfc9162.verify_inclusion(seq, size, hashes[seq], proof, cp.root)
    # Without --size: the latest.
    code, out, _ = run(fx, "proof", "5")
    assert code == 0
    assert split_proof(fx, out, ["c2sp.org/tlog-proof@v1", "index 5"])[1].size == N


def test_proof_bad_size_exit_2(sfx: LogFx) -> None:
    code, out, err = run(sfx, "proof", "3", "--size", "13")
    assert (code, out) == (2, "") and "no checkpoint at size 13" in err
    code, _, err = run(sfx, "proof", "12", "--size", "12")
    assert code == 2 and "not in the tree of size 12" in err
    assert run(sfx, "proof", "3", "--size", "-1")[0] == 2


def test_consistency_between_every_pair(fx: LogFx) -> None:
    hashes = leaves(fx)
    for size in CP_SIZES:
        for old in sorted({0, 1, 7, *(s for s in CP_SIZES if s <= size), size - 1, size}):
            code, out, err = run(fx, "consistency", str(old), "--size", str(size))
            assert code == 0, (old, size, err)
            proof, cp, note = split_proof(fx, out, [f"old {old}"])
            assert cp.size == size and note.encode() == fx.checkpoint(size)
            if old in (0, size):
                assert proof == []  # trivially consistent
            old_root = root_from_leaf_hashes(hashes[:old])
            verify_consistency(old, size, old_root, cp.root, proof)
            # And with RFC 9162's own algorithm, written in the test from the RFC.
            spec_root = rfc9162.mth_of_leaf_hashes(hashes[:old])
            assert rfc9162.verify_consistency(old, size, spec_root, cp.root, proof)


def test_consistency_defaults_to_the_latest_checkpoint(fx: LogFx) -> None:
    code, out, _ = run(fx, "consistency", "21")
    assert code == 0
    proof, cp, _ = split_proof(fx, out, ["old 21"])
    assert cp.size == N
    verify_consistency(21, N, root_from_leaf_hashes(leaves(fx)[:21]), cp.root, proof)


def test_consistency_text_is_the_witness_request_form(sfx: LogFx) -> None:
    code, out, _ = run(sfx, "consistency", "12", "--size", "21")
    assert code == 0
    lines = out.split("\n")
    assert lines[0] == "old 12"
    blank = lines.index("")
    assert 1 <= blank <= 64  # at most 63 proof lines (tlog-witness)
    assert all(len(base64.b64decode(x, validate=True)) == 32 for x in lines[1:blank])
    assert "\n".join(lines[blank + 1 :]).encode() == sfx.checkpoint(21)


def test_consistency_usage_errors_exit_2(sfx: LogFx) -> None:
    code, out, err = run(sfx, "consistency", "22", "--size", "21")
    assert (code, out) == (2, "") and "old size 22 is larger" in err
    code, _, err = run(sfx, "consistency", "3", "--size", "20")
    assert code == 2 and "no checkpoint at size 20" in err
    code, _, err = run(sfx, "consistency", str(N + 1))
    assert code == 2 and f"larger than the checkpoint's size {N}" in err
    assert run(sfx, "consistency", "-1")[0] == 2
    assert run(sfx, "consistency", "x")[0] == 2
    r = runner.invoke(app, ["audit", "consistency", "1", "--db", "sqlite:////nonexistent/x.db"])
    assert r.exit_code == 2 and "no database" in r.stderr


def test_consistency_over_a_damaged_tree_exit_2(sfx: LogFx) -> None:
    sfx.sql("DELETE FROM axid_audit_node WHERE log = :log")  # the stored subtree hashes
    code, _, err = run(sfx, "consistency", "7", "--size", "21")
    assert code == 2 and "incomplete" in err and "axid audit verify" in err
