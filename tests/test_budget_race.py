"""Two verifier replicas race for one budget and cannot overshoot it.

Two real uvicorn processes (tests/_budget_worker.py) serve the same governed route
over real mTLS with the dev PKI; they share one budget database and one decision
log (SQLite files, or a fresh PostgreSQL database). 64 requests are sent at once,
split between the replicas, spread over 4 spawn trees of one tenant; a request costs
7, a tree may spend 35 (5 requests) and the tenant 70 a day (10 requests). Exactly
10 are allowed whatever the interleaving (the tenant's limit binds before the trees'
can), the 54 others are 403 ``budget_exceeded``; every decision is in the log, the
log verifies, and the table's rows add up (no tree row kept a reservation its
tenant row refused). No timing is asserted: only counts and the records.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from _budget_helpers import BACKENDS, fresh_database
from _verifier_helpers import ISSUER, Pki, key_set, log_entries, make_pki, new_signing_key
from _verifier_helpers import token_for as mint_for

from axid.audit.verify import DatabaseSource, verify_log
from mtls.sources import FileSource
from mtls.tlsconfig import client_context
from verifier.budget import read_budgets

pytestmark = pytest.mark.timeout(300)

WORKER: Final = str(Path(__file__).parent / "_budget_worker.py")
COST: Final = 7
TREES: Final = 4
REQUESTS: Final = 64
START_TIMEOUT: Final = 60.0  # a worker importing and binding, on a busy machine
WAIT: Final = 30.0


@contextmanager
def replica(settings: dict[str, Any], tmp: Path, name: str) -> Iterator[str]:
    """One _budget_worker.py process; yields its https base URL."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(settings | {"replica": name}))
    proc = subprocess.Popen(
        [sys.executable, WORKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "PORT n", or "" if the process died
        if not line.startswith("PORT "):
            _, err = proc.communicate(timeout=START_TIMEOUT)
            raise AssertionError(f"replica {name} did not start: {line!r} {err[-3000:]}")
        yield f"https://127.0.0.1:{int(line.split()[1])}"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung child
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def send_all(
    bases: list[str], ctx: ssl.SSLContext, tokens: list[str]
) -> list[tuple[str, int, dict[str, Any]]]:
    """Every request at once (each on its own connection), alternating replicas."""
    gate = asyncio.Event()

    async def one(i: int, client: httpx.AsyncClient) -> tuple[str, int, dict[str, Any]]:
        path = f"/spend/{i}"
        await gate.wait()
        answer = await client.get(path, headers={"X-Waxell-AXID": tokens[i]})
        return path, answer.status_code, answer.json()

    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    timeout = httpx.Timeout(120.0)
    async with (
        httpx.AsyncClient(base_url=bases[0], verify=ctx, limits=limits, timeout=timeout) as a,
        httpx.AsyncClient(base_url=bases[1], verify=ctx, limits=limits, timeout=timeout) as b,
    ):
        tasks = [asyncio.create_task(one(i, (a, b)[i % 2])) for i in range(REQUESTS)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("race"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_replicas_cannot_overshoot(backend: str, pki: Pki, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path) as url:
        roots = [f"root-{uuid.uuid4().hex[:8]}" for _ in range(TREES)]
        answers = race(pki, tmp_path, url, roots)

        statuses = Counter(status for _, status, _ in answers)
        assert statuses == {200: 10, 403: 54}, statuses
        denied = [body for _, status, body in answers if status == 403]
        assert {body["reason"] for body in denied} == {"budget_exceeded"}
        served_by = Counter(body["replica"] for _, status, body in answers if status == 200)
        assert set(served_by) <= {"first", "second"} and sum(served_by.values()) == 10

        # Every decision is in the log, with its answer's reason, and the log verifies.
        entries = {e["path"]: e for e in log_entries(url, "payments")}
        assert len(entries) == REQUESTS
        for path, status, _ in answers:
            assert entries[path]["reason"] == ("ok" if status == 200 else "budget_exceeded")
        assert all(e["note"].startswith("budget: ") for e in entries.values())
        report = verify_log(DatabaseSource(url, "payments"))
        assert report.ok and report.entries == REQUESTS, report.first_bad

        # The rows add up: the tenant spent exactly its limit, each tree at most its
        # own, and the trees together what the tenant did.
        spent = {(r.kind, r.name): r for r in read_budgets(url)}
        tenant = [r for (kind, _), r in spent.items() if kind == "tenant"]
        assert [(r.name, r.spent, r.limit) for r in tenant] == [("acme", 10 * COST, 10 * COST)]
        # (A tree none of whose reservations committed has no row.)
        trees = [spent[("tree", root)] for root in roots if ("tree", root) in spent]
        assert all(r.spent <= 5 * COST and r.limit == 5 * COST for r in trees)
        assert sum(r.spent for r in trees) == 10 * COST
        assert len(spent) == len(trees) + 1


def race(pki: Pki, tmp_path: Path, url: str, roots: list[str]) -> list[Any]:
    """Start both replicas, send every request at once, stop the replicas."""
    key = new_signing_key()
    (tmp_path / "jwks.json").write_text(json.dumps(key_set(key).to_jwks()))
    settings = {
        "issuer": ISSUER,
        "bundle": str(pki.dev.bundle),
        "cert": str(pki.cert("payments")),
        "key": str(pki.key("payments")),
        "jwks": str(tmp_path / "jwks.json"),
        "log_url": url,
        "log_key": str(tmp_path / "log.pem"),
        "log_name": "payments",
        "budget_url": url,
        "per_tree": 5 * COST,
        "per_tenant_daily": 10 * COST,
    }
    now = time.time()
    tokens = []
    for i in range(REQUESTS):
        root = roots[i % TREES]
        if i < TREES:  # the root run itself, then runs it spawned
            tokens.append(mint_for(pki, "planner", key, now=now, run=root, ttl=300))
        else:
            run = f"child-{i}"
            tokens.append(mint_for(pki, "planner", key, now=now, run=run, chain=[root], ttl=300))
    with ExitStack() as stack:
        # One after the other: the first creates the log key the second reuses.
        first = stack.enter_context(replica(settings, tmp_path, "first"))
        second = stack.enter_context(replica(settings, tmp_path, "second"))
        source = FileSource(pki.cert("planner"), pki.key("planner"), pki.dev.bundle)
        stack.callback(source.close)
        ctx = client_context(source, server_id=pki.dev.spiffe_id("payments"))
        return asyncio.run(send_all([first, second], ctx, tokens))
