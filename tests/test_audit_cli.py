"""`axid audit export | show | proof | vkey` and the verify progress bar, on real databases."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _audit_helpers import (
    BATCHES,
    CP_SIZES,
    N_ENTRIES,
    LogFx,
    fields_for,
    pg_fx,
    runner,
    sqlite_fx,
    sqlite_template,
    verify_cli,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.entry import DecisionFields, parse_ts
from axid.audit.export import ExportError, export_bundle
from axid.audit.merkle import leaf_hash, verify_inclusion
from axid.audit.note import NoteSigner, NoteVerifier, open_checkpoint
from axid.audit.store import LogStore, create_schema, make_engine
from axid.audit.verify import DatabaseSource, ExportDirSource, verify_log
from axid.cli import app

K_SHOW = 42  # an entry whose fields test_show compares in full


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory)


@pytest.fixture
def sfx(template: Path, tmp_path: Path) -> Iterator[LogFx]:
    f = sqlite_fx(template, tmp_path)
    try:
        yield f
    finally:
        f.close()


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


# --------------------------------------------------------------------------- export


def test_export_then_verify_bundle(fx: LogFx, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    r = runner.invoke(app, ["audit", "export", *fx.db_args(), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"{N_ENTRIES} entries, {len(CP_SIZES)} checkpoints" in r.stdout

    # Exactly the stored bytes: entries + "\n", notes verbatim, the vkey line.
    rows = fx.rows("SELECT data FROM axid_audit_entry WHERE log = :log ORDER BY seq")
    assert (out / "entries.jsonl").read_bytes() == b"".join(bytes(r[0]) + b"\n" for r in rows)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted(str(s) for s in CP_SIZES)
    for s in CP_SIZES:
        assert (out / "checkpoints" / str(s)).read_bytes() == fx.checkpoint(s)
    assert (out / "vkey").read_text() == fx.vkey + "\n"
    for p in [out / "entries.jsonl", out / "vkey", *(out / "checkpoints").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p

    code, report, result = verify_cli(str(out), "--vkey", fx.vkey)
    assert code == 0, result.output
    assert report is not None
    assert report["entries"] == N_ENTRIES and report["checkpoints"] == len(CP_SIZES)
    # The bundle and the database agree on the root.
    code, db_report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 0 and db_report is not None
    assert report["root"] == db_report["root"]


def test_export_refuses_non_empty_dir(sfx: LogFx, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["audit", "export", *sfx.db_args(), "--out", str(out)])
    assert r.exit_code == 2
    assert "non-empty" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # An existing empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    res = export_bundle(sfx.url, None, empty)
    assert res.entries == N_ENTRIES and res.log == "payments"
    with pytest.raises(ExportError):
        export_bundle(sfx.url, None, empty)  # now it is not empty
    with pytest.raises(ExportError):
        export_bundle(sfx.url, "nosuchlog", tmp_path / "x")


def test_export_missing_db_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no.db"
    r = runner.invoke(app, ["audit", "export", "--db", url, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert not (tmp_path / "no.db").exists()


# --------------------------------------------------------------------------- show


def _show_json(fx: LogFx, *args: str) -> list[dict[str, object]]:
    r = runner.invoke(app, ["audit", "show", *fx.db_args(), "--json", "--limit", "0", *args])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [e["seq"] for e in rows] == sorted(e["seq"] for e in rows)  # oldest first
    return rows


def test_show_filters_and_json(fx: LogFx) -> None:
    everything = _show_json(fx)
    assert len(everything) == N_ENTRIES
    assert everything[K_SHOW] == {
        **{k: None for k in everything[0]},
        **fields_for(K_SHOW),
        "v": 1,
        "seq": K_SHOW,
        "ts": everything[K_SHOW]["ts"],
        "log": fx.log,
        "prev": everything[K_SHOW]["prev"],
    }

    def want(pred: object) -> list[int]:
        return [i for i in range(N_ENTRIES) if pred(fields_for(i))]  # type: ignore[operator]

    deny = _show_json(fx, "--decision", "deny")
    assert [e["seq"] for e in deny] == want(lambda f: f["decision"] == "deny")
    globex = _show_json(fx, "--tenant", "globex")
    assert [e["seq"] for e in globex] == want(lambda f: f["tenant"] == "globex")
    combo = _show_json(fx, "--agent", "agent-1", "--run", "run-2", "--decision", "allow")
    assert [e["seq"] for e in combo] == want(
        lambda f: f["agent"] == "agent-1" and f["run"] == "run-2" and f["decision"] == "allow"
    )
    assert combo  # the filters select something
    assert _show_json(fx, "--tenant", "nobody") == []

    r = runner.invoke(app, ["audit", "show", *fx.db_args(), "--json", "--limit", "7"])
    assert [e["seq"] for e in json.loads(r.stdout)] == list(range(7))


def test_show_since_unix_seconds_and_iso(fx: LogFx) -> None:
    everything = _show_json(fx)
    start = CP_SIZES[4]  # first entry of the sixth batch (230)
    ts_ms = parse_ts(str(everything[start]["ts"]))
    assert ts_ms > parse_ts(str(everything[start - 1]["ts"]))  # batches have distinct ts
    n_after = sum(1 for e in everything if parse_ts(str(e["ts"])) >= ts_ms)
    assert n_after == sum(BATCHES[5:])
    secs = f"{ts_ms // 1000}.{ts_ms % 1000:03d}"
    iso = datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    naive = iso.removesuffix("+00:00")  # no offset: taken as UTC
    for since in (secs, iso, naive, everything[start]["ts"]):
        rows = _show_json(fx, "--since", str(since))
        assert rows[0]["seq"] == start and len(rows) == n_after, since
    assert len(_show_json(fx, "--since", "0")) == N_ENTRIES
    assert _show_json(fx, "--since", "4102444800") == []  # 2100


def test_show_table_and_bad_args(sfx: LogFx) -> None:
    r = runner.invoke(app, ["audit", "show", "--db", sfx.url, "--decision", "deny", "--limit", "3"])
    assert r.exit_code == 0, r.output
    assert "decision log payments" in r.stdout
    for col in ("seq", "decision", "reason", "tenant", "agent", "run"):
        assert col in r.stdout
    assert "scope_denied" in r.stdout and "/payments/3" in r.stdout
    assert "3 entries" in r.stdout
    for bad in (
        ["--decision", "maybe"],
        ["--since", "yesterday"],
        ["--limit", "-1"],
        ["--log", "nosuchlog"],
    ):
        r = runner.invoke(app, ["audit", "show", "--db", sfx.url, *bad])
        assert r.exit_code == 2, (bad, r.output)


# --------------------------------------------------------------------------- proof, vkey


def test_proof_verifies_against_the_printed_checkpoint(fx: LogFx) -> None:
    verifier = NoteVerifier.from_vkey(fx.vkey)
    for seq in (0, 123, N_ENTRIES - 1):
        r = runner.invoke(app, ["audit", "proof", str(seq), *fx.db_args()])
        assert r.exit_code == 0, r.output
        head, note = r.stdout.split("\n\n", 1)
        lines = head.split("\n")
        assert lines[0] == "c2sp.org/tlog-proof@v1"
        assert lines[1] == f"index {seq}"
        proof = [base64.b64decode(x, validate=True) for x in lines[2:]]
        cp = open_checkpoint(note.encode(), [verifier], origin=f"axid/{fx.log}")
        assert cp.size == N_ENTRIES
        data, _ = fx.entry(seq)
        verify_inclusion(seq, cp.size, leaf_hash(data), proof, cp.root)


def test_proof_unknown_seq_exit_2(sfx: LogFx) -> None:
    r = runner.invoke(app, ["audit", "proof", str(N_ENTRIES), *sfx.db_args()])
    assert r.exit_code == 2
    assert "not in the tree" in r.stderr
    assert runner.invoke(app, ["audit", "proof", "-1", *sfx.db_args()]).exit_code == 2
    assert runner.invoke(app, ["audit", "proof", "x", *sfx.db_args()]).exit_code == 2


def test_vkey(fx: LogFx) -> None:
    r = runner.invoke(app, ["audit", "vkey", *fx.db_args()])
    assert r.exit_code == 0, r.output
    assert r.stdout == fx.vkey + "\n"
    NoteVerifier.from_vkey(r.stdout.strip())


def test_vkey_missing_db_exit_2(tmp_path: Path) -> None:
    r = runner.invoke(app, ["audit", "vkey", "--db", f"sqlite:///{tmp_path}/none.db"])
    assert r.exit_code == 2
    assert "no database" in r.stderr


def test_default_db_url(sfx: LogFx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default --db is sqlite:///.axid/axid.db, relative to the working directory.
    (tmp_path / "cwd" / ".axid").mkdir(parents=True)
    db_file = Path(sfx.url.removeprefix("sqlite:///"))
    os.link(db_file, tmp_path / "cwd" / ".axid" / "axid.db")
    monkeypatch.chdir(tmp_path / "cwd")
    r = runner.invoke(app, ["audit", "vkey"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == sfx.vkey


# --------------------------------------------------------------------------- live cut, progress


def test_database_source_reads_a_consistent_cut(sfx: LogFx) -> None:
    source = DatabaseSource(sfx.url, None)
    try:
        # A batch committed after the cut is left out: no false "unsigned tail".
        signer = NoteSigner("axid/payments", sfx.key)
        LogStore(sfx.engine, "payments", signer=signer).append_batch(
            [DecisionFields.from_mapping(fields_for(0))] * 5
        )
        report = verify_log(source, vkey=sfx.vkey)
        assert report.ok, report.first_bad
        assert report.entries == N_ENTRIES
    finally:
        source.close()
    r2 = verify_log(ExportDirSource(_export(sfx)), vkey=sfx.vkey)
    assert r2.ok and r2.entries == N_ENTRIES + 5


def _export(fx: LogFx) -> Path:
    out = fx.tmp / "cut-bundle"
    export_bundle(fx.url, None, out)
    return out


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("big")
    url = f"sqlite:///{d / 'db.sqlite'}"
    engine = make_engine(url)
    try:
        create_schema(engine)
        signer = NoteSigner("axid/big", Ed25519PrivateKey.generate())
        store = LogStore(engine, "big", signer=signer)
        store.ensure_log("axid/big", signer.vkey())
        for b in range(3):
            store.append_batch(
                [DecisionFields.from_mapping(fields_for(b * 3500 + i)) for i in range(3500)]
            )
    finally:
        engine.dispose()
    return url, signer.vkey()


def test_verify_progress_bar_for_big_logs(big_log: tuple[str, str], tmp_path: Path) -> None:
    url, vkey = big_log
    r = runner.invoke(app, ["audit", "verify", "--db", url, "--vkey", vkey])
    assert r.exit_code == 0, r.output
    assert "verifying entries" in r.stderr and "10500/10500" in r.stderr
    assert "verifying" not in r.stdout
    assert "entries:       10500" in r.stdout
    # Not with --json: stdout stays one JSON document and stderr quiet.
    r = runner.invoke(app, ["audit", "verify", "--db", url, "--vkey", vkey, "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["logs"][0]["entries"] == 10500
    assert "verifying" not in r.stderr
    # The bundle path shows it too.
    out = tmp_path / "big-bundle"
    assert runner.invoke(app, ["audit", "export", "--db", url, "--out", str(out)]).exit_code == 0
    r = runner.invoke(app, ["audit", "verify", str(out), "--vkey", vkey])
    assert r.exit_code == 0, r.output
    assert "10500/10500" in r.stderr


def test_bundle_with_log_option(sfx: LogFx, tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_bundle(sfx.url, "payments", out)
    code, report, result = verify_cli(str(out), "--log", "payments", "--trust-log-key")
    assert code == 0, result.output
    assert report is not None and report["log"] == "payments"
    code, _, _ = verify_cli(str(out), "--log", "other", "--trust-log-key")
    assert code == 2
    code, _, _ = verify_cli(str(out), "--log", "other", "--vkey", sfx.vkey)
    assert code == 2
