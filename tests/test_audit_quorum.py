"""`axid audit verify --witness VKEY ... --quorum K [--max-unwitnessed N]`.

A real log (checkpoints at 50, 90, 150, 180, 230, 290, 300), as an export
bundle and in SQLite and PostgreSQL, with cosignatures made by
``WitnessSigner`` (Ed25519 cosignature/v1 and ML-DSA-44 subtree/v1) appended to
the checkpoint notes. The quorum counts witness names, not keys; every
cosignature that claims a given key must verify (else exit 1, naming the
checkpoint and the witness); lines by other keys are ignored.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _audit_helpers import (
    CP_SIZES,
    N_ENTRIES,
    LogFx,
    first_bad,
    runner,
    sqlite_fx,
    sqlite_template,
    verify_cli,
)
from _quorum_helpers import (
    IMPOSTOR,
    STRANGER,
    W1,
    W1_ML,
    W2,
    W3,
    add_lines,
    cosign,
    cosign_stored,
    flipped_line,
    forged_line,
    garbage_line,
    pg_quorum_fx,
    vkey,
    witness_args,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.cosignature import WitnessSigner
from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import checkpoint_of
from axid.audit.verify import DatabaseSource, verify_log
from axid.cli import app

LOG = "payments"
LAST = CP_SIZES[-1]  # 300


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory, LOG)


@pytest.fixture(scope="module")
def bundle_template(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quorum-bundle") / "bundle"
    url = f"sqlite:///{template / 'db.sqlite'}"
    r = runner.invoke(app, ["audit", "export", "--db", url, "--log", LOG, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def bundle(bundle_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_template, tmp_path / "bundle"))


@pytest.fixture(params=["sqlite", "postgresql"])
def fx(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> Iterator[LogFx]:
    if request.param == "sqlite":
        f = sqlite_fx(template, tmp_path, LOG)
        try:
            yield f
        finally:
            f.close()
    else:
        yield from pg_quorum_fx(tmp_path)


def cp_file(bundle: Path, size: int) -> Path:
    return bundle / "checkpoints" / str(size)


def cosign_file(bundle: Path, size: int, *signers: WitnessSigner) -> bytes:
    p = cp_file(bundle, size)
    p.write_bytes(cosign(p.read_bytes(), *signers))
    return p.read_bytes()


def append_file(bundle: Path, size: int, line: bytes) -> None:
    p = cp_file(bundle, size)
    p.write_bytes(p.read_bytes() + line)


def vb(bundle: Path, *args: str) -> tuple[int, dict[str, Any] | None, Any]:
    """``axid audit verify BUNDLE --vkey ... ARGS --json``."""
    log_vkey = (bundle / "vkey").read_text().strip()
    return verify_cli(str(bundle), "--vkey", log_vkey, *args)


def witness_of(report: dict[str, Any] | None) -> dict[str, Any]:
    assert report is not None
    w = report["witness"]
    assert w is not None, report
    return w  # type: ignore[no-any-return]


def assert_unwitnessed(code: int, report: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """Exit 1 without tampering: the log verified, the quorum is what is missing."""
    assert code == 1, report
    assert report is not None and report["ok"] is False and report["first_bad"] is None, report
    w = witness_of(report)
    assert w["failure"] is not None and what in w["failure"], w["failure"]
    return w


# --------------------------------------------------------------------------- quorum met / not met


def test_quorum_met_on_the_newest_cosigned_checkpoint(bundle: Path) -> None:
    cosign_file(bundle, 150, W1, W2, W3)
    note = cosign_file(bundle, 290, W1, W2)
    code, report, _ = vb(bundle, *witness_args(W1, W2, W3, quorum=2))
    assert code == 0, report
    assert report is not None and report["ok"] is True
    w = witness_of(report)
    assert w == {
        "quorum": 2,
        "witnesses": ["w1.example", "w2.example", "w3.example"],
        "witnessed_size": 290,
        "cosigners": ["w1.example", "w2.example"],
        "unwitnessed_entries": N_ENTRIES - 290,
        "witnessed_checkpoint": note.decode(),
        "failure": None,
    }
    # Three of three: only checkpoint 150 has them.
    code, report, _ = vb(bundle, *witness_args(W1, W2, W3, quorum=3))
    assert code == 0, report
    w = witness_of(report)
    assert (w["witnessed_size"], w["unwitnessed_entries"]) == (150, N_ENTRIES - 150)
    assert w["cosigners"] == ["w1.example", "w2.example", "w3.example"]


def test_quorum_not_met(bundle: Path) -> None:
    code, report, _ = vb(bundle, *witness_args(W1, W2, quorum=1))
    w = assert_unwitnessed(
        code,
        report,
        "no checkpoint cosigned by 1 of the given witnesses (w1.example, w2.example): "
        "no checkpoint carries a valid cosignature by any of them",
    )
    assert w["witnessed_size"] is None and w["cosigners"] == []
    cosign_file(bundle, 180, W1)
    cosign_file(bundle, 290, W2)
    code, report, _ = vb(bundle, *witness_args(W1, W2, quorum=2))
    assert_unwitnessed(
        code,
        report,
        "no checkpoint cosigned by 2 of the given witnesses (w1.example, w2.example): "
        "the most any carries is 1 (checkpoint 290: w2.example)",
    )
    # The log itself is intact: its report says so.
    assert report is not None and report["entries"] == N_ENTRIES and report["root"] is not None


def test_one_witness_with_two_keys_counts_once(bundle: Path) -> None:
    cosign_file(bundle, 290, W1, W1_ML)
    given = witness_args(W1, W1_ML, W2, quorum=2)
    assert_unwitnessed(*vb(bundle, *given)[:2], "no checkpoint cosigned by 2")
    # Either of w1's keys alone makes w1 a cosigner.
    for key in (W1, W1_ML):
        code, report, _ = vb(bundle, *witness_args(key, quorum=1))
        assert code == 0, report
        assert witness_of(report)["cosigners"] == ["w1.example"]
    cosign_file(bundle, 290, W2)
    code, report, _ = vb(bundle, *given)
    assert code == 0, report
    assert witness_of(report)["cosigners"] == ["w1.example", "w2.example"]


@pytest.mark.parametrize("signer", [W1, W1_ML, W2], ids=["ed25519", "mldsa-w1", "mldsa-w2"])
@pytest.mark.parametrize("make", [forged_line, flipped_line], ids=["other-checkpoint", "bit-flip"])
def test_invalid_cosignature_from_a_known_key_is_tampering(
    bundle: Path, signer: WitnessSigner, make: Any
) -> None:
    cosign_file(bundle, 290, W1, W2)  # the quorum itself is met
    note = cp_file(bundle, 180).read_bytes()
    append_file(bundle, 180, make(note, signer))
    code, report, _ = vb(bundle, *witness_args(W1, W1_ML, W2, quorum=2))
    assert code == 1, report
    fb = first_bad(report)
    assert fb["checkpoint_size"] == 180 and fb["seq"] is None, fb
    assert "checkpoint 180 carries a witness cosignature that does not verify" in fb["what"]
    assert signer.name in fb["what"] and signer.public().key_id.hex() in fb["what"]
    # Not given that witness, the line is another key's: ignored.
    others = [s for s in (W1, W1_ML, W2) if s.name != signer.name]
    code, report, _ = vb(bundle, *witness_args(*others, W3, quorum=1))
    assert code == 0, report


def test_invalid_cosignature_text_output(bundle: Path) -> None:
    append_file(bundle, 90, forged_line(cp_file(bundle, 90).read_bytes(), W2))
    log_vkey = (bundle / "vkey").read_text().strip()
    args = ["audit", "verify", str(bundle), "--vkey", log_vkey, *witness_args(W2, quorum=1)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert r.stdout.startswith("TAMPERED: the log fails verification\n")
    assert "checkpoint:    90\n" in r.stdout
    assert "w2.example" in r.stdout


def test_unknown_witness_lines_are_ignored(bundle: Path) -> None:
    note = cp_file(bundle, 290).read_bytes()
    # Lines by keys the auditor was not given: another witness, another key under
    # w1's name, random bytes; even a genuine w1 line over another checkpoint is
    # fine once w1 is not given.
    for line in (
        STRANGER.cosign(checkpoint_of(note), 1).encode(),
        IMPOSTOR.cosign(checkpoint_of(note), 1).encode(),
        garbage_line(),
        garbage_line("w1.example"),
    ):
        append_file(bundle, 290, line)
    code, report, _ = vb(bundle, *witness_args(W1, W2, quorum=1))
    assert_unwitnessed(code, report, "no checkpoint carries a valid cosignature by any of them")
    cosign_file(bundle, 290, W1, W2)
    code, report, _ = vb(bundle, *witness_args(W1, W2, W3, quorum=2))
    assert code == 0, report
    assert witness_of(report)["cosigners"] == ["w1.example", "w2.example"]


def test_max_unwitnessed(bundle: Path) -> None:
    cosign_file(bundle, 230, W1, W2)
    w = witness_args(W1, W2, quorum=2)
    after = N_ENTRIES - 230
    code, report, _ = vb(bundle, *w, "--max-unwitnessed", str(after))
    assert code == 0, report
    assert witness_of(report)["unwitnessed_entries"] == after
    code, report, _ = vb(bundle, *w, "--max-unwitnessed", str(after - 1))
    assert_unwitnessed(
        code,
        report,
        f"{after} entries after the newest checkpoint cosigned by 2 of the given witnesses "
        f"(w1.example, w2.example) (size 230), more than the {after - 1} allowed",
    )
    # Without a quorum anywhere, --max-unwitnessed says the same as the quorum.
    code, report, _ = vb(bundle, *witness_args(W1, W2, W3, quorum=3), "--max-unwitnessed", "0")
    assert_unwitnessed(code, report, "no checkpoint cosigned by 3")
    cosign_file(bundle, LAST, W1, W2)
    code, report, _ = vb(bundle, *w, "--max-unwitnessed", "0")
    assert code == 0, report
    assert witness_of(report)["witnessed_size"] == LAST


def test_a_cosigned_checkpoint_must_be_the_logs(bundle: Path, template: Path) -> None:
    # An insider with the log key signs another root for size 290 and has both
    # witnesses cosign it: the checkpoint does not match the entries, so it is
    # tampering and witnesses nothing (a quorum on it is no quorum for this log).
    from axid.audit.store import load_log_key

    signer = NoteSigner("axid/payments", load_log_key(template / "log.pem"))
    forged = sign_checkpoint(Checkpoint("axid/payments", 290, b"\x07" * 32), signer)
    cp_file(bundle, 290).write_bytes(cosign(forged, W1, W2))
    cosign_file(bundle, 150, W1)
    code, report, _ = vb(bundle, *witness_args(W1, W2, quorum=2))
    assert code == 1, report
    fb = first_bad(report)
    assert fb["checkpoint_size"] == 290 and "root mismatch" in fb["what"], fb
    assert witness_of(report)["witnessed_size"] is None
    assert witness_of(report)["failure"] is None  # tampering is the verdict, not the quorum


def test_text_output(bundle: Path) -> None:
    log_vkey = (bundle / "vkey").read_text().strip()
    base = ["audit", "verify", str(bundle), "--vkey", log_vkey]
    r = runner.invoke(app, [*base, *witness_args(W1, W2, quorum=2)])
    assert r.exit_code == 1, r.output
    given = "2 of the given witnesses (w1.example, w2.example)"
    assert r.stdout.startswith(f"NOT WITNESSED: no checkpoint cosigned by {given}")
    assert "witnessed:     no checkpoint with a quorum (quorum 2 of w1.example, w2.example)" in (
        r.stdout
    )
    cosign_file(bundle, 290, W1, W2)
    r = runner.invoke(app, [*base, *witness_args(W1, W2, quorum=2)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("OK: the log is intact and witnessed\n")
    assert (
        "witnessed:     checkpoint 290, cosigned by w1.example, w2.example "
        "(quorum 2 of w1.example, w2.example); 10 entries after it\n"
    ) in r.stdout
    # Without --witness, nothing about witnesses.
    r = runner.invoke(app, base)
    assert r.exit_code == 0 and "witness" not in r.stdout
    code, report, _ = vb(bundle)
    assert code == 0 and report is not None and report["witness"] is None


def test_witness_from_a_file(bundle: Path, tmp_path: Path) -> None:
    cosign_file(bundle, 290, W1, W2)
    files = []
    for s in (W1, W2):
        p = tmp_path / f"{s.name}-{s.public().kind}.vkey"
        p.write_text(vkey(s) + "\n")
        files += ["--witness", str(p)]
    code, report, _ = vb(bundle, *files, "--quorum", "2")
    assert code == 0, report


# --------------------------------------------------------------------------- usage errors


LOG_VKEY_ARG = "LOG_VKEY"  # replaced by the log's own vkey: not a witness key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quorum", "1"], "--quorum needs the witnesses' keys"),
        (witness_args(W1), "--witness needs --quorum K"),
        (witness_args(W1, quorum=0), "--quorum must be an integer of at least 1"),
        (witness_args(W1, quorum=-1), "--quorum must be an integer of at least 1"),
        (witness_args(W1, W2, quorum=3), "--quorum 3 but only 2 distinct witness names given"),
        (witness_args(W1, W1_ML, quorum=2), "only 1 distinct witness name given (w1.example)"),
        (["--max-unwitnessed", "5"], "--max-unwitnessed needs --witness VKEY ... --quorum K"),
        (
            [*witness_args(W1, quorum=1), "--max-unwitnessed", "-1"],
            "--max-unwitnessed must be an integer >= 0",
        ),
        (["--witness", "nonsense", "--quorum", "1"], "no such file, and not a vkey"),
        (["--witness", LOG_VKEY_ARG, "--quorum", "1"], "unsupported witness key type 0x01"),
        (["--witness", vkey(W1)[:-4] + "AAA=", "--quorum", "1"], "bad --witness"),
    ],
)
def test_usage_errors(bundle: Path, args: list[str], message: str) -> None:
    log_vkey = (bundle / "vkey").read_text().strip()
    args = [log_vkey if a == LOG_VKEY_ARG else a for a in args]
    code, report, result = vb(bundle, *args)
    assert code == 2, result.output
    assert message in result.stderr, result.stderr
    assert report == {"ok": False, "error": result.stderr.removeprefix("error: ").strip()}


def test_usage_errors_from_click(bundle: Path) -> None:
    for args in (["--quorum", "two", *witness_args(W1)], ["--max-unwitnessed", "x"]):
        _, _, result = vb(bundle, *args)
        assert result.exit_code == 2, result.output


# --------------------------------------------------------------------------- databases


def test_database_quorum(fx: LogFx) -> None:
    cosign_stored(fx, 150, W1, W2, W3)
    cosign_stored(fx, 290, W1_ML, W2)
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey, *witness_args(W1, W2, quorum=2))
    assert code == 0, report
    w = witness_of(report)
    assert (w["witnessed_size"], w["cosigners"]) == (150, ["w1.example", "w2.example"])
    code, report, _ = verify_cli(
        *fx.db_args(), "--vkey", fx.vkey, *witness_args(W1, W1_ML, W2, quorum=2)
    )
    assert code == 0, report
    assert witness_of(report)["witnessed_size"] == 290
    code, report, _ = verify_cli(
        *fx.db_args(),
        "--vkey",
        fx.vkey,
        *witness_args(W1, W1_ML, W2, quorum=2),
        "--max-unwitnessed",
        "9",
    )
    assert_unwitnessed(code, report, "10 entries after the newest checkpoint cosigned by 2")
    code, report, _ = verify_cli(
        *fx.db_args(), "--vkey", fx.vkey, *witness_args(W1, W2, W3, quorum=3)
    )
    assert code == 0 and witness_of(report)["witnessed_size"] == 150, report


def test_database_quorum_not_met(fx: LogFx) -> None:
    cosign_stored(fx, LAST, W1, W1_ML, STRANGER)
    code, report, _ = verify_cli(
        *fx.db_args(), "--vkey", fx.vkey, *witness_args(W1, W1_ML, W2, quorum=2)
    )
    assert_unwitnessed(code, report, "the most any carries is 1 (checkpoint 300: w1.example)")


def test_database_invalid_cosignature(fx: LogFx) -> None:
    cosign_stored(fx, LAST, W1, W2)
    cosign_stored(fx, 180, W1)
    add_lines(fx, 180, flipped_line(fx.checkpoint(180), W2))
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey, *witness_args(W1, W2, quorum=2))
    assert code == 1, report
    fb = first_bad(report)
    assert fb["checkpoint_size"] == 180 and "w2.example" in fb["what"], fb


def test_database_every_log_needs_the_quorum(tmp_path: Path) -> None:
    # Two logs in one database, the witnesses given once: each log is held to them.
    from _audit_helpers import build_log

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    vkeys = [build_log(url, name, tmp_path / f"{name}.pem", (5, 3)) for name in ("a", "b")]
    fx = LogFx(url, "a", tmp_path / "a.pem", vkeys[0], tmp_path)
    try:
        cosign_stored(fx, 8, W1)
    finally:
        fx.close()
    keys = [a for v in vkeys for a in ("--vkey", v)]
    r = runner.invoke(app, ["audit", "verify", "--db", url, *keys, *witness_args(W1, quorum=1)])
    assert r.exit_code == 1, r.output
    assert "2 logs: NOT WITNESSED: b" in r.stdout
    code, report, _ = verify_cli("--db", url, *keys, *witness_args(W1, quorum=1))
    assert code == 1 and report is not None
    assert [d["ok"] for d in report["logs"]] == [True, False]


def test_library_fast_path_agrees(fx: LogFx) -> None:
    # The forked workers check entries only; checkpoints, and so cosignatures, are
    # checked in this process: the report is the same with and without workers.
    cosign_stored(fx, 230, W1, W2)
    cosign_stored(fx, 90, W3)
    policy = WitnessPolicy.from_options([W1.public(), W2.public(), W3.public()], 2)
    reports = []
    for workers in (0, 2):
        source = DatabaseSource(fx.url, fx.log)
        try:
            reports.append(verify_log(source, vkey=fx.vkey, witnesses=policy, workers=workers))
        finally:
            source.close()
    assert reports[0] == reports[1]
    r = reports[0]
    assert r.ok and r.witnessed_size == 230 and r.cosigners == ("w1.example", "w2.example")
    assert r.unwitnessed == N_ENTRIES - 230 and r.witness_failure is None
    cosign_stored(fx, 50, W1)
    add_lines(fx, 50, forged_line(fx.checkpoint(50), W3))
    for workers in (0, 2):
        source = DatabaseSource(fx.url, fx.log)
        try:
            r = verify_log(source, vkey=fx.vkey, witnesses=policy, workers=workers)
        finally:
            source.close()
        assert not r.ok and r.first_bad is not None and r.first_bad.checkpoint_size == 50


def test_policy_rejects_non_keys() -> None:
    from axid.audit.quorum import QuorumError

    with pytest.raises(QuorumError):
        WitnessPolicy((), 1)
    with pytest.raises(QuorumError):
        WitnessPolicy((W1.public(),), True)  # type: ignore[arg-type]
    other = WitnessSigner("w1.example", Ed25519PrivateKey.generate())
    p = WitnessPolicy.from_options([W1.public(), other.public(), W1.public()], 1)
    assert p is not None and len(p.keys) == 2 and p.names == ("w1.example",)


def test_exported_bundle_carries_the_stored_cosignatures(fx: LogFx, tmp_path: Path) -> None:
    # `axid audit export` writes each checkpoint with its stored cosignatures:
    # the bundle meets the quorum offline, and a bad stored line shows there too.
    cosign_stored(fx, 230, W1_ML, W2)
    add_lines(fx, 90, forged_line(fx.checkpoint(90), W3))
    out = tmp_path / "exported"
    r = runner.invoke(app, ["audit", "export", *fx.db_args(), "--out", str(out)])
    assert r.exit_code == 0, r.output
    code, report, _ = verify_cli(str(out), "--vkey", fx.vkey, *witness_args(W1_ML, W2, quorum=2))
    assert code == 0, report
    assert witness_of(report)["witnessed_size"] == 230
    code, report, _ = verify_cli(
        str(out), "--vkey", fx.vkey, *witness_args(W1_ML, W2, W3, quorum=2)
    )
    assert code == 1 and first_bad(report)["checkpoint_size"] == 90, report
