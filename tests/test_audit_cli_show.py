"""`axid audit show` filters on what the entry bytes say, never on index columns alone.

Someone with write access to the database can edit a row's index columns
(decision, tenant, agent, run, ts) without touching its signed bytes: such a
row must still be listed where its bytes match, be marked as tampered, and
make the exit status 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from _audit_helpers import LogFx, runner
from test_audit_cli_verify import N, log_fields, set_column
from test_audit_cli_verify import fx as fx  # the fixtures
from test_audit_cli_verify import sfx as sfx

from axid.audit.entry import parse_entry, parse_ts
from axid.cli import app


def show(fx: LogFx, *args: str) -> tuple[int, list[dict[str, Any]], Any]:
    """``axid audit show --json --limit 0 ARGS``: (exit code, rows, result)."""
    r = runner.invoke(app, ["audit", "show", *fx.db_args(), "--json", "--limit", "0", *args])
    assert r.exit_code in (0, 1), r.output
    rows = json.loads(r.stdout)
    assert [e["seq"] for e in rows] == sorted(e["seq"] for e in rows)
    return r.exit_code, rows, r


def seqs(rows: list[dict[str, Any]]) -> list[int]:
    return [int(e["seq"]) for e in rows]


def want(pred: Callable[[dict[str, object]], bool]) -> list[int]:
    return [i for i in range(N) if pred(log_fields(i))]


def test_intact_log_lists_the_entries_as_their_bytes_say(fx: LogFx) -> None:
    code, rows, r = show(fx)
    assert code == 0 and r.stderr == ""
    assert rows == [parse_entry(fx.entry(i)[0]) for i in range(N)]
    assert all("tampered" not in e for e in rows)
    code, rows, _ = show(fx, "--decision", "deny")
    assert code == 0 and seqs(rows) == want(lambda f: f["decision"] == "deny")


def test_edited_decision_column_is_shown_as_tampered(fx: LogFx) -> None:
    set_column(fx, 3, "decision", "deny")  # the bytes of entry 3 say allow
    code, rows, r = show(fx, "--decision", "allow")
    assert code == 1
    # Still listed: its bytes say allow.
    assert seqs(rows) == want(lambda f: f["decision"] == "allow")
    (marked,) = [e for e in rows if "tampered" in e]
    assert marked["seq"] == 3 and marked["decision"] == "allow"
    assert marked["tampered"] == ["decision column is 'deny' but the entry says 'allow'"]
    assert "disagree with the entry bytes in 1 row read" in r.stderr

    # Not listed among the denies (its bytes are no deny), but the exit status says it.
    code, rows, r = show(fx, "--decision", "deny")
    assert code == 1
    assert seqs(rows) == want(lambda f: f["decision"] == "deny")
    assert "1 of them do not match the filters" in r.stderr


@pytest.mark.parametrize("column", ["tenant", "agent", "run"])
def test_a_row_cannot_be_hidden_by_editing_its_column(column: str, sfx: LogFx) -> None:
    victim = 11
    value = str(log_fields(victim)[column])
    set_column(sfx, victim, column, "nobody")
    code, rows, _ = show(sfx, f"--{column}", value)
    assert code == 1
    assert seqs(rows) == want(lambda f: f[column] == value)
    assert victim in seqs(rows)
    assert next(e for e in rows if e["seq"] == victim)["tampered"] == [
        f"{column} column is 'nobody' but the entry says {value!r}"
    ]
    code, rows, _ = show(sfx, f"--{column}", "nobody")  # a filter on the column alone
    assert code == 1 and rows == []


def test_since_filters_on_the_entry_time(sfx: LogFx) -> None:
    first_ts = parse_ts(str(parse_entry(sfx.entry(0)[0])["ts"]))
    set_column(sfx, 0, "ts", 4102444800000)  # the row claims 2100
    code, rows, _ = show(sfx, "--since", "4102444800")
    assert code == 1 and rows == []
    code, rows, _ = show(sfx, "--since", f"{first_ts // 1000}.{first_ts % 1000:03d}")
    assert code == 1 and seqs(rows) == list(range(N))
    assert "ts column is 4102444800000 (2100-01-01T00:00:00.000Z)" in rows[0]["tampered"][0]


def test_table_marks_the_tampered_row(sfx: LogFx) -> None:
    r = runner.invoke(app, ["audit", "show", *sfx.db_args(), "--limit", "5"])
    assert r.exit_code == 0, r.output
    assert "tampered" not in r.stdout and "5 entries" in r.stdout
    set_column(sfx, 3, "decision", "deny")
    r = runner.invoke(app, ["audit", "show", *sfx.db_args(), "--limit", "5"])
    assert r.exit_code == 1
    lines = [line for line in r.stdout.splitlines() if "TAMPERED" in line]
    assert len(lines) == 1 and "/payments/3" in lines[0] and "allow" in lines[0]
    assert "decision column" in r.stdout


def test_malformed_entry_is_left_out_and_exits_1(sfx: LogFx) -> None:
    sfx.set_entry(5, b"not an entry")
    code, rows, r = show(sfx)
    assert code == 1
    assert 5 not in seqs(rows) and len(rows) == N - 1
    assert "1 stored entry malformed" in r.stderr


def test_limit_reads_up_to_the_last_match(sfx: LogFx) -> None:
    set_column(sfx, 30, "agent", "mallory")
    r = runner.invoke(app, ["audit", "show", *sfx.db_args(), "--json", "--limit", "4"])
    assert r.exit_code == 0, r.output  # entry 30 was not read
    assert seqs(json.loads(r.stdout)) == [0, 1, 2, 3]
    r = runner.invoke(app, ["audit", "show", *sfx.db_args(), "--json", "--limit", "31"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)[30]["tampered"] == [
        f"agent column is 'mallory' but the entry says {log_fields(30)['agent']!r}"
    ]
