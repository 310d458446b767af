"""`axid audit verify`: which key, every log of a database, and the index columns.

The index columns (decision, reason, tenant, agent, run, ts) are copies of entry
fields kept for `axid audit show`; verify must find a row whose columns say
something else than its signed bytes, name its seq and the column, and say so
the same way on the fast path (chunks, forked workers) as entry by entry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _audit_helpers import (
    LogFx,
    copy_sqlite,
    first_bad,
    runner,
    verify_cli,
)
from _pg import require_pg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid.audit import accelerate as accelerate_mod
from axid.audit import reference as reference_mod
from axid.audit.entry import DecisionFields, canonical_entry, format_ts, parse_entry, parse_ts
from axid.audit.note import NoteSigner
from axid.audit.store import LogStore, create_schema, make_engine
from axid.audit.verify import (
    INDEX_COLUMNS,
    DatabaseSource,
    VerifyReport,
    index_disagreements,
    verify_log,
)
from axid.cli import app

BATCHES = (12, 9, 19)  # checkpoints at 12, 21, 40
N = sum(BATCHES)


def log_fields(i: int) -> dict[str, object]:
    """Entry ``i`` of the logs built here: entry 3 is an allow (as is most)."""
    return {
        "decision": "deny" if i % 10 == 7 else "allow",
        "reason": "scope_denied" if i % 10 == 7 else "ok",
        "method": "POST",
        "path": f"/payments/{i}",
        "tenant": None if i % 5 == 4 else ("acme" if i % 2 else "globex"),
        "agent": f"agent-{i % 3}",
        "run": f"run-{i // 10}",
        "peer": "spiffe://example.org/agent/planner",
    }


def build(url: str, log: str, tmp: Path, batches: tuple[int, ...] = BATCHES) -> LogFx:
    """A log of ``log_fields`` entries, one commit batch per item of ``batches``."""
    engine = make_engine(url)
    try:
        create_schema(engine)
        signer = NoteSigner(f"axid/{log}", Ed25519PrivateKey.generate())
        store = LogStore(engine, log, signer=signer)
        store.ensure_log(store.origin, signer.vkey())
        i = 0
        for n in batches:
            store.append_batch([DecisionFields.from_mapping(log_fields(i + j)) for j in range(n)])
            i += n
    finally:
        engine.dispose()
    return LogFx(url, log, tmp / "unused.pem", signer.vkey(), tmp)


def drop_pg_log(fx: LogFx) -> None:
    for table in ("axid_audit_entry", "axid_audit_node", "axid_audit_checkpoint"):
        fx.sql(f"DELETE FROM {table} WHERE log = :log")
    fx.sql("DELETE FROM axid_audit_log WHERE name = :log")
    fx.close()


@pytest.fixture(scope="module")
def two_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A SQLite database with two logs, ``issuer`` and ``payments``: (dir, vkeys)."""
    d = tmp_path_factory.mktemp("two-logs")
    url = f"sqlite:///{d / 'db.sqlite'}"
    issuer = build(url, "issuer", d, (5, 6))
    payments = build(url, "payments", d)
    return d, issuer.vkey, payments.vkey


@pytest.fixture
def two(two_logs: tuple[Path, str, str], tmp_path: Path) -> Iterator[tuple[str, LogFx, LogFx]]:
    d, issuer_vkey, payments_vkey = two_logs
    copy_sqlite(d, tmp_path / "db")
    url = f"sqlite:///{tmp_path / 'db' / 'db.sqlite'}"
    fxs = [
        LogFx(url, name, tmp_path / "unused.pem", v, tmp_path)
        for name, v in (("issuer", issuer_vkey), ("payments", payments_vkey))
    ]
    try:
        yield url, fxs[0], fxs[1]
    finally:
        for f in fxs:
            f.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogFx]:
    if request.param == "sqlite":
        f = build(f"sqlite:///{tmp_path / 'db.sqlite'}", "payments", tmp_path)
        try:
            yield f
        finally:
            f.close()
    else:
        f = build(require_pg(), f"t-{uuid.uuid4().hex[:16]}", tmp_path)
        try:
            yield f
        finally:
            drop_pg_log(f)


@pytest.fixture
def sfx(tmp_path: Path) -> Iterator[LogFx]:
    f = build(f"sqlite:///{tmp_path / 'db.sqlite'}", "payments", tmp_path)
    try:
        yield f
    finally:
        f.close()


def set_column(fx: LogFx, seq: int, column: str, value: object) -> None:
    assert column in INDEX_COLUMNS
    fx.sql(
        f"UPDATE axid_audit_entry SET {column} = :v WHERE log = :log AND seq = :s",
        v=value,
        s=seq,
    )


def stored_entry(fx: LogFx, seq: int) -> dict[str, Any]:
    return parse_entry(fx.entry(seq)[0])


# --------------------------------------------------------------------------- which key


def test_no_key_is_a_usage_error(sfx: LogFx) -> None:
    code, report, result = verify_cli(*sfx.db_args())
    assert code == 2
    assert "--vkey" in result.stderr and "--trust-log-key" in result.stderr
    assert report is not None and report["ok"] is False and "no key" in report["error"]
    r = runner.invoke(app, ["audit", "verify", *sfx.db_args()])  # human output, same
    assert r.exit_code == 2 and "no key to verify with" in r.stderr and r.stdout == ""


def test_vkey_and_trust_log_key_exclude_each_other(sfx: LogFx) -> None:
    code, _, result = verify_cli(*sfx.db_args(), "--vkey", sfx.vkey, "--trust-log-key")
    assert code == 2
    assert "either --vkey or --trust-log-key" in result.stderr


def test_trust_log_key_uses_the_stored_key_and_warns(sfx: LogFx) -> None:
    code, report, result = verify_cli(*sfx.db_args(), "--trust-log-key")
    assert code == 0, result.output
    assert report is not None and report["vkey_from_log"] is True
    assert report["vkey"] == sfx.vkey
    assert any("key stored with the log" in w for w in report["warnings"])
    code, report, _ = verify_cli(*sfx.db_args(), "--vkey", sfx.vkey)
    assert code == 0 and report is not None
    assert report["vkey_from_log"] is False and report["warnings"] == []


# --------------------------------------------------------------------------- every log


def test_every_log_of_the_database_one_report_each(two: tuple[str, LogFx, LogFx]) -> None:
    url, issuer, payments = two
    code, doc, result = verify_cli("--db", url, "--vkey", payments.vkey, "--vkey", issuer.vkey)
    assert code == 0, result.output
    assert doc is not None and doc["ok"] is True
    assert [(r["log"], r["ok"], r["entries"]) for r in doc["logs"]] == [
        ("issuer", True, 11),
        ("payments", True, N),
    ]
    # Each log took the key named after its origin.
    assert [r["vkey"] for r in doc["logs"]] == [issuer.vkey, payments.vkey]

    r = runner.invoke(app, ["audit", "verify", "--db", url, "--trust-log-key"])
    assert r.exit_code == 0, r.output
    assert "== log issuer ==" in r.stdout and "== log payments ==" in r.stdout
    assert r.stdout.count("OK: the log is intact") == 2
    assert "2 logs: all intact" in r.stdout
    assert r.stderr.count("key stored with the log") == 2  # a warning per log

    # --log still picks one log, and the single-log JSON shape.
    code, report, _ = verify_cli("--db", url, "--log", "issuer", "--vkey", issuer.vkey)
    assert code == 0 and report is not None and report["log"] == "issuer"
    assert report["entries"] == 11


def test_every_log_tampering_in_one(two: tuple[str, LogFx, LogFx]) -> None:
    url, issuer, payments = two
    set_column(payments, 3, "decision", "deny")
    keys = ["--vkey", issuer.vkey, "--vkey", payments.vkey]
    code, doc, _ = verify_cli("--db", url, *keys)
    assert code == 1
    assert doc is not None and doc["ok"] is False
    by_log = {r["log"]: r for r in doc["logs"]}
    assert by_log["issuer"]["ok"] is True
    fb = first_bad(by_log["payments"])
    assert fb["seq"] == 3 and "decision column" in fb["what"]
    r = runner.invoke(app, ["audit", "verify", "--db", url, *keys])
    assert r.exit_code == 1
    assert "2 logs: TAMPERED: payments" in r.stdout
    assert "first bad seq: 3" in r.stdout


def test_every_log_needs_a_key_for_each(two: tuple[str, LogFx, LogFx], tmp_path: Path) -> None:
    url, issuer, payments = two
    code, _, result = verify_cli("--db", url, "--vkey", payments.vkey)
    assert code == 2
    assert "no --vkey for log 'issuer'" in result.stderr
    # The same key twice is one key; two keys for one origin are a usage error.
    other = NoteSigner("axid/issuer", Ed25519PrivateKey.generate()).vkey()
    args = ["--vkey", issuer.vkey, "--vkey", payments.vkey]
    assert verify_cli("--db", url, *args, "--vkey", issuer.vkey)[0] == 0
    code, _, result = verify_cli("--db", url, *args, "--vkey", other)
    assert code == 2 and "two different --vkey for 'axid/issuer'" in result.stderr
    # A key file works as well as the key itself.
    f = tmp_path / "issuer.vkey"
    f.write_text(issuer.vkey + "\n")
    assert verify_cli("--db", url, "--vkey", str(f), "--vkey", payments.vkey)[0] == 0


def test_every_log_trusted_checkpoints_by_origin(
    two: tuple[str, LogFx, LogFx], tmp_path: Path
) -> None:
    url, issuer, payments = two
    keys = ["--vkey", issuer.vkey, "--vkey", payments.vkey]
    cp_issuer, cp_payments = tmp_path / "cp-issuer", tmp_path / "cp-payments"
    cp_issuer.write_bytes(issuer.checkpoint(11))
    cp_payments.write_bytes(payments.checkpoint(N))
    trusted = ["--trusted-checkpoint", str(cp_payments), "--trusted-checkpoint", str(cp_issuer)]
    assert verify_cli("--db", url, *keys, *trusted)[0] == 0
    # Roll payments back to 21 entries: only its own trusted checkpoint shows it.
    payments.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq >= 21")
    payments.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > 21")
    assert verify_cli("--db", url, *keys, "--trusted-checkpoint", str(cp_issuer))[0] == 0
    code, doc, _ = verify_cli("--db", url, *keys, *trusted)
    assert code == 1 and doc is not None
    by_log = {r["log"]: r for r in doc["logs"]}
    assert by_log["issuer"]["ok"] is True
    fb = first_bad(by_log["payments"])
    assert fb["seq"] == 21 and "rolled back" in fb["what"]
    # A checkpoint of no log verified here, or two of one origin: usage errors.
    code, _, result = verify_cli("--db", url, "--log", "issuer", *keys, *trusted)
    assert code == 2 and "not a log verified here" in result.stderr
    code, _, result = verify_cli(
        "--db",
        url,
        *keys,
        "--trusted-checkpoint",
        str(cp_issuer),
        "--trusted-checkpoint",
        str(cp_issuer),
    )
    assert code == 2 and "two --trusted-checkpoint" in result.stderr


def test_bundle_takes_the_vkey_of_its_log(two: tuple[str, LogFx, LogFx], tmp_path: Path) -> None:
    url, issuer, payments = two
    out = tmp_path / "bundle"
    r = runner.invoke(app, ["audit", "export", "--db", url, "--log", "payments", "--out", str(out)])
    assert r.exit_code == 0, r.output
    keys = ["--vkey", issuer.vkey, "--vkey", payments.vkey]
    code, report, result = verify_cli(str(out), *keys)
    assert code == 0, result.output
    assert report is not None and report["log"] == "payments" and report["vkey"] == payments.vkey
    # The only key given is another log's: the bundle's own key does not match it.
    code, report, _ = verify_cli(str(out), "--vkey", issuer.vkey)
    assert code == 1
    assert "key was replaced" in first_bad(report)["what"]


# --------------------------------------------------------------------------- index columns


def test_edited_decision_column_is_tampering(fx: LogFx) -> None:
    assert stored_entry(fx, 3)["decision"] == "allow"
    set_column(fx, 3, "decision", "deny")  # the row now claims a deny its bytes do not say
    code, report, _ = verify_cli(*fx.db_args(), "--vkey", fx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == 3
    assert "decision column is 'deny' but the entry says 'allow'" in fb["what"]
    r = runner.invoke(app, ["audit", "verify", *fx.db_args(), "--vkey", fx.vkey])
    assert r.exit_code == 1
    assert "first bad seq: 3" in r.stdout and "decision column" in r.stdout


def _wrong_value(column: str, entry: dict[str, Any]) -> object:
    if column == "ts":
        return parse_ts(entry["ts"]) + 1
    if column == "reason":
        return "ok" if entry["reason"] != "ok" else "scope_denied"
    if column == "decision":
        return "deny" if entry["decision"] == "allow" else "allow"
    return None if entry[column] is not None else "mallory"


@pytest.mark.parametrize("column", INDEX_COLUMNS)
def test_each_index_column_is_checked(column: str, sfx: LogFx) -> None:
    wrong = _wrong_value(column, stored_entry(sfx, 14))
    set_column(sfx, 14, column, wrong)
    code, report, _ = verify_cli(*sfx.db_args(), "--vkey", sfx.vkey)
    assert code == 1
    fb = first_bad(report)
    assert fb["seq"] == 14
    assert f"{column} column is {wrong!r}" in fb["what"]
    if column == "ts":
        assert isinstance(wrong, int) and f"({format_ts(wrong)}) but the entry says" in fb["what"]


def test_column_of_another_type_is_tampering(sfx: LogFx) -> None:
    # SQLite keeps text in an INTEGER column; the value must be the entry's, as an int.
    set_column(sfx, 5, "ts", "not a time")
    fb = first_bad(verify_cli(*sfx.db_args(), "--vkey", sfx.vkey)[1])
    assert fb["seq"] == 5 and "ts column is 'not a time'" in fb["what"]


def test_first_bad_is_the_earliest_of_column_and_byte_findings(sfx: LogFx) -> None:
    set_column(sfx, 30, "agent", "mallory")
    data, lh = sfx.entry(20)
    sfx.set_entry(20, data.replace(b"/payments/20", b"/payments/29"))
    fb = first_bad(verify_cli(*sfx.db_args(), "--vkey", sfx.vkey)[1])
    assert fb["seq"] == 20 and "altered" in fb["what"]
    sfx.set_entry(20, data, lh)
    set_column(sfx, 9, "run", "run-x")
    fb = first_bad(verify_cli(*sfx.db_args(), "--vkey", sfx.vkey)[1])
    assert fb["seq"] == 9 and "run column is 'run-x' but the entry says 'run-0'" in fb["what"]


def test_bundles_have_no_index_columns(sfx: LogFx, tmp_path: Path) -> None:
    set_column(sfx, 3, "decision", "deny")
    out = tmp_path / "bundle"
    assert runner.invoke(app, ["audit", "export", *sfx.db_args(), "--out", str(out)]).exit_code == 0
    code, report, _ = verify_cli(str(out), "--vkey", sfx.vkey)  # the bytes are intact
    assert code == 0 and report is not None and report["ok"] is True


# --------------------------------------------------------------------------- fast path


def _key(rep: VerifyReport) -> tuple[Any, ...]:
    return (rep.ok, rep.entries, rep.checkpoints, rep.first_bad, rep.root, rep.latest_note)


_MODES: list[tuple[int | None, int]] = [(0, 2048), (0, 4), (2, 4), (1, 8), (None, 4)]


def _modes_agree(monkeypatch: pytest.MonkeyPatch, fx: LogFx) -> VerifyReport:
    """Every mode (chunk sizes, workers) reports what entry-by-entry alone reports."""

    def run(workers: int | None) -> VerifyReport:
        source = DatabaseSource(fx.url, fx.log)
        try:
            return verify_log(source, vkey=fx.vkey, workers=workers)
        finally:
            source.close()

    with monkeypatch.context() as m:
        m.setattr(accelerate_mod, "check_chunk", lambda start, datas: None)  # never fast
        ref = run(0)
    for workers, chunk in _MODES:
        with monkeypatch.context() as m:
            m.setattr(accelerate_mod, "_CHUNK", chunk)
            # Workers read the rows themselves once the log looks long enough.
            m.setattr(accelerate_mod, "_POOL_AFTER_CHUNKS", 2)
            assert _key(run(workers)) == _key(ref), (workers, chunk)
    return ref


_COLUMN_EDITS: dict[str, Callable[[LogFx], None]] = {
    "intact": lambda fx: None,
    "decision": lambda fx: set_column(fx, 3, "decision", "deny"),
    "tenant to null": lambda fx: set_column(fx, 13, "tenant", None),
    "agent of the last entry": lambda fx: set_column(fx, N - 1, "agent", "mallory"),
    "ts": lambda fx: set_column(fx, 21, "ts", 0),
    "run, first entry": lambda fx: set_column(fx, 0, "run", "run-9"),
    "two rows": lambda fx: _two_rows(fx),
}


def _two_rows(fx: LogFx) -> None:
    set_column(fx, 30, "reason", "ok2")
    set_column(fx, 8, "run", "")


@pytest.mark.parametrize("case", list(_COLUMN_EDITS))
def test_fast_path_modes_agree_on_index_columns(
    case: str, fx: LogFx, monkeypatch: pytest.MonkeyPatch
) -> None:
    _COLUMN_EDITS[case](fx)
    ref = _modes_agree(monkeypatch, fx)
    assert ref.ok is (case == "intact"), ref.first_bad
    if case == "two rows":
        assert ref.first_bad is not None and ref.first_bad.seq == 8


def test_fast_path_is_taken_with_index_columns(sfx: LogFx, monkeypatch: pytest.MonkeyPatch) -> None:
    """The columns of an intact log pass the fast check: no entry goes one by one."""
    calls: list[int] = []
    orig = reference_mod.Pass._take_one

    def counting(self: Any, *row: Any) -> None:
        calls.append(self.n)
        orig(self, *row)

    monkeypatch.setattr(reference_mod.Pass, "_take_one", counting)
    monkeypatch.setattr(accelerate_mod, "_CHUNK", 4)
    for workers in (0, 2):
        rep = verify_log(DatabaseSource(sfx.url, sfx.log), vkey=sfx.vkey, workers=workers)
        assert rep.ok and rep.entries == N
    assert calls == []
    set_column(sfx, 6, "agent", "mallory")
    rep = verify_log(DatabaseSource(sfx.url, sfx.log), vkey=sfx.vkey, workers=0)
    assert rep.first_bad is not None and rep.first_bad.seq == 6
    assert calls and min(calls) == 4  # the chunk 4..7 went entry by entry


# Strings that try to look like structure inside a value.
_TRICKY = st.sampled_from(
    [
        "",
        "acme",
        '"',
        "\\",
        ',"decision":"deny"',
        '","decision":"deny","iss":',
        ',"tenant":null,"ts":"2023-11-14T22:13:20.000Z","v":1}',
        '{"agent":"mallory"',
        ',"run":"run-x","scope_required":',
        "\u2028\x00\x1f caf\u00e9",
    ]
)
_VALUE = st.one_of(st.none(), _TRICKY, st.text(max_size=12))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.fixed_dictionaries(
        {
            "tenant": _VALUE,
            "agent": _VALUE,
            "run": _VALUE,
            "path": _VALUE,
            "note": _VALUE,
            "rule": _VALUE,
            "iss": _VALUE,
            "chain": st.lists(_TRICKY.filter(bool), max_size=3),
        }
    ),
    decision=st.sampled_from(["allow", "deny"]),
    ms=st.integers(0, 253402300799999),
    column=st.sampled_from([None, *INDEX_COLUMNS]),
    other=st.one_of(_VALUE, st.integers(-1, 2**40), st.binary(max_size=4)),
)
def test_fast_index_check_never_passes_a_disagreement(
    fields: dict[str, Any],
    decision: str,
    ms: int,
    column: str | None,
    other: object,
) -> None:
    """index_clean (fast) True implies index_disagreements (reference) finds nothing;
    and on columns that agree the fast check passes (the fast path stays fast)."""
    fields = {k: v for k, v in fields.items() if k == "chain" or v is None or v != ""}
    fields.update(decision=decision, reason="ok")
    data = canonical_entry(fields, seq=1, prev="ab" * 32, log="payments", ts=ms)
    entry = parse_entry(data)
    row = [parse_ts(str(entry["ts"])) if c == "ts" else entry[c] for c in INDEX_COLUMNS]
    assert index_disagreements(entry, row) == []
    assert accelerate_mod.index_clean([data], [(v,) for v in row])
    if column is not None:
        row[INDEX_COLUMNS.index(column)] = other
    wrong = index_disagreements(entry, row)
    if accelerate_mod.index_clean([data], [(v,) for v in row]):
        assert wrong == [], (column, other)
    else:
        assert wrong, (column, other)


def test_json_report_per_log_keeps_the_single_log_shape(two: tuple[str, LogFx, LogFx]) -> None:
    url, issuer, payments = two
    _, single, _ = verify_cli("--db", url, "--log", "payments", "--vkey", payments.vkey)
    _, several, _ = verify_cli("--db", url, "--vkey", issuer.vkey, "--vkey", payments.vkey)
    assert single is not None and several is not None
    assert set(several) == {"ok", "logs"}
    assert several["logs"][1] == single
    assert json.dumps(several["logs"][1], sort_keys=True) == json.dumps(single, sort_keys=True)
