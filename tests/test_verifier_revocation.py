"""Step 6: the revocation set, its sources, and fail-closed staleness; single-use store."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from _verifier_helpers import new_signing_key, require_pg

from axid.issuer.store import IssuerStore
from axid.tokens import ActionClaims, mint, verify
from verifier.replay import ReplayGuard
from verifier.revocation import (
    DatabaseRevocationSource,
    IssuerRevocationPoller,
    RevocationSet,
    StaticRevocations,
)

CNF = "A" * 42 + "A"
NOW = 1_800_000_000


def claims(**kw: Any) -> ActionClaims:
    key = new_signing_key()
    args: dict[str, Any] = {
        "key": key,
        "iss": "https://i",
        "sub": "spiffe://example.org/agent/w",
        "aud": "payments",
        "tenant": "acme",
        "agent": "worker",
        "run": "child",
        "spawn_parent": "parent",
        "chain": ["root", "parent"],
        "scope": "payments:read",
        "cnf_x5t_s256": CNF,
        "now": NOW,
    }
    args.update(kw)
    from axid.keys import KeySet

    token = mint(**args)
    return verify(
        token, KeySet.of(key.public_key), issuer="https://i", audience="payments", now=NOW
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_revocation_set_matches_every_kind() -> None:
    c = claims()
    for kind, value, ancestor in [
        ("jti", c.jti, False),
        ("run", "child", False),
        ("run", "parent", True),
        ("run", "root", True),
        ("agent", "worker", False),
        ("tenant", "acme", False),
    ]:
        s = RevocationSet()
        s.add(kind, value)
        hit = s.match(c)
        assert hit is not None and (hit.kind, hit.value, hit.ancestor) == (kind, value, ancestor)
    s = RevocationSet()
    for kind, value in [("jti", "x"), ("run", "other"), ("agent", "planner"), ("tenant", "globex")]:
        s.add(kind, value)
    assert s.match(c) is None
    with pytest.raises(ValueError):
        s.add("sub", "x")


def test_broadest_cause_is_named() -> None:
    s = RevocationSet()
    s.add("run", "child")
    s.add("run", "root")
    hit = s.match(claims())
    assert hit is not None and hit.value == "root" and "ancestor run root" in hit.describe()


def test_static_revocations() -> None:
    static = StaticRevocations([("run", "a")])
    static.revoke("agent", "b")
    assert static.seq == 2 and ("agent", "b") in static.current()


# --------------------------------------------------------------------------- issuer table


def _db(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/issuer.db"
    return require_pg()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_database_source_reads_issuer_table(kind: str, tmp_path: Path) -> None:
    url = _db(kind, tmp_path)
    store = IssuerStore.open(url)
    tag = uuid.uuid4().hex[:8]
    try:
        clock = Clock()
        source = DatabaseRevocationSource(url, interval=0.05, max_stale=2.0, monotonic=clock)
        assert source.current() is None  # never polled: fail closed
        await source.start()
        try:
            assert source.current() is not None
            base = source.seq
            first, _ = store.revoke("run", f"r-{tag}", "test", created_by="spiffe://x/a", now_ms=1)
            store.revoke("tenant", f"t-{tag}", "test", created_by="spiffe://x/a", now_ms=1)
            assert await source.poll()
            revs = source.current()
            assert (
                revs is not None and ("run", f"r-{tag}") in revs and ("tenant", f"t-{tag}") in revs
            )
            assert source.seq >= first.seq + 1 > base
            clock.t += 3.0  # no successful poll for longer than max_stale
            assert source.current() is None
            assert await source.poll()
            assert source.current() is not None
        finally:
            await source.close()
    finally:
        store.close()


async def test_database_source_without_table_is_stale(tmp_path: Path) -> None:
    source = DatabaseRevocationSource(f"sqlite:///{tmp_path}/empty.db", interval=10, max_stale=20)
    await source.start()
    try:
        assert source.current() is None and source.last_error is not None
    finally:
        await source.close()


# --------------------------------------------------------------------------- feed parsing


def _feed(pages: list[Any]) -> tuple[httpx.AsyncClient, list[int]]:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        since = int(request.url.params["since"])
        seen.append(since)
        body = pages.pop(0) if pages else {"revocations": [], "next": since}
        if isinstance(body, httpx.Response):
            return body
        return httpx.Response(200, content=json.dumps(body).encode())

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


def _row(seq: int, kind: str = "run", value: str = "r") -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "value": f"{value}{seq}", "reason": "x", "created_at": "t"}


async def test_poller_incremental() -> None:
    client, seen = _feed(
        [
            {"revocations": [_row(1), _row(2, "agent", "a")], "next": 2},
            {"revocations": [_row(3, "jti", "j")], "next": 3},
        ]
    )
    async with client:
        poller = IssuerRevocationPoller("https://i/v1/revocations", client, interval=60)
        assert await poller.poll() and poller.seq == 2
        assert await poller.poll() and poller.seq == 3
        assert await poller.poll() and poller.seq == 3
        assert seen == [0, 2, 3]
        revs = poller.current()
        assert revs is not None and ("agent", "a2") in revs and ("jti", "j3") in revs


@pytest.mark.parametrize(
    "page",
    [
        {"revocations": [_row(2), _row(1)], "next": 2},  # not increasing
        {"revocations": [_row(1)], "next": 5},  # next is not the last seq
        {"revocations": [{"seq": 1, "kind": "sub", "value": "x"}], "next": 1},
        {"revocations": [{"seq": True, "kind": "run", "value": "x"}], "next": 1},
        {"revocations": [{"seq": 1, "kind": "run", "value": ""}], "next": 1},
        {"revocations": "no", "next": 0},
        [],
        httpx.Response(500),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, content=b"[" * 5_000_000),
    ],
)
async def test_poller_refuses_bad_pages(page: Any) -> None:
    client, _ = _feed([page])
    async with client:
        poller = IssuerRevocationPoller("https://i/v1/revocations", client, interval=60)
        assert not await poller.poll()
        assert poller.current() is None and poller.seq == 0 and poller.last_error


# --------------------------------------------------------------------------- single use


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_replay_guard_once_across_connections(kind: str, tmp_path: Path) -> None:
    url = _db(kind, tmp_path)
    guards = [ReplayGuard.open(url, service=f"svc-{i}") for i in range(2)]
    try:
        jti = uuid.uuid4().hex[:22]
        winners: list[bool] = []
        barrier = threading.Barrier(8)

        def race(i: int) -> None:
            barrier.wait()
            winners.append(guards[i % 2].claim(jti, NOW + 60, NOW))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert winners.count(True) == 1 and len(winners) == 8
        assert guards[0].used_by(jti) in ("svc-0", "svc-1")
        old = uuid.uuid4().hex[:22]
        assert guards[0].claim(old, 5, 1)
        assert guards[1].purge(before=10) >= 1
        assert guards[1].used_by(old) is None
        assert guards[1].used_by(jti) is not None
    finally:
        for g in guards:
            g.close()


def test_replay_guard_schema_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    for _ in range(2):
        ReplayGuard.open(url, service="s").close()


async def test_poller_start_close_runs_in_background() -> None:
    client, seen = _feed([{"revocations": [_row(1)], "next": 1}])
    async with client:
        poller = IssuerRevocationPoller("https://i/v1/revocations", client, interval=0.01)
        await poller.start()
        for _ in range(200):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.01)
        await poller.close()
        assert len(seen) >= 3 and poller.seq == 1


# --------------------------------------------------------------------------- catching up


async def test_poller_is_fresh_only_once_caught_up() -> None:
    """A poll that stops after max_pages full pages applies them but is not fresh."""
    rows = [_row(seq) for seq in range(1, 6)]  # 5 revocations, pages of 2
    client, seen = _feed(
        [
            {"revocations": rows[0:2], "next": 2},
            {"revocations": rows[2:4], "next": 4},
            {"revocations": rows[4:5], "next": 5},  # short: the end of the feed
        ]
    )
    async with client:
        poller = IssuerRevocationPoller(
            "https://i/v1/revocations", client, interval=60, page_size=2, max_pages=2
        )
        assert not await poller.poll()  # two full pages, more remain
        assert poller.seq == 4 and poller.current() is None
        assert poller.last_error is not None and "behind" in poller.last_error
        assert await poller.poll()  # caught up
        revs = poller.current()
        assert revs is not None and poller.seq == 5 and ("run", "r5") in revs
        assert seen == [0, 2, 4]


async def test_poller_behind_polls_again_at_once() -> None:
    """The background loop does not wait ``interval`` while it is behind the feed."""
    rows = [_row(seq) for seq in range(1, 8)]
    client, seen = _feed([{"revocations": rows[i : i + 2], "next": i + 2} for i in (0, 2, 4)])
    async with client:
        poller = IssuerRevocationPoller(
            "https://i/v1/revocations", client, interval=3600, page_size=2, max_pages=1
        )
        await poller.start()
        try:
            for _ in range(500):
                if poller.current() is not None:
                    break
                await asyncio.sleep(0.01)
            assert poller.current() is not None and poller.seq == 6
            assert seen == [0, 2, 4, 6]
        finally:
            await poller.close()


async def test_database_source_is_fresh_only_once_caught_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/issuer.db"
    store = IssuerStore.open(url)
    try:
        for i in range(3):
            store.revoke("agent", f"a{i}", "test", created_by="spiffe://x/a", now_ms=1)
        source = DatabaseRevocationSource(url, interval=60, max_stale=60, page_size=1, max_pages=2)
        try:
            assert not await source.poll() and source.current() is None and source.seq == 2
            assert await source.poll() and source.current() is not None and source.seq == 3
        finally:
            await source.close()
    finally:
        store.close()


async def test_poller_page_settings_are_checked() -> None:
    async with httpx.AsyncClient() as client:
        for bad in ({"page_size": 0}, {"page_size": 1001}, {"max_pages": 0}, {"page_size": 2.0}):
            with pytest.raises(ValueError):
                IssuerRevocationPoller("https://i/v1/revocations", client, **bad)  # type: ignore[arg-type]
