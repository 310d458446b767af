"""The spawn tree of a run, read from decision-log entries (``axid audit tree``).

Every entry names its ``run``, the run's ``spawn_parent`` and ``chain``: the run
ids from the tree's root down to the parent (``[]`` for a root run). The tree a
run belongs to is rooted at ``chain[0]`` of its entries (the run itself when
its chain is empty), and holds every run whose chain starts with that root.

The model is built from parsed entries only (:func:`~axid.audit.entry.parse_entry`
results, whichever logs they come from), never from a database's index
columns. Entries are taken in the order given; where entries disagree (a run
recorded with two different parents, which a log written by AXID never holds),
the first one read decides and the tree stays a tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

__all__ = ["RunNode", "TreeDecision", "build_tree", "find_root"]


@dataclass(frozen=True, slots=True)
class TreeDecision:
    """One recorded decision of a run, as its entry says."""

    ts: str
    method: str | None
    path: str | None
    decision: str
    reason: str
    seq: int
    log: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "method": self.method,
            "path": self.path,
            "decision": self.decision,
            "reason": self.reason,
            "seq": self.seq,
            "log": self.log,
        }


@dataclass(slots=True)
class RunNode:
    """A run of the tree: who ran it (agent slugs, workload SPIFFE IDs: the ``peer``
    of its entries, normally one of each), its decisions in time order, its children."""

    run: str
    agents: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=list)
    decisions: list[TreeDecision] = field(default_factory=list)
    children: list[RunNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "agents": list(self.agents),
            "workloads": list(self.workloads),
            "decisions": [d.to_json() for d in self.decisions],
            "children": [c.to_json() for c in self.children],
        }


def _chain(entry: Mapping[str, Any]) -> list[str]:
    chain = entry.get("chain")
    return list(chain) if isinstance(chain, list) else []


def find_root(run: str, entries: Iterable[Mapping[str, Any]]) -> str | None:
    """The root of the tree ``run`` belongs to; None when no entry names ``run``.

    An entry of ``run`` with a chain names the root (``chain[0]``); so does the
    entry of any descendant (``run`` is then in its chain). A run named only by
    entries with an empty chain is a root itself.
    """
    found = False
    for e in entries:
        chain = _chain(e)
        if run in chain:
            return chain[0]
        if e.get("run") == run:
            if chain:
                return chain[0]
            found = True
    return run if found else None


class _Builder:
    """Collects the runs and decisions of the tree rooted at ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.nodes: dict[str, RunNode] = {root: RunNode(root)}
        self.parent: dict[str, str] = {}
        self.order: list[str] = []  # runs in the order first seen (below the root)

    def node(self, run: str) -> RunNode:
        n = self.nodes.get(run)
        if n is None:
            n = self.nodes[run] = RunNode(run)
        return n

    def add(self, e: Mapping[str, Any]) -> None:
        run = e.get("run")
        chain = _chain(e)
        if not isinstance(run, str) or (chain[0] if chain else run) != self.root:
            return
        path = [*chain, run]
        for p, c in pairwise(path):
            # Only a run not yet placed gets a parent: no run moves, and no
            # cycle can form (a run not yet placed is nobody's ancestor).
            if c != self.root and c != p and c not in self.parent:
                self.node(p)
                self.node(c)
                self.parent[c] = p
                self.order.append(c)
        n = self.node(run)
        _add_unique(n.agents, e.get("agent"))
        _add_unique(n.workloads, e.get("peer"))
        n.decisions.append(
            TreeDecision(
                ts=str(e["ts"]),
                method=e.get("method"),
                path=e.get("path"),
                decision=str(e["decision"]),
                reason=str(e["reason"]),
                seq=int(e["seq"]),
                log=str(e["log"]),
            )
        )

    def finish(self) -> RunNode:
        for n in self.nodes.values():
            n.decisions.sort(key=lambda d: (d.ts, d.log, d.seq))
        for c in self.order:
            self.nodes[self.parent[c]].children.append(self.nodes[c])
        for n in self.nodes.values():
            n.children.sort(key=_child_key)
        return self.nodes[self.root]


def _add_unique(values: list[str], value: object) -> None:
    if isinstance(value, str) and value not in values:
        values.append(value)


def _child_key(n: RunNode) -> tuple[bool, str, str]:
    # Children in the order they first acted; runs with no decision read, last.
    first = n.decisions[0].ts if n.decisions else ""
    return (not n.decisions, first, n.run)


def build_tree(root: str, entries: Iterable[Mapping[str, Any]]) -> RunNode:
    """The tree rooted at ``root`` from the entries given (others are skipped):
    every run whose chain starts with ``root``, under its parent, and runs named
    only in chains too (so the shape holds when some logs were not read)."""
    b = _Builder(root)
    for e in entries:
        b.add(e)
    return b.finish()
