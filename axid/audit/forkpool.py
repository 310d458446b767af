"""Forked worker processes whose answers are only ever hints.

:class:`ForkPool` runs one function on tasks in a few forked children and
hands each answer to the task's item (``item.answered(value)``). It is the
accelerator's (:mod:`axid.audit.accelerate`): an item a worker did not answer,
because it failed, hung or died, is simply unanswered, and the caller does
the work itself. Nothing here decides anything.

``os.fork`` directly, not multiprocessing's bootstrap: the child only serves
its socket and leaves with ``os._exit``, never running this process's cleanup,
and disables the garbage collector so that nothing inherited (a database
connection, say) is finalised in it.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

__all__ = ["ForkPool", "in_order", "usable_cpus"]

_MAX_WORKERS = 8
# A worker's answer on one task takes milliseconds; past this, the worker is
# taken for hung and its tasks come back unanswered.
_WORKER_TIMEOUT = 30.0
_REAP_GRACE = 1.0  # seconds a worker has to leave once told, before SIGKILL
_CAN_FORK = sys.platform == "linux" and hasattr(os, "fork")

# A worker's function: (task, bytes sent with it or None) -> answer (picklable).
Work = Callable[[Any, "bytes | None"], Any]


class Item(Protocol):
    """What a task is submitted for: it learns its worker, and maybe an answer."""

    worker: int | None

    def answered(self, value: Any) -> None: ...


_T = TypeVar("_T", bound=Item)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ForkPool:
    """Forked workers running ``work`` on tasks; answers collected as they finish.

    Each worker holds up to ``depth`` tasks (its own and queued ones);
    ``window`` is how many items a caller keeps in flight to keep them fed.
    """

    def __init__(self, depth: int) -> None:
        self._conns: list[Connection] = []
        self._pids: list[int] = []
        self._depth = depth
        self._queues: list[deque[Item]] = []  # per worker: its items, in order
        self.window = 0
        self.broken = False

    @classmethod
    def start(cls, n: int, work: Work, *, depth: int = 1) -> ForkPool | None:
        """``n`` workers (at most ``_MAX_WORKERS``); None where this system cannot fork."""
        if not _CAN_FORK or n <= 0:
            return None
        pool = cls(depth)
        try:
            for _ in range(min(n, _MAX_WORKERS)):
                ours, theirs = multiprocessing.Pipe()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the worker (coverage does not follow forks)
                    try:
                        gc.disable()
                        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us
                        ours.close()
                        for c in pool._conns:
                            c.close()
                        _worker_loop(theirs, work)
                    finally:
                        os._exit(0)
                theirs.close()
                pool._conns.append(ours)
                pool._pids.append(pid)
                pool._queues.append(deque())
        except OSError:
            pool.close()
            return None
        pool.window = 2 * len(pool._conns) * pool._depth
        return pool

    def _free_worker(self) -> int | None:
        if self.broken:
            return None
        w = min(range(len(self._queues)), key=lambda i: len(self._queues[i]))
        return w if len(self._queues[w]) < self._depth else None

    def room(self) -> bool:
        """Whether an item can be taken in now (by a worker, or by the caller if they are gone)."""
        return self.broken or self._free_worker() is not None

    def submit(self, item: Item, task: Any, blob: bytes | None) -> None:
        """Give ``task`` (and ``blob``) to a free worker for ``item``; with none free, or
        the workers gone, the item stays unassigned (``item.worker`` None)."""
        w = self._free_worker()
        if w is None:
            return
        conn = self._conns[w]
        try:
            conn.send((task, blob is not None))
            if blob is not None:
                conn.send_bytes(blob)
        except (OSError, ValueError):
            self._break()
            return
        item.worker = w
        self._queues[w].append(item)

    def collect_some(self) -> None:
        """Wait for at least one answer (or for the workers to be given up)."""
        busy = [self._conns[w] for w, q in enumerate(self._queues) if q]
        if self.broken or not busy:
            return
        try:
            ready = multiprocessing.connection.wait(busy, _WORKER_TIMEOUT)
            if not ready:
                self._break()
                return
            for conn in ready:
                status, value = conn.recv()  # type: ignore[union-attr]
                item = self._queues[self._conns.index(conn)].popleft()  # type: ignore[arg-type]
                item.worker = None
                if status == "ok":
                    item.answered(value)
        except (EOFError, OSError, ValueError):
            self._break()

    def _break(self) -> None:
        self.broken = True
        for q in self._queues:
            for item in q:
                item.worker = None  # the caller does it, then
            q.clear()
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)  # a polite stop; closing is enough for a busy worker
            conn.close()
        deadline = time.monotonic() + _REAP_GRACE
        for pid in self._pids:
            _reap(pid, deadline)
        self._pids = []


def in_order(
    pool: ForkPool, fetch: Callable[[], _T | None], submit: Callable[[_T], None]
) -> Iterator[_T]:
    """The items ``fetch`` gives, in order, each answered by a worker where one took it.

    Keeps the workers fed: items are fetched and submitted while a worker is
    free (up to ``pool.window`` in flight), and the next in order is yielded
    once its answer is in. Items left in flight when the consumer stops are
    collected (freeing their workers) and dropped.
    """
    inflight: deque[_T] = deque()
    try:
        while True:
            while len(inflight) < pool.window and pool.room():
                item = fetch()
                if item is None:
                    break
                submit(item)  # an item no worker takes is the caller's to do
                inflight.append(item)
            if not inflight:
                return
            if inflight[0].worker is not None:
                pool.collect_some()
                continue
            yield inflight.popleft()
    finally:
        while any(item.worker is not None for item in inflight):
            pool.collect_some()


def _reap(pid: int, deadline: float) -> None:
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # our own child, stuck: it holds nothing
                os.waitpid(pid, 0)
                return
            time.sleep(0.002)
    except ChildProcessError:  # already reaped (e.g. by an asyncio child watcher)
        pass


def _worker_loop(conn: Connection, work: Work) -> None:  # pragma: no cover - in the worker
    while True:
        try:
            msg = conn.recv()
            if msg is None:
                return
            task, has_blob = msg
            blob = conn.recv_bytes() if has_blob else None
        except (EOFError, OSError):
            return
        try:
            out: tuple[str, Any] = ("ok", work(task, blob))
        except Exception:  # the parent does the task itself (and so sees a bug)
            out = ("error", None)
        try:
            conn.send(out)
        except OSError:  # the parent stopped reading (it found what it needed)
            return
