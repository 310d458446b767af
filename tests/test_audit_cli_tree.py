"""`axid audit tree RUN`: the spawn tree a run belongs to, across the logs of a database.

The issuer's log records the mints (who spawned whom), the services' logs the
decisions on each run's requests; one tree shows both, built from the entry
bytes (never from index columns).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _audit_helpers import LogFx, runner
from _pg import require_pg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.entry import DecisionFields
from axid.audit.note import NoteSigner
from axid.audit.store import LogStore, create_schema, make_engine
from axid.audit.tree import build_tree, find_root
from axid.cli import app

PLANNER = "spiffe://example.org/agent/planner"
RESEARCHER = "spiffe://example.org/agent/researcher"
WRITER = "spiffe://example.org/agent/writer"
ODD_PATH = "/payments/[bold]x[/]"  # rich markup: must be shown literally


def _mint(run: str, agent: str, peer: str, chain: list[str], ok: bool = True) -> dict[str, Any]:
    return {
        "decision": "allow" if ok else "deny",
        "reason": "ok" if ok else "spawn_not_allowed",
        "method": "POST",
        "path": "/v1/tokens",
        "service": "issuer",
        "peer": peer,
        "agent": agent,
        "tenant": "acme",
        "run": run,
        "spawn_parent": chain[-1] if chain else None,
        "chain": chain,
    }


def _call(run: str, agent: str, peer: str, chain: list[str], method: str, path: str,
          ok: bool = True) -> dict[str, Any]:  # fmt: skip
    return {
        **_mint(run, agent, peer, chain, ok),
        "reason": "ok" if ok else "scope_insufficient",
        "method": method,
        "path": path,
        "service": "payments",
    }


@dataclass
class World:
    url: str
    issuer: str  # log names
    payments: str
    runs: dict[str, str]  # r0, r1, r2, r3, rx -> unique run ids

    def args(self, *, log: str | None = None) -> list[str]:
        return ["--db", self.url, *(["--log", log] if log else [])]


def _story(r: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(log, fields) in time order: r0 spawns r1 and (refused) r3, r1 spawns r2; rx alone."""
    r0, r1, r2, r3, rx = (r[k] for k in ("r0", "r1", "r2", "r3", "rx"))
    return [
        ("issuer", _mint(r0, "planner", PLANNER, [])),
        ("payments", _call(r0, "planner", PLANNER, [], "GET", "/payments/1")),
        ("issuer", _mint(r1, "researcher", RESEARCHER, [r0])),
        ("issuer", _mint(rx, "planner", PLANNER, [])),
        (
            "payments",
            _call(r1, "researcher", RESEARCHER, [r0], "POST", "/payments/1/refund", False),
        ),
        ("issuer", _mint(r2, "writer", WRITER, [r0, r1])),
        ("payments", _call(r2, "writer", WRITER, [r0, r1], "GET", ODD_PATH)),
        ("issuer", _mint(r3, "writer", WRITER, [r0], ok=False)),
        ("payments", _call(rx, "planner", PLANNER, [], "GET", "/payments/x")),
        ("payments", _call(r0, "planner", PLANNER, [], "GET", "/payments/9")),
    ]


def build_world(url: str, prefix: str = "") -> World:
    runs = {k: f"{prefix}{k}" for k in ("r0", "r1", "r2", "r3", "rx")}
    logs = {"issuer": f"{prefix}issuer", "payments": f"{prefix}payments"}
    engine = make_engine(url)
    try:
        create_schema(engine)
        stores = {}
        for kind, name in logs.items():
            signer = NoteSigner(f"axid/{name}", Ed25519PrivateKey.generate())
            stores[kind] = LogStore(engine, name, signer=signer)
            stores[kind].ensure_log(f"axid/{name}", signer.vkey())
        for kind, fields in _story(runs):
            stores[kind].append_batch([DecisionFields.from_mapping(fields)])
            time.sleep(0.003)  # distinct times: the tree orders decisions by time
    finally:
        engine.dispose()
    return World(url, logs["issuer"], logs["payments"], runs)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(f"sqlite:///{tmp_path / 'db.sqlite'}")


@pytest.fixture
def pg_world(tmp_path: Path) -> Iterator[World]:
    url = require_pg()
    w = build_world(url, f"t{uuid.uuid4().hex[:12]}-")
    yield w
    fx = LogFx(url, w.issuer, tmp_path / "unused.pem", "", tmp_path)
    try:
        for log in (w.issuer, w.payments):
            for table in ("axid_audit_entry", "axid_audit_node", "axid_audit_checkpoint"):
                fx.sql(f"DELETE FROM {table} WHERE log = :l", l=log)
            fx.sql("DELETE FROM axid_audit_log WHERE name = :l", l=log)
    finally:
        fx.close()


def tree_json(w: World, run: str, *, log: str | None = None) -> dict[str, Any]:
    r = runner.invoke(app, ["audit", "tree", run, *w.args(log=log), "--json"])
    assert r.exit_code == 0, r.output
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def shape(node: dict[str, Any]) -> dict[str, Any]:
    """A node's run, who ran it, its decisions (log, seq, decision) and children's shapes."""
    return {
        "run": node["run"],
        "agents": node["agents"],
        "workloads": node["workloads"],
        "decisions": [(d["log"], d["seq"], d["decision"]) for d in node["decisions"]],
        "children": [shape(c) for c in node["children"]],
    }


def expected(w: World, *, issuer: bool = True) -> dict[str, Any]:
    r = w.runs
    i, p = w.issuer, w.payments

    def d(*items: tuple[str, int, str]) -> list[tuple[str, int, str]]:
        return [x for x in items if issuer or x[0] != i]

    r2 = {
        "run": r["r2"],
        "agents": ["writer"],
        "workloads": [WRITER],
        "decisions": d((i, 3, "allow"), (p, 2, "allow")),
        "children": [],
    }
    r1 = {
        "run": r["r1"],
        "agents": ["researcher"],
        "workloads": [RESEARCHER],
        "decisions": d((i, 1, "allow"), (p, 1, "deny")),
        "children": [r2],
    }
    r3 = {
        "run": r["r3"],
        "agents": ["writer"],
        "workloads": [WRITER],
        "decisions": [(i, 4, "deny")],
        "children": [],
    }
    return {
        "run": r["r0"],
        "agents": ["planner"],
        "workloads": [PLANNER],
        "decisions": d((i, 0, "allow"), (p, 0, "allow"), (p, 4, "allow")),
        "children": [r1, r3] if issuer else [r1],
    }


def test_tree_from_every_log(world: World) -> None:
    doc = tree_json(world, world.runs["r2"])
    assert doc["run"] == world.runs["r2"] and doc["root"] == world.runs["r0"]
    assert doc["logs"] == [world.issuer, world.payments]
    assert shape(doc["tree"]) == expected(world)
    refund = doc["tree"]["children"][0]["decisions"][1]
    assert refund == {
        "ts": refund["ts"],
        "method": "POST",
        "path": "/payments/1/refund",
        "decision": "deny",
        "reason": "scope_insufficient",
        "seq": 1,
        "log": world.payments,
    }
    # Any run of the tree gives the same tree, from its root.
    for member in ("r0", "r1", "r3"):
        assert tree_json(world, world.runs[member])["tree"] == doc["tree"]


def test_decisions_in_time_order(world: World) -> None:
    def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for c in node["children"]:
            yield from walk(c)

    for node in walk(tree_json(world, world.runs["r0"])["tree"]):
        times = [d["ts"] for d in node["decisions"]]
        assert times == sorted(times)


def test_another_root_is_another_tree(world: World) -> None:
    doc = tree_json(world, world.runs["rx"])
    assert doc["root"] == world.runs["rx"]
    assert shape(doc["tree"]) == {
        "run": world.runs["rx"],
        "agents": ["planner"],
        "workloads": [PLANNER],
        "decisions": [(world.issuer, 2, "allow"), (world.payments, 3, "allow")],
        "children": [],
    }


def test_one_log_only(world: World) -> None:
    doc = tree_json(world, world.runs["r2"], log=world.payments)
    assert doc["logs"] == [world.payments]
    assert shape(doc["tree"]) == expected(world, issuer=False)


def test_rendered_tree(world: World) -> None:
    r = runner.invoke(app, ["audit", "tree", world.runs["r1"], *world.args()])
    assert r.exit_code == 0, r.output
    out = r.stdout
    lines = out.splitlines()
    first = {run: next(i for i, ln in enumerate(lines) if run in ln) for run in world.runs.values()
             if run in out}  # fmt: skip
    r0, r1, r2, r3 = (world.runs[k] for k in ("r0", "r1", "r2", "r3"))
    assert set(first) == {r0, r1, r2, r3}  # rx is another tree
    assert first[r0] < first[r1] < first[r2] < first[r3]
    assert f"agent researcher  workload {RESEARCHER}" in lines[first[r1]]
    refund = next(ln for ln in lines if "/payments/1/refund" in ln)
    assert "POST /payments/1/refund  deny  scope_insufficient  seq 1" in refund
    assert f"({world.payments})" in refund  # several logs: each decision names its own
    assert ODD_PATH in out  # markup in a stored value is shown, not applied
    r = runner.invoke(app, ["audit", "tree", r1, *world.args(log=world.payments)])
    assert r.exit_code == 0 and f"({world.payments})" not in r.stdout


def test_unknown_run_exit_2(world: World) -> None:
    r = runner.invoke(app, ["audit", "tree", "no-such-run", *world.args()])
    assert r.exit_code == 2
    assert "no entries for run 'no-such-run'" in r.stderr and r.stdout == ""
    r = runner.invoke(app, ["audit", "tree", world.runs["r3"], *world.args(log=world.payments)])
    assert r.exit_code == 2  # r3 was only ever refused by the issuer
    r = runner.invoke(app, ["audit", "tree", "r", "--db", world.url, "--log", "nosuchlog"])
    assert r.exit_code == 2 and "no log 'nosuchlog'" in r.stderr


def test_tree_reads_the_bytes_not_the_columns(world: World, tmp_path: Path) -> None:
    fx = LogFx(world.url, world.payments, tmp_path / "unused.pem", "", tmp_path)
    try:
        fx.sql("UPDATE axid_audit_entry SET run = 'elsewhere' WHERE log = :log")
        assert shape(tree_json(world, world.runs["r2"])["tree"]) == expected(world)
        fx.set_entry(3, b"not an entry")  # rx's call: malformed, left out, exit 1
    finally:
        fx.close()
    r = runner.invoke(app, ["audit", "tree", world.runs["rx"], *world.args(), "--json"])
    assert r.exit_code == 1
    assert "1 stored entry malformed" in r.stderr
    assert [d["log"] for d in json.loads(r.stdout)["tree"]["decisions"]] == [world.issuer]


def test_tree_on_postgresql(pg_world: World) -> None:
    doc = tree_json(pg_world, pg_world.runs["r2"], log=pg_world.payments)
    assert doc["root"] == pg_world.runs["r0"]
    assert shape(doc["tree"]) == expected(pg_world, issuer=False)
    doc = tree_json(pg_world, pg_world.runs["r3"], log=pg_world.issuer)
    assert [c["run"] for c in doc["tree"]["children"]] == [
        pg_world.runs["r1"],
        pg_world.runs["r3"],
    ]


# --------------------------------------------------------------------------- the model


def _e(seq: int, run: str | None, chain: list[str], ts: str = "2026-01-01T00:00:00.000Z",
       log: str = "l") -> dict[str, Any]:  # fmt: skip
    return {
        "seq": seq,
        "log": log,
        "ts": ts,
        "run": run,
        "chain": chain,
        "spawn_parent": chain[-1] if chain else None,
        "decision": "allow",
        "reason": "ok",
        "method": "GET",
        "path": "/",
        "agent": None,
        "peer": None,
    }


def test_find_root() -> None:
    entries = [_e(0, "a", []), _e(1, "b", ["a"]), _e(2, "c", ["a", "b"]), _e(3, "z", [])]
    assert find_root("c", entries) == "a"
    assert find_root("a", entries) == "a"
    assert find_root("z", entries) == "z"
    assert find_root("missing", entries) is None
    # Named only in a descendant's chain (its own entries in a log not read).
    assert find_root("b", [_e(2, "c", ["a", "b"])]) == "a"
    # A refusal recorded with an empty chain does not make the child a root.
    assert find_root("b", [_e(0, "b", []), _e(1, "b", ["a"])]) == "a"


def test_build_tree_keeps_a_tree_on_odd_entries() -> None:
    entries = [
        _e(0, "a", ["a"]),  # a run in its own chain
        _e(1, "b", ["a"]),
        _e(2, "c", ["a", "b"]),
        _e(3, "c", ["a"]),  # another parent for c: the first one read stays
        _e(4, "b", ["a", "c"]),  # would make a cycle b -> c -> b
        _e(5, None, ["a"]),  # no run: skipped
        _e(6, "d", ["a", "gone"]),  # "gone" has no entry of its own
    ]
    root = build_tree("a", entries)
    assert root.run == "a" and [d.seq for d in root.decisions] == [0]
    assert [c.run for c in root.children] == ["b", "gone"]
    b = root.children[0]
    assert [d.seq for d in b.decisions] == [1, 4]
    assert [c.run for c in b.children] == ["c"]
    assert [d.seq for d in b.children[0].decisions] == [2, 3]
    gone = root.children[1]
    assert gone.decisions == [] and [c.run for c in gone.children] == ["d"]
