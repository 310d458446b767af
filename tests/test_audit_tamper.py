"""Tampering with the decision log must make `axid audit verify` fail and name the first bad seq.

The issue's requirement: it must be impossible to change, drop, reorder or cut
off an entry without `axid audit verify` saying so. Each case here builds a
real log with DecisionLog (300 entries in 7 commit batches, so checkpoints at
50, 90, 150, 180, 230, 290 and 300), tampers with it the way an attacker with
write access would (raw SQL on SQLite and PostgreSQL; file edits on an
export bundle) and runs the real CLI.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from _audit_helpers import (
    AXID_BIN,
    CP_SIZES,
    N_ENTRIES,
    LogFx,
    build_log,
    bundle_lines,
    copy_sqlite,
    first_bad,
    pg_fx,
    runner,
    sqlite_fx,
    sqlite_template,
    verify_cli,
    write_lines,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid.audit import accelerate as accelerate_mod
from axid.audit import forkpool as forkpool_mod
from axid.audit import reference as reference_mod
from axid.audit.entry import DecisionFields, canonical_entry, parse_ts
from axid.audit.merkle import CompactRange, leaf_hash
from axid.audit.note import Checkpoint, NoteSigner, NoteVerifier, open_checkpoint, sign_checkpoint
from axid.audit.store import LogStore, create_schema, make_engine
from axid.audit.verify import (
    DatabaseSource,
    ExportDirSource,
    VerifyReport,
    VerifyUsageError,
    verify_log,
)
from axid.cli import app

K = 123  # the victim entry: in the batch 90..149, covered first by checkpoint 150


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory)


@pytest.fixture(params=["sqlite", "postgresql"])
def fx(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> Iterator[LogFx]:
    if request.param == "sqlite":
        f = sqlite_fx(template, tmp_path)
        try:
            yield f
        finally:
            f.close()
    else:
        yield from pg_fx(tmp_path)


@pytest.fixture
def sfx(template: Path, tmp_path: Path) -> Iterator[LogFx]:
    """SQLite only (cases whose storage mechanics do not differ by database)."""
    f = sqlite_fx(template, tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def bundle(sfx: LogFx, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    r = runner.invoke(app, ["audit", "export", *sfx.db_args(), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _reencode(data: bytes, **changes: Any) -> bytes:
    obj = json.loads(data)
    obj.update(changes)
    return rfc8785.dumps(obj)


def _other_signer() -> NoteSigner:
    return NoteSigner("axid/payments", Ed25519PrivateKey.generate())


def _resign(note: bytes, vkey: str, signer: NoteSigner) -> bytes:
    cp = open_checkpoint(note, [NoteVerifier.from_vkey(vkey)])
    return sign_checkpoint(cp, signer)


def _replace_signature(note: bytes) -> bytes:
    """Keep the text and the key id, put 64 other bytes where the signature was."""
    text, sig_line = note.rstrip(b"\n").rsplit(b"\n", 1)
    prefix, b64 = sig_line.rsplit(b" ", 1)
    raw = base64.b64decode(b64)
    forged = raw[:4] + bytes(64)
    return text + b"\n" + prefix + b" " + base64.b64encode(forged) + b"\n"


# --------------------------------------------------------------------------- intact


def test_intact_log_verifies(fx: LogFx) -> None:
    code, report, result = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 0, result.output
    assert report is not None and report["ok"] is True
    assert report["entries"] == N_ENTRIES
    assert report["checkpoints"] == len(CP_SIZES)
    assert report["first_bad"] is None
    assert report["latest_checkpoint"]["size"] == N_ENTRIES
    assert report["warnings"] == []


def test_intact_log_human_output_and_vkey_warning(sfx: LogFx) -> None:
    r = runner.invoke(app, ["audit", "verify", "--db", sfx.url, "--trust-log-key"])
    assert r.exit_code == 0, r.output
    assert "OK: the log is intact" in r.stdout
    assert f"entries:       {N_ENTRIES}" in r.stdout
    assert f"checkpoints:   {len(CP_SIZES)}" in r.stdout
    assert sfx.checkpoint(N_ENTRIES).decode() in r.stdout  # latest checkpoint, to keep
    # With --trust-log-key the key comes from the log itself: the auditor is warned.
    assert "no --vkey given" in r.stderr


# --------------------------------------------------------------------------- database tampering


def test_db_change_one_byte(fx: LogFx) -> None:
    data, _ = fx.entry(K)
    i = data.index(b'"path":"/payments/123"') + len(b'"path":"/payments/12')
    fx.set_entry(K, data[:i] + b"4" + data[i + 1 :])  # one byte; leaf hash left as stored
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == K
    assert "altered" in fb["what"]


def test_db_change_field_and_recompute_its_leaf_hash(fx: LogFx) -> None:
    data, _ = fx.entry(K)
    assert json.loads(data)["decision"] == "allow"
    forged = _reencode(data, decision="deny")
    fx.set_entry(K, forged, leaf_hash(forged))
    fx.sql("UPDATE axid_audit_entry SET decision = 'deny' WHERE log = :log AND seq = :s", s=K)
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == K
    assert f"entry {K} was altered" in fb["what"]


def test_db_delete_entry_in_the_middle(fx: LogFx) -> None:
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = :s", s=K)
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == K
    assert "missing" in fb["what"]


def test_db_swap_two_entries(fx: LogFx) -> None:
    a, b = fx.entry(K), fx.entry(K + 1)
    fx.set_entry(K, *b)
    fx.set_entry(K + 1, *a)
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == K
    assert f"carries seq {K + 1}" in fb["what"]


def _insert_row(fx: LogFx, seq: int, data: bytes) -> None:
    fx.sql(
        "INSERT INTO axid_audit_entry (log, seq, leaf_hash, data, ts, decision, reason) "
        "VALUES (:log, :seq, :h, :d, 0, 'allow', 'ok')",
        seq=seq,
        h=leaf_hash(data),
        d=data,
    )


def _forged(fx: LogFx, seq: int, prev: bytes) -> bytes:
    return canonical_entry(
        {"decision": "allow", "reason": "ok", "agent": "mallory", "path": "/payments/all"},
        seq=seq,
        prev=prev.hex(),
        log=fx.log,
        ts=1_700_000_000_000,
    )


def test_db_insert_forged_entry_after_the_end(fx: LogFx) -> None:
    # Correctly chained and hashed, but no key to sign a checkpoint for it.
    _, last = fx.entry(N_ENTRIES - 1)
    _insert_row(fx, N_ENTRIES, _forged(fx, N_ENTRIES, last))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == N_ENTRIES
    assert "unsigned tail" in fb["what"]


def test_db_insert_forged_entry_in_the_middle(fx: LogFx) -> None:
    # The primary key forbids a second row at seq K: shift K.. up by one, forge K.
    rows = [fx.entry(s) for s in range(K, N_ENTRIES)]
    _insert_row(fx, N_ENTRIES, rows[-1][0])
    for s in range(N_ENTRIES - 1, K, -1):
        fx.set_entry(s, *rows[s - 1 - K])
    _, prev = fx.entry(K - 1)
    forged = _forged(fx, K, prev)
    fx.set_entry(K, forged, leaf_hash(forged))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == K
    assert "inserted" in fb["what"]


def _rechain_from(fx: LogFx, start: int, first: bytes) -> None:
    """What a thorough attacker does: rewrite entry ``start`` (and its row's index
    columns, which verify compares with the bytes) and re-chain all after it."""
    fx.set_entry(start, first, leaf_hash(first))
    e = json.loads(first)
    fx.sql(
        "UPDATE axid_audit_entry SET decision = :d, reason = :r, tenant = :t, agent = :a, "
        "run = :u, ts = :ts WHERE log = :log AND seq = :s",
        d=e["decision"],
        r=e["reason"],
        t=e["tenant"],
        a=e["agent"],
        u=e["run"],
        ts=parse_ts(e["ts"]),
        s=start,
    )
    prev = leaf_hash(first)
    for s in range(start + 1, N_ENTRIES):
        data, _ = fx.entry(s)
        new = _reencode(data, prev=prev.hex())
        prev = leaf_hash(new)
        fx.set_entry(s, new, prev)


def test_db_rewrite_entry_and_rechain_the_rest(fx: LogFx) -> None:
    data, _ = fx.entry(K)
    _rechain_from(fx, K, _reencode(data, decision="deny"))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    # The chain is whole again; only the signed roots catch it, so the finding
    # names the batch the rewrite starts in: seq 90..149, checkpoint 150.
    assert fb["seq"] == 90
    assert fb["checkpoint_size"] == 150
    assert "root mismatch" in fb["what"] and "90..149" in fb["what"]


def test_db_replaced_key_needs_the_published_vkey(fx: LogFx) -> None:
    """Attacker rewrites history, re-signs every checkpoint with its own key and stores
    that key's vkey: only an auditor holding the published vkey notices."""
    data, _ = fx.entry(K)
    _rechain_from(fx, K, _reencode(data, decision="deny"))
    evil = NoteSigner(f"axid/{fx.log}", Ed25519PrivateKey.generate())
    cr = CompactRange()
    for s in range(N_ENTRIES):
        cr.append(fx.entry(s)[1])
        if s + 1 in CP_SIZES:
            cp = Checkpoint(f"axid/{fx.log}", s + 1, cr.root())
            fx.set_checkpoint(s + 1, sign_checkpoint(cp, evil))
    fx.sql("UPDATE axid_audit_log SET vkey = :v WHERE name = :log", v=evil.vkey())

    code, report, result = verify_cli(*fx.db_args(), "--trust-log-key")
    assert code == 0, result.output  # self-consistent forgery: why --vkey matters
    assert report is not None and any("no --vkey" in w for w in report["warnings"])

    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] is None
    assert "key was replaced" in fb["what"]


def test_db_cut_off_last_batch_needs_trusted_checkpoint(fx: LogFx, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted-300"
    trusted.write_bytes(fx.checkpoint(N_ENTRIES))
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= :s", s=N_ENTRIES - 10)
    fx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > :s", s=N_ENTRIES - 10)

    # The truncated log alone is a valid, shorter log: nothing in it can show
    # the cut. This is why auditors keep the checkpoint from their last run.
    code, report, result = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 0, result.output
    assert report is not None and report["entries"] == N_ENTRIES - 10

    code, report, _ = verify_cli(
        *fx.db_args(), "--vkey", fx.vkey, "--trusted-checkpoint", str(trusted)
    )
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == N_ENTRIES - 10
    assert "truncated or rolled back" in fb["what"]


def test_db_rollback_caught_by_trusted_checkpoint(sfx: LogFx, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted-300"
    trusted.write_bytes(sfx.checkpoint(N_ENTRIES))
    sfx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= 150")
    sfx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > 150")
    code, report, _ = verify_cli(
        *sfx.db_args(), "--trust-log-key", "--trusted-checkpoint", str(trusted)
    )
    assert code == 1
    assert first_bad(report)["seq"] == 150


def test_db_cut_off_entries_but_not_their_checkpoint(fx: LogFx) -> None:
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= :s", s=N_ENTRIES - 10)
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == N_ENTRIES - 10
    assert fb["checkpoint_size"] == N_ENTRIES
    assert "truncated" in fb["what"]


def test_db_drop_last_entry(sfx: LogFx) -> None:
    sfx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = :s", s=N_ENTRIES - 1)
    code, report, _ = verify_cli(*sfx.db_args(), "--trust-log-key")
    assert code == 1
    assert first_bad(report)["seq"] == N_ENTRIES - 1


def test_db_replace_checkpoint_signature(fx: LogFx) -> None:
    fx.set_checkpoint(150, _replace_signature(fx.checkpoint(150)))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert (fb["seq"], fb["checkpoint_size"]) == (90, 150)
    assert "invalid signature" in fb["what"]


def test_db_checkpoint_signed_with_another_key(fx: LogFx) -> None:
    other = NoteSigner(f"axid/{fx.log}", Ed25519PrivateKey.generate())
    fx.set_checkpoint(150, _resign(fx.checkpoint(150), fx.vkey, other))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert (fb["seq"], fb["checkpoint_size"]) == (90, 150)
    assert "not validly signed" in fb["what"]


def test_db_checkpoint_moved_to_another_size(sfx: LogFx) -> None:
    sfx.sql("UPDATE axid_audit_checkpoint SET size = 151 WHERE log = :log AND size = 150")
    code, report, _ = verify_cli(*sfx.db_args(), "--trust-log-key")
    assert code == 1
    fb = first_bad(report)
    assert fb["checkpoint_size"] == 151
    assert "signed for size 150" in fb["what"]


def test_fork_same_size_other_root(fx: LogFx, tmp_path: Path) -> None:
    # A checkpoint the key really signed, of the same size, for another history.
    signer = NoteSigner(f"axid/{fx.log}", fx.key)
    other = Checkpoint(f"axid/{fx.log}", 150, leaf_hash(b"another history"))
    trusted = tmp_path / "trusted-fork"
    trusted.write_bytes(sign_checkpoint(other, signer))
    code, report, _ = verify_cli(
        *fx.db_args(), "--vkey", fx.vkey, "--trusted-checkpoint", str(trusted)
    )
    assert code == 1
    fb = first_bad(report)
    assert fb["checkpoint_size"] == 150
    assert fb["what"].startswith("fork")


def test_trusted_checkpoint_from_the_same_log_passes(sfx: LogFx, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted-180"
    trusted.write_bytes(sfx.checkpoint(180))
    code, _, result = verify_cli(
        *sfx.db_args(), "--vkey", sfx.vkey, "--trusted-checkpoint", str(trusted)
    )
    assert code == 0, result.output


def test_db_tampering_through_real_subprocess(sfx: LogFx) -> None:
    ok = subprocess.run(
        [AXID_BIN, "audit", "verify", *sfx.db_args(), "--vkey", sfx.vkey],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK: the log is intact" in ok.stdout
    sfx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = :s", s=K)
    bad = subprocess.run(
        [AXID_BIN, "audit", "verify", *sfx.db_args(), "--vkey", sfx.vkey],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1, bad.stderr
    assert "TAMPERED" in bad.stdout
    assert f"first bad seq: {K}" in bad.stdout


# --------------------------------------------------------------------------- bundle tampering


def _bundle_verify(bundle: Path, vkey: str, *extra: str) -> dict[str, Any]:
    code, report, result = verify_cli(str(bundle), "--vkey", vkey, *extra)
    assert code == 1, result.output
    return first_bad(report)


def test_bundle_intact(bundle: Path, sfx: LogFx) -> None:
    code, report, result = verify_cli(str(bundle), "--vkey", sfx.vkey)
    assert code == 0, result.output
    assert report is not None and report["entries"] == N_ENTRIES
    assert report["log"] == "payments"


def test_bundle_change_one_byte(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    i = lines[K].index(b'"ts":"') + 10  # a digit of the year
    lines[K] = lines[K][:i] + (b"1" if lines[K][i : i + 1] != b"1" else b"2") + lines[K][i + 1 :]
    write_lines(bundle, lines)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == K


def test_bundle_change_field(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines[K] = _reencode(lines[K], decision="deny", agent="mallory")
    write_lines(bundle, lines)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == K
    assert f"entry {K} was altered" in fb["what"]


def test_bundle_change_prev_field(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines[K] = _reencode(lines[K], prev="ab" * 32)
    write_lines(bundle, lines)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == K


def test_bundle_change_seq_field(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines[K] = _reencode(lines[K], seq=K - 10)
    write_lines(bundle, lines)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == K
    assert "seq field was altered" in fb["what"]


def test_bundle_delete_line(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    del lines[K]
    write_lines(bundle, lines)
    assert _bundle_verify(bundle, sfx.vkey)["seq"] == K


def test_bundle_swap_lines(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines[K], lines[K + 1] = lines[K + 1], lines[K]
    write_lines(bundle, lines)
    assert _bundle_verify(bundle, sfx.vkey)["seq"] == K


def test_bundle_insert_forged_line(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines.insert(K, _forged(sfx, K, leaf_hash(lines[K - 1])))
    write_lines(bundle, lines)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == K
    assert "inserted" in fb["what"]


def test_bundle_cut_off_needs_trusted_checkpoint(bundle: Path, sfx: LogFx) -> None:
    trusted = bundle.parent / "trusted-300"
    trusted.write_bytes((bundle / "checkpoints" / str(N_ENTRIES)).read_bytes())
    write_lines(bundle, bundle_lines(bundle)[: N_ENTRIES - 10])
    (bundle / "checkpoints" / str(N_ENTRIES)).unlink()
    code, _, result = verify_cli(str(bundle), "--vkey", sfx.vkey)
    assert code == 0, result.output  # a cleanly cut log is a valid shorter log
    fb = _bundle_verify(bundle, sfx.vkey, "--trusted-checkpoint", str(trusted))
    assert fb["seq"] == N_ENTRIES - 10


def test_bundle_cut_off_keeping_checkpoint(bundle: Path, sfx: LogFx) -> None:
    write_lines(bundle, bundle_lines(bundle)[: N_ENTRIES - 10])
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] == N_ENTRIES - 10


def test_bundle_replace_checkpoint_signature(bundle: Path, sfx: LogFx) -> None:
    p = bundle / "checkpoints" / "150"
    p.write_bytes(_replace_signature(p.read_bytes()))
    fb = _bundle_verify(bundle, sfx.vkey)
    assert (fb["seq"], fb["checkpoint_size"]) == (90, 150)


def test_bundle_checkpoint_signed_with_another_key(bundle: Path, sfx: LogFx) -> None:
    p = bundle / "checkpoints" / "150"
    p.write_bytes(_resign(p.read_bytes(), sfx.vkey, _other_signer()))
    fb = _bundle_verify(bundle, sfx.vkey)
    assert (fb["seq"], fb["checkpoint_size"]) == (90, 150)


def test_bundle_vkey_file_replaced(bundle: Path, sfx: LogFx) -> None:
    evil = _other_signer()
    (bundle / "vkey").write_text(evil.vkey() + "\n")
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] is None and "key was replaced" in fb["what"]
    # Without --vkey the checkpoints (signed by the real key) do not verify.
    code, report, _ = verify_cli(str(bundle), "--trust-log-key")
    assert code == 1
    assert first_bad(report)["checkpoint_size"] == CP_SIZES[0]


@pytest.mark.parametrize(
    ("edit", "seq"),
    [
        (lambda d: d.replace(b"\n", b"\r\n"), 0),  # CRLF line endings
        (lambda d: d[:-1], N_ENTRIES - 1),  # no final newline
        (lambda d: d + b"\n", N_ENTRIES),  # an empty line at the end
    ],
    ids=["crlf", "no-final-newline", "trailing-empty-line"],
)
def test_bundle_strict_lines(
    bundle: Path, sfx: LogFx, edit: Callable[[bytes], bytes], seq: int
) -> None:
    p = bundle / "entries.jsonl"
    p.write_bytes(edit(p.read_bytes()))
    assert _bundle_verify(bundle, sfx.vkey)["seq"] == seq


@pytest.mark.parametrize("name", ["0150", "150.bak", "x"])
def test_bundle_strict_checkpoint_names(bundle: Path, sfx: LogFx, name: str) -> None:
    cps = bundle / "checkpoints"
    (cps / "150").rename(cps / name)
    fb = _bundle_verify(bundle, sfx.vkey)
    assert fb["seq"] is None and name in fb["what"]


def test_bundle_tampering_through_real_subprocess(bundle: Path, sfx: LogFx) -> None:
    lines = bundle_lines(bundle)
    lines[K] = _reencode(lines[K], decision="deny")
    write_lines(bundle, lines)
    r = subprocess.run(
        [AXID_BIN, "audit", "verify", str(bundle), "--vkey", sfx.vkey],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    assert f"first bad seq: {K}" in r.stdout


# --------------------------------------------------------------------------- property: any byte


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, bytes], str]:
    d = tmp_path_factory.mktemp("small")
    url = f"sqlite:///{d / 'db.sqlite'}"
    vkey = build_log(url, "payments", d / "log.pem", batches=(5, 8, 3, 12, 4))
    out = d / "bundle"
    r = runner.invoke(app, ["audit", "export", "--db", url, "--out", str(out)])
    assert r.exit_code == 0, r.output
    cps = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    return (out / "entries.jsonl").read_bytes(), cps, vkey


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_byte_change_is_caught_at_its_seq(
    small_bundle: tuple[bytes, dict[str, bytes], str], data: st.DataObject
) -> None:
    entries, cps, vkey = small_bundle
    pos = data.draw(st.integers(0, len(entries) - 1), label="pos")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != entries[pos]), label="byte")
    mutated = entries[:pos] + bytes([new]) + entries[pos + 1 :]
    line = entries[:pos].count(b"\n")
    n = entries.count(b"\n")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "checkpoints").mkdir()
        for name, note in cps.items():
            (d / "checkpoints" / name).write_bytes(note)
        (d / "entries.jsonl").write_bytes(mutated)
        report = verify_log(ExportDirSource(d), vkey=vkey)
    assert not report.ok
    assert report.first_bad is not None and report.first_bad.seq is not None
    if line < n - 1:
        assert report.first_bad.seq == line, report.first_bad
    else:
        # The last entry has no successor to vouch for it: its signed
        # checkpoint's root names the batch (seq 28..31).
        assert 28 <= report.first_bad.seq <= line, report.first_bad


# --------------------------------------------------------------------------- usage errors: exit 2


def _two_log_db(template: Path, tmp: Path) -> str:
    d = tmp / "two"
    copy_sqlite(template, d)
    url = f"sqlite:///{d / 'db.sqlite'}"
    build_log(url, "other", d / "other.pem", batches=(3,))
    return url


def test_usage_errors_exit_2(template: Path, sfx: LogFx, tmp_path: Path) -> None:
    missing_db = f"sqlite:///{tmp_path / 'nope' / 'axid.db'}"
    empty_db = tmp_path / "empty.db"
    empty_db.write_bytes(b"")
    two = _two_log_db(template, tmp_path)
    cases: list[list[str]] = [
        ["--db", missing_db],
        ["--db", f"sqlite:///{empty_db}"],  # not an AXID database
        ["--db", "mysql://x/y"],
        [str(tmp_path / "no-bundle")],
        [str(tmp_path)],  # a directory that is not a bundle
        [str(tmp_path), "--db", sfx.url],  # both sources
        ["--db", sfx.url, "--log", "nosuchlog"],
        ["--db", two, "--vkey", sfx.vkey],  # every log verified: no --vkey for "other"
        ["--db", sfx.url, "--vkey", "not a vkey"],
        ["--db", sfx.url, "--vkey", "axid/payments+00000000+AQ=="],
        ["--db", sfx.url, "--vkey", str(tmp_path / "missing.vkey")],
        ["--db", sfx.url, "--trusted-checkpoint", str(tmp_path / "missing.cp")],
        ["--db", sfx.url, "--no-such-option"],
    ]
    for args in cases:
        key = [] if "--vkey" in args else ["--trust-log-key"]  # each case fails for its reason
        r = runner.invoke(app, ["audit", "verify", *args, *key])
        assert r.exit_code == 2, (args, r.output)
    assert not (tmp_path / "nope").exists()  # verifying never creates a database
    r = runner.invoke(app, ["audit", "verify", "--db", two, "--vkey", sfx.vkey])
    assert "no --vkey for log 'other'" in r.stderr
    r = runner.invoke(app, ["audit", "verify", "--db", two, "--log", "other", "--trust-log-key"])
    assert r.exit_code == 0, r.output


def test_trusted_checkpoint_with_wrong_key_is_usage_error(sfx: LogFx, tmp_path: Path) -> None:
    evil = _other_signer()
    cp = tmp_path / "cp"
    cp.write_bytes(_resign(sfx.checkpoint(150), sfx.vkey, evil))
    code, report, _ = verify_cli(
        *sfx.db_args(), "--vkey", sfx.vkey, "--trusted-checkpoint", str(cp)
    )
    assert code == 2
    assert report is not None and "error" in report


def test_vkey_from_file(sfx: LogFx, tmp_path: Path) -> None:
    f = tmp_path / "log.vkey"
    f.write_text(sfx.vkey + "\n")
    code, _, result = verify_cli(*sfx.db_args(), "--vkey", str(f))
    assert code == 0, result.output
    os.chmod(f, 0o000)
    if os.geteuid() != 0:  # root reads anything
        code, _, _ = verify_cli(*sfx.db_args(), "--vkey", str(f))
        assert code == 2


# --------------------------------------------------------------------------- fast path
# verify_log checks entries a chunk at a time: in this process, in forked
# workers sent the rows, or in workers that read the database themselves. It
# goes entry by entry (the code every case above exercises) wherever anything
# is off. Whatever the mode and the chunk size, the report must be exactly
# that of the entry-by-entry pass alone.

# (workers, entries per chunk): small chunks put chunk edges everywhere, also
# between the checkpoints (50, 90, 150, ...) and at K.
_MODES: list[tuple[int | None, int]] = [(0, 2048), (0, 16), (2, 16), (1, 64), (None, 16)]


def _key(rep: VerifyReport) -> tuple[Any, ...]:
    cp = rep.latest_checkpoint
    return (
        rep.ok,
        rep.entries,
        rep.checkpoints,
        rep.first_bad,
        rep.root,
        None if cp is None else (cp.size, cp.root),
        rep.latest_note,
    )


def _modes_agree(
    monkeypatch: pytest.MonkeyPatch,
    make_source: Callable[[], Any],
    vkey: str,
    trusted: bytes | None = None,
) -> VerifyReport:
    """Verify in every mode; all must report what entry-by-entry alone reports."""

    def run(workers: int | None) -> VerifyReport:
        source = make_source()
        try:
            return verify_log(source, vkey=vkey, trusted_checkpoint=trusted, workers=workers)
        finally:
            if isinstance(source, DatabaseSource):
                source.close()

    with monkeypatch.context() as m:
        m.setattr(accelerate_mod, "check_chunk", lambda start, datas: None)  # never fast
        ref = run(0)
    for workers, chunk in _MODES:
        with monkeypatch.context() as m:
            m.setattr(accelerate_mod, "_CHUNK", chunk)
            assert _key(run(workers)) == _key(ref), (workers, chunk)
    return ref


def _db_source(fx: LogFx) -> Callable[[], DatabaseSource]:
    return lambda: DatabaseSource(fx.url, fx.log)


def _export(fx: LogFx, out: Path) -> Path:
    r = runner.invoke(app, ["audit", "export", *fx.db_args(), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _t_none(fx: LogFx) -> None:
    pass


def _t_byte(fx: LogFx) -> None:
    data, _ = fx.entry(K)
    i = data.index(b'"path":"/payments/123"') + len(b'"path":"/payments/12')
    fx.set_entry(K, data[:i] + b"4" + data[i + 1 :])


def _t_field_and_hash(fx: LogFx) -> None:
    forged = _reencode(fx.entry(K)[0], decision="deny")
    fx.set_entry(K, forged, leaf_hash(forged))


def _t_prev_field(fx: LogFx) -> None:
    forged = _reencode(fx.entry(K)[0], prev="ab" * 32)
    fx.set_entry(K, forged, leaf_hash(forged))


def _t_seq_field(fx: LogFx) -> None:
    forged = _reencode(fx.entry(K)[0], seq=K + 7)
    fx.set_entry(K, forged, leaf_hash(forged))


def _t_log_field(fx: LogFx) -> None:
    forged = _reencode(fx.entry(K)[0], log="other")
    fx.set_entry(K, forged, leaf_hash(forged))


def _t_delete(fx: LogFx) -> None:
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = :s", s=K)


def _t_swap(fx: LogFx) -> None:
    a, b = fx.entry(K), fx.entry(K + 1)
    fx.set_entry(K, *b)
    fx.set_entry(K + 1, *a)


def _t_negative_seq(fx: LogFx) -> None:
    _insert_row(fx, -1, fx.entry(0)[0])  # sorts first: workers reading by seq range miss it


def _t_after_end(fx: LogFx) -> None:
    _insert_row(fx, N_ENTRIES, _forged(fx, N_ENTRIES, fx.entry(N_ENTRIES - 1)[1]))


def _t_rechain(fx: LogFx) -> None:
    _rechain_from(fx, K, _reencode(fx.entry(K)[0], decision="deny"))


def _t_cut_entries(fx: LogFx) -> None:
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= :s", s=N_ENTRIES - 10)


def _t_checkpoint_signature(fx: LogFx) -> None:
    fx.set_checkpoint(150, _replace_signature(fx.checkpoint(150)))


def _t_checkpoint_moved(fx: LogFx) -> None:
    fx.sql("UPDATE axid_audit_checkpoint SET size = 151 WHERE log = :log AND size = 150")


def _t_checkpoint_deleted(fx: LogFx) -> None:
    fx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size = 150")


def _t_stored_hash(fx: LogFx) -> None:
    data, lh = fx.entry(K)
    fx.set_entry(K, data, lh[:-1] + bytes([lh[-1] ^ 1]))


def _t_stored_hash_short(fx: LogFx) -> None:
    data, lh = fx.entry(K)
    fx.set_entry(K, data, lh[:-1])


_TAMPER: dict[str, Callable[[LogFx], None]] = {
    "intact": _t_none,
    "byte": _t_byte,
    "field and leaf hash": _t_field_and_hash,
    "prev field": _t_prev_field,
    "seq field": _t_seq_field,
    "log field": _t_log_field,
    "delete": _t_delete,
    "swap": _t_swap,
    "negative seq": _t_negative_seq,
    "after the end": _t_after_end,
    "rechain": _t_rechain,
    "cut entries": _t_cut_entries,
    "checkpoint signature": _t_checkpoint_signature,
    "checkpoint moved": _t_checkpoint_moved,
    "checkpoint deleted": _t_checkpoint_deleted,
    "stored leaf hash": _t_stored_hash,
    "stored leaf hash short": _t_stored_hash_short,
}


@pytest.mark.parametrize("case", list(_TAMPER))
def test_fast_path_modes_agree(
    case: str, sfx: LogFx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _TAMPER[case](sfx)
    ref = _modes_agree(monkeypatch, _db_source(sfx), sfx.vkey)
    # A middle checkpoint's loss hides nothing: the later ones sign it all.
    assert ref.ok is (case in ("intact", "checkpoint deleted")), ref.first_bad
    bundle = _export(sfx, tmp_path / "bundle")
    _modes_agree(monkeypatch, lambda: ExportDirSource(bundle), sfx.vkey)


@pytest.mark.parametrize("case", ["intact", "byte", "delete", "negative seq"])
def test_fast_path_modes_agree_postgresql(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pfx in pg_fx(tmp_path):
        _TAMPER[case](pfx)
        ref = _modes_agree(monkeypatch, _db_source(pfx), pfx.vkey)
        assert ref.ok is (case == "intact"), ref.first_bad


def test_fast_path_modes_agree_with_trusted_checkpoints(
    sfx: LogFx, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp180, cp300 = sfx.checkpoint(180), sfx.checkpoint(N_ENTRIES)
    assert _modes_agree(monkeypatch, _db_source(sfx), sfx.vkey, cp180).ok
    signer = NoteSigner(f"axid/{sfx.log}", sfx.key)
    fork = sign_checkpoint(Checkpoint(f"axid/{sfx.log}", 150, leaf_hash(b"other")), signer)
    assert not _modes_agree(monkeypatch, _db_source(sfx), sfx.vkey, fork).ok
    _t_rechain(sfx)
    assert not _modes_agree(monkeypatch, _db_source(sfx), sfx.vkey, cp180).ok
    sfx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= 150")
    sfx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > 150")
    assert not _modes_agree(monkeypatch, _db_source(sfx), sfx.vkey, cp300).ok


_BUNDLE_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "carriage return": lambda b: b.replace(b"\n", b"\r\n", K + 1).replace(b"\r\n", b"\n", K),
    "empty line": lambda b: b.replace(b"\n", b"\n\n", K + 1).replace(b"\n\n", b"\n", K),
    "no final newline": lambda b: b[:-1],
    "line too long": lambda b: b.replace(b"\n", b"x" * (300 * 1024) + b"\n", 1),
    "truncated mid-line": lambda b: b[: b.index(b"\n", b.index(b'"seq":200,')) - 50],
    "empty file": lambda b: b"",
}


@pytest.mark.parametrize("case", list(_BUNDLE_EDITS))
def test_fast_path_modes_agree_on_malformed_bundles(
    case: str, bundle: Path, sfx: LogFx, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = bundle / "entries.jsonl"
    path.write_bytes(_BUNDLE_EDITS[case](path.read_bytes()))
    assert not _modes_agree(monkeypatch, lambda: ExportDirSource(bundle), sfx.vkey).ok


def test_fast_path_modes_agree_on_unusual_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries the fast grammar takes with escapes, or leaves to parse_entry (long ones)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    try:
        create_schema(engine)
        signer = NoteSigner("axid/odd", Ed25519PrivateKey.generate())
        store = LogStore(engine, "odd", signer=signer)
        store.ensure_log(store.origin, signer.vkey())
        notes = ["".join(map(chr, range(0x80))), "caf\u00e9 \u2028 \U0001f600", "x" * 8000, None]
        for batch in (7, 20, 13):
            store.append_batch(
                [
                    DecisionFields(
                        "allow",
                        "ok",
                        note=notes[i % 4],
                        path="/p" * (i % 4 == 2) * 1000,  # with the note: over 8 KiB
                        chain=['"\\'],
                    )
                    for i in range(batch)
                ]
            )
    finally:
        engine.dispose()
    fx = LogFx(url, "odd", tmp_path / "unused.pem", signer.vkey(), tmp_path)
    try:
        assert _modes_agree(monkeypatch, _db_source(fx), fx.vkey).ok
        data, _ = fx.entry(27)  # the first of the third batch: the control characters
        assert b"\\u0001" in data
        fx.set_entry(27, data.replace(b"\\u0001", b"\\u0002"))
        rep = _modes_agree(monkeypatch, _db_source(fx), fx.vkey)
        assert rep.first_bad is not None and rep.first_bad.seq == 27
    finally:
        fx.close()


def test_fast_path_is_taken(sfx: LogFx, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an intact log no entry goes entry by entry, in any mode (the modes are real)."""
    calls: list[int] = []
    orig = reference_mod.Pass._take_one

    def counting(self: Any, *row: Any) -> None:
        calls.append(self.n)
        orig(self, *row)

    monkeypatch.setattr(reference_mod.Pass, "_take_one", counting)
    monkeypatch.setattr(accelerate_mod, "_CHUNK", 16)
    for workers in (0, 2):
        rep = verify_log(DatabaseSource(sfx.url, sfx.log), vkey=sfx.vkey, workers=workers)
        assert rep.ok and rep.entries == N_ENTRIES
    assert calls == []


def _flip(layer: bytes) -> bytes:
    return layer[:-1] + bytes([layer[-1] ^ 1]) if layer else layer


@pytest.mark.parametrize("levels", ["subtrees", "leaves"])
@pytest.mark.parametrize("case", ["intact", "rechain", "after the end"])
def test_wrong_accelerator_hashes_cost_time_never_a_finding(
    levels: str, case: str, sfx: LogFx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean verdict whose hashes are wrong (an accelerator bug) makes the pass
    check that part again itself: the report is the reference's, in every mode."""
    _TAMPER[case](sfx)
    bundle = _export(sfx, tmp_path / "bundle")
    sources: list[Callable[[], Any]] = [_db_source(sfx), lambda: ExportDirSource(bundle)]
    with monkeypatch.context() as m:
        m.setattr(accelerate_mod, "check_chunk", lambda start, datas: None)  # never fast
        refs = [_key(verify_log(make(), vkey=sfx.vkey, workers=0)) for make in sources]
    assert refs[0][0] is (case == "intact")
    real = accelerate_mod.check_chunk
    first = 0 if levels == "leaves" else 1

    def wrong(start: int, datas: Any) -> Any:
        clean = real(start, datas)
        if clean is None:
            return None
        layers = [_flip(x) if k >= first else x for k, x in enumerate(clean.layers)]
        return clean._replace(layers=layers)

    monkeypatch.setattr(accelerate_mod, "check_chunk", wrong)
    for chunk in (16, 64):
        monkeypatch.setattr(accelerate_mod, "_CHUNK", chunk)
        for workers in (0, 2):
            for make, ref in zip(sources, refs, strict=True):
                assert _key(verify_log(make(), vkey=sfx.vkey, workers=workers)) == ref


def test_wrong_accelerator_hashes_in_an_unsigned_tail(
    sfx: LogFx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean range after the last checkpoint (an unsigned tail, so no root
    vouches for it) with wrong hashes: the reported root is still the reference's."""
    _t_after_end(sfx)
    bundle = _export(sfx, tmp_path / "bundle")
    sources: list[Callable[[], Any]] = [_db_source(sfx), lambda: ExportDirSource(bundle)]
    with monkeypatch.context() as m:
        m.setattr(accelerate_mod, "check_chunk", lambda start, datas: None)  # never fast
        refs = [_key(verify_log(make(), vkey=sfx.vkey, workers=0)) for make in sources]
    assert not refs[0][0] and refs[0][4] is not None  # a finding, and the root of it all
    real = accelerate_mod.check_chunk

    def wrong_in_tail(start: int, datas: Any) -> Any:
        clean = real(start, datas)
        if clean is None or start < N_ENTRIES:
            return clean
        return clean._replace(layers=[_flip(x) for x in clean.layers])

    monkeypatch.setattr(accelerate_mod, "check_chunk", wrong_in_tail)
    monkeypatch.setattr(accelerate_mod, "_CHUNK", 4)  # 300 = 75 * 4: the tail is a chunk
    for workers in (0, 2):
        for make, ref in zip(sources, refs, strict=True):
            assert _key(verify_log(make(), vkey=sfx.vkey, workers=workers)) == ref


def test_failing_workers_only_cost_time(sfx: LogFx, monkeypatch: pytest.MonkeyPatch) -> None:
    _t_byte(sfx)
    bundle = _export(sfx, sfx.tmp / "bundle")
    sources: list[Callable[[], Any]] = [_db_source(sfx), lambda: ExportDirSource(bundle)]
    refs = [_key(verify_log(make(), vkey=sfx.vkey, workers=0)) for make in sources]
    monkeypatch.setattr(accelerate_mod, "_CHUNK", 16)
    monkeypatch.setattr(forkpool_mod, "_WORKER_TIMEOUT", 0.3)
    monkeypatch.setattr(forkpool_mod, "_REAP_GRACE", 0.1)
    for broken in (
        lambda conn, reader: None,  # exits at once
        lambda conn, reader: time.sleep(30),  # hangs (killed at close)
    ):
        monkeypatch.setattr(forkpool_mod, "_worker_loop", broken)
        for make, ref in zip(sources, refs, strict=True):
            assert _key(verify_log(make(), vkey=sfx.vkey, workers=2)) == ref


def test_workers_argument_is_checked(sfx: LogFx) -> None:
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(VerifyUsageError):
            verify_log(DatabaseSource(sfx.url, sfx.log), vkey=sfx.vkey, workers=bad)  # type: ignore[arg-type]
