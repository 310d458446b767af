"""Competing submissions never roll a witness back: one process, and two processes on
one state database (SQLite file; PostgreSQL when AXID_TEST_DATABASE_URL is set).

32 clients each hold one checkpoint of one growing tree (sizes 10..41) and act like
a log: submit with the old size they believe, and on 409 retry from the size the
witness names (unless it is already past theirs). Four more clients hold
checkpoints of a forked history signed with the same log key. All start at once.

What must hold afterwards (the tlog-witness race: "the stored size is updated to N
for request A, rolling back K leaves"):

- no forked checkpoint is ever cosigned; the largest checkpoint always is;
- the accepted submissions that moved the witness form ONE chain 10 -> ... -> 41:
  each old size was moved from exactly once (two accepted submissions from one old
  size is the race above);
- cosignature timestamps never decrease along that chain;
- in real time: a 200 whose request was sent after another 200 arrived is for a
  size at least as large;
- the stored state is size 41 with the main tree's root, and the witness says so
  (409 ``41``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from _pg import require_pg
from _spec_cosignature import verify_line
from _witness_helpers import (
    LogSide,
    WitnessDir,
    add_checkpoint,
    body_text,
    init_witness,
    serving_many,
    unique_origin,
    write_config,
)

from axid.witness import WitnessStore

START, END = 10, 41  # 32 sizes
FORK_AT = 5
FORK_SIZES = (12, 20, 33, END)
MAX_TRIES = 500


@dataclass
class Answer:
    client: str  # "main" or "fork"
    old: int
    size: int
    status: int
    body: bytes
    sent: float
    received: float


def _client(
    url_cycle: Iterator[str], log: LogSide, kind: str, size: int, start: threading.Barrier
) -> list[Answer]:
    """Submit ``log``'s checkpoint of ``size`` like a log would; return every answer."""
    answers: list[Answer] = []
    old = 0
    with httpx.Client(timeout=30) as client:
        start.wait()
        for _ in range(MAX_TRIES):
            body = log.body(old, size)
            sent = time.monotonic()
            r = add_checkpoint(client, next(url_cycle), body)
            answers.append(
                Answer(kind, old, size, r.status_code, r.content, sent, time.monotonic())
            )
            if r.status_code != 409:
                return answers
            latest = int(r.content)
            if latest > size:
                return answers  # the witness is past this checkpoint: nothing to do
            old = latest
    raise AssertionError(f"{kind} client of size {size} never finished")


def _run_all(urls: list[str], main: LogSide, fork: LogSide) -> list[Answer]:
    jobs = [(main, "main", s) for s in range(START, END + 1)]
    jobs += [(fork, "fork", s) for s in FORK_SIZES]
    start = threading.Barrier(len(jobs))
    results: list[list[Answer]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i: int, log: LogSide, kind: str, size: int) -> None:
        try:
            # Each client alternates between the witness processes, from a different one.
            cycle = itertools.islice(itertools.cycle(urls), i % len(urls), None)
            results[i] = _client(cycle, log, kind, size, start)
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return [a for rs in results for a in rs]


def _check(answers: list[Answer], main: LogSide, witness: WitnessDir) -> None:
    assert {a.status for a in answers} <= {200, 400, 409, 422}, answers
    ok = [a for a in answers if a.status == 200]
    assert not [a for a in ok if a.client == "fork"], "a forked checkpoint was cosigned"
    assert any(a.size == END for a in ok), "the largest checkpoint was never cosigned"
    # One chain: every accepted move left a distinct old size, and they link START..END.
    moves = [a for a in ok if a.old != a.size]
    by_old = {a.old: a for a in moves}
    assert len(by_old) == len(moves), "two accepted submissions moved from one old size"
    chain, at = [], START
    while at in by_old:
        chain.append(by_old[at])
        at = by_old[at].size
    assert at == END and len(chain) == len(moves), [(a.old, a.size) for a in moves]
    stamps = [
        verify_line(a.body.decode().splitlines()[0], body_text(main, a.size), witness.ed25519)
        for a in chain
    ]
    assert stamps == sorted(stamps)
    for a, b in itertools.product(ok, ok):
        if b.sent > a.received:
            assert b.size >= a.size, f"cosigned {b.size} after {a.size} had been answered"


def _scenario(tmp_path: Path, database: str, processes: int) -> None:
    witness = init_witness(tmp_path)
    main = LogSide(unique_origin()).grow(END)
    fork = main.fork(FORK_AT).grow(END)
    config = write_config(
        tmp_path / "witness.yaml", keys=witness.keys, database=database, logs=[main]
    )
    with serving_many(config, processes) as urls, httpx.Client(timeout=10) as client:
        assert add_checkpoint(client, urls[0], main.body(0, START)).status_code == 200
        answers = _run_all(urls, main, fork)
        _check(answers, main, witness)
        for url in urls:
            r = add_checkpoint(client, url, main.body(0, END))
            assert (r.status_code, r.content) == (409, f"{END}\n".encode())
    store = WitnessStore.open(database)
    try:
        state = store.latest(main.origin)
        assert state is not None and (state.size, state.root) == (END, main.root(END))
        assert {e.status for e in store.evidence(main.origin)} <= {409, 422}
        assert store.evidence(main.origin), "the forks' refusals were not kept"
    finally:
        store.close()


def test_one_process_sqlite(tmp_path: Path) -> None:
    _scenario(tmp_path, f"sqlite:///{tmp_path}/state.db", 1)


def test_two_processes_one_sqlite_file(tmp_path: Path) -> None:
    _scenario(tmp_path, f"sqlite:///{tmp_path}/state.db", 2)


def test_two_processes_one_postgresql(tmp_path: Path) -> None:
    _scenario(tmp_path, require_pg(), 2)
