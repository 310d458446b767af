"""Batched store work for concurrent mints (steps 8 and 9 of the minting rules)."""

from __future__ import annotations

import asyncio

from axid.issuer.store import IssuerStore, MintCheck, Revocation, RunConflict

__all__ = ["CheckOutcome", "MintChecks"]

CheckOutcome = Revocation | RunConflict | None


class MintChecks:
    """Runs the store work of concurrent mints in batches, one thread hand-off each.

    A hand-off to a worker thread (queue, wake-up, GIL hand-over, wake-up of the
    loop) costs several times the CPU of the two indexed queries a mint needs, so
    the mints that arrive while a batch runs go together in the next one
    (:meth:`IssuerStore.check_mints`, in arrival order). At most ``parallel``
    batches run at once: one for SQLite (local, microseconds a query); a few for
    PostgreSQL, whose round trips would otherwise queue behind each other. Each
    caller waits for its own outcome; a failed batch fails every caller in it.
    """

    def __init__(self, store: IssuerStore, *, parallel: int) -> None:
        self._store = store
        self._parallel = parallel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[MintCheck, asyncio.Future[CheckOutcome]]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def run(self, check: MintCheck) -> CheckOutcome:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (a test, a restarted server): the old one's state is moot.
            self._loop, self._pending, self._drains = loop, [], set()
        fut: asyncio.Future[CheckOutcome] = loop.create_future()
        self._pending.append((check, fut))
        # Count live drains only: a finished one leaves the set a little later (its
        # done-callback), and must not keep this check from being picked up.
        if sum(not task.done() for task in self._drains) < self._parallel:
            task = loop.create_task(self._drain(loop))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return await fut

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._pending and self._loop is loop:
            batch, self._pending = self._pending, []
            try:
                outcomes = await loop.run_in_executor(
                    None, self._store.check_mints, [check for check, _ in batch]
                )
            except BaseException as exc:
                # Failed: this batch fails. Cancelled (the loop is closing): what is
                # queued fails too, so nobody waits forever on a drain that is gone.
                stopped = not isinstance(exc, Exception)
                if stopped:
                    batch, self._pending = batch + self._pending, []
                err = RuntimeError("mint checks stopped") if stopped else exc
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                if stopped:
                    raise
                continue
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():  # its caller may have been cancelled meanwhile
                    fut.set_result(outcome)
