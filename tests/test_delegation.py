"""Explicit delegation at the issuer (DESIGN.md, "Minting rules" and "Approvals,
delegation and budgets"): a parent token parents a child only for a workload whose
registration names the parent's ``sub`` in ``spawn_from``; without ``spawn_from`` a
workload spawns from nobody. Refusals are 403 ``spawn_not_allowed``, recorded.

Attacks over real mTLS against a real issuer (uvicorn, dev PKI), SQLite and
PostgreSQL, as in tests/test_issuer.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _issuer_helpers import World, make_world, running, uid

REFUSED = "spawn_not_allowed"


def _registrations(w: World, helper: str, *, delegation: bool) -> dict[str, Any]:
    """planner (spawns from nobody), worker (spawns from the planner when
    ``delegation``) and stranger: another workload of the same tenant (agent
    ``helper``), registered for the same audience and scope, without ``spawn_from``."""
    td = w.pki.trust_domain.name
    common = {"tenant": w.tenant, "audiences": ["payments"], "scope": "payments:read"}
    worker: dict[str, Any] = {
        "spiffe_id": f"spiffe://{td}/agent/worker",
        "agents": [w.worker],
        **common,
    }
    if delegation:
        worker["spawn_from"] = [f"spiffe://{td}/agent/planner"]
    return {
        "registrations": [
            {"spiffe_id": f"spiffe://{td}/agent/planner", "agents": [w.planner], **common},
            worker,
            {"spiffe_id": f"spiffe://{td}/agent/stranger", "agents": [helper], **common},
        ]
    }


@pytest.fixture(params=["sqlite", "pg"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _world(tmp_path: Any, kind: str, *, delegation: bool) -> tuple[World, str]:
    w = make_world(tmp_path, kind)
    helper = f"helper-{uid()}"
    doc = _registrations(w, helper, delegation=delegation)
    (w.tmp / "registrations.yaml").write_text(json.dumps(doc))  # JSON is YAML
    return w, helper


@pytest.fixture
def delegated(tmp_path: Any, kind: str) -> Iterator[tuple[World, str]]:
    w, helper = _world(tmp_path, kind, delegation=True)
    with running(w):
        yield w, helper


def _mint(w: World, name: str, agent: str, parent: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "agent": agent,
        "run": w.run(),
        "audience": "payments",
        "scope": "payments:read",
    }
    if parent is not None:
        body["parent_token"] = parent
    return w.mint(name, **body)


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    return r.json()


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["reason"] == REFUSED and body["status"] == 403, body
    assert "token" not in body


def _attribution(w: World, parent: dict[str, Any], name: str) -> str:
    claims = w.verify(parent["token"])
    return f"parent jti {parent['jti']} run {claims.run} sub {w.spiffe_id(name)}"


def test_other_workload_holding_the_planners_token_cannot_spawn(
    delegated: tuple[World, str],
) -> None:
    w, helper = delegated
    planner = _ok(_mint(w, "planner", w.planner))
    # The stranger is registered in the same tenant and holds the planner's token
    # (a bearer credential): it still may not mint a child under the planner's run.
    _refused(_mint(w, "stranger", helper, parent=planner["token"]))
    entry = w.entries()[-1]
    assert (entry["decision"], entry["reason"]) == ("deny", REFUSED)
    assert entry["peer"] == w.spiffe_id("stranger")
    assert entry["tenant"] == w.tenant and entry["agent"] == helper
    assert entry["jti"] is None and entry["kid"] is None  # nothing was signed
    assert entry["note"] == _attribution(w, planner, "planner")
    assert planner["token"] not in json.dumps(entry)
    # It is still registered: a root token of its own it may mint.
    _ok(_mint(w, "stranger", helper))


def test_planner_holding_the_workers_token_cannot_spawn(delegated: tuple[World, str]) -> None:
    w, _helper = delegated
    planner = _ok(_mint(w, "planner", w.planner))
    worker = _ok(_mint(w, "worker", w.worker, parent=planner["token"]))
    # The planner has no spawn_from: the worker's token does not make it a child.
    _refused(_mint(w, "planner", w.planner, parent=worker["token"]))
    # Nor does its own token (spawn_from names whom, and the planner names nobody).
    _refused(_mint(w, "planner", w.planner, parent=planner["token"]))
    denies = [e for e in w.entries() if e["decision"] == "deny"]
    assert [(e["reason"], e["peer"]) for e in denies] == [(REFUSED, w.spiffe_id("planner"))] * 2
    assert denies[0]["note"] == _attribution(w, worker, "worker")


def test_worker_named_in_spawn_from_mints_a_child(delegated: tuple[World, str]) -> None:
    w, _helper = delegated
    planner = _ok(_mint(w, "planner", w.planner))
    child = _ok(_mint(w, "worker", w.worker, parent=planner["token"]))
    claims, pclaims = w.verify(child["token"]), w.verify(planner["token"])
    assert claims.sub == w.spiffe_id("worker")
    assert claims.spawn_parent == pclaims.run and claims.chain == (pclaims.run,)
    entry = w.entries()[-1]
    assert (entry["decision"], entry["reason"]) == ("allow", "ok")
    assert entry["jti"] == child["jti"] and entry["note"] == _attribution(w, planner, "planner")
    # spawn_from names the planner only: the worker's own token parents nothing.
    _refused(_mint(w, "worker", w.worker, parent=child["token"]))


def test_without_spawn_from_no_child_mints(tmp_path: Any, kind: str) -> None:
    w, helper = _world(tmp_path, kind, delegation=False)
    with running(w):
        tokens = {
            name: _ok(_mint(w, name, agent))["token"]
            for name, agent in (("planner", w.planner), ("worker", w.worker), ("stranger", helper))
        }
        for name, agent in (("planner", w.planner), ("worker", w.worker), ("stranger", helper)):
            for parent in tokens.values():
                _refused(_mint(w, name, agent, parent=parent))
        entries = w.entries()
    assert [e["reason"] for e in entries] == ["ok"] * 3 + [REFUSED] * 9
    assert all(e["jti"] is None for e in entries[3:])
