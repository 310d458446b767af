"""The decision log's asyncio group-commit appender.

Many concurrent callers ``await log.append(fields)``; one batcher task per
:class:`DecisionLog` collects their entries and closes a batch when
``max_batch`` entries are waiting, when as many are waiting as went into the
previous batch plus those that queued while it committed, or when
``max_delay`` seconds have passed since the first of them arrived. (The middle
rule is adaptive group commit: under steady load the callers of one batch are
back, with their next decisions, soon after it has committed, so waiting out
``max_delay`` would only idle the database; counting the callers that queued
meanwhile too merges such cohorts into one batch, so that a commit's fixed
cost, checkpoint signature and fsync, is paid once for all of them. A batch
that is still filling, e.g. as load ramps up or drops, waits at most
``max_delay``.)
Each caller's decision is one checked, immutable
:class:`~axid.audit.entry.DecisionFields` (a mapping becomes one when it calls
:meth:`DecisionLog.append`), so a malformed entry fails that caller alone; the
batch only completes and serialises them. The batch is committed by :meth:`LogStore.append_batch
<axid.audit.store.LogStore.append_batch>` (one transaction: entries, Merkle
nodes, signed checkpoint) on a dedicated worker thread, so the event loop
keeps accepting decisions meanwhile. Each caller gets its :class:`Receipt`
only after that transaction committed; if it failed, every caller in the
batch gets :class:`AuditUnavailable` and must deny. The appender itself keeps
running, so later batches succeed once the database is back.

With witnesses (``witnesses=[...]``, see :mod:`axid.audit.witnessing`) every
committed checkpoint is offered to them in the background. With
``witness_mode="sync"`` a committed batch's callers wait, off the batcher (the
next batches commit meanwhile), until a checkpoint of the batch's size or
larger is cosigned by ``quorum`` witnesses, and their receipts carry that
cosigned note; without one within ``witness_timeout`` they get
:class:`AuditUnavailable`. Their entries ARE committed then (recorded, not
witnessed in time): the callers deny, as for any audit failure, and the
entries get witnessed with a later checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from axid.audit.entry import DecisionFields
from axid.audit.errors import AuditError
from axid.audit.head import IntegrityFailure, read_head_file, write_head_file
from axid.audit.metrics import CommitTimes
from axid.audit.note import NoteSigner
from axid.audit.receipt import Receipt
from axid.audit.store import (
    LogKeyError,
    LogStore,
    create_schema,
    generate_log_key,
    load_log_key,
    make_engine,
    origin_for,
    validate_log_name,
)
from axid.audit.witnessing import (
    DEFAULT_WITNESS_TIMEOUT,
    WitnessConfig,
    Witnessing,
    WitnessSettings,
    WitnessUnavailable,
    witness_settings,
)

__all__ = ["AuditUnavailable", "DecisionLog", "Receipt"]

_log = logging.getLogger(__name__)


class AuditUnavailable(AuditError):
    """The decision log could not commit: callers must deny (503 ``audit_unavailable``)."""


@dataclass(slots=True)
class _Pending:
    fields: DecisionFields
    future: asyncio.Future[Receipt]
    queued_at: float


class DecisionLog:
    """A group-committing, signed decision log. Create it with :meth:`open`."""

    def __init__(
        self,
        *,
        store: LogStore,
        engine: Engine,
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_delay: float,
        vkey: str,
        head: _HeadFile | None,
        witnessing: Witnessing | None = None,
        sync_witnesses: bool = False,
    ) -> None:
        self._store = store
        self._engine = engine
        self._executor = executor
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._vkey = vkey
        self._head = head
        self._witnessing = witnessing
        self._sync_witnesses = sync_witnesses and witnessing is not None
        self._witness_waits: set[asyncio.Task[None]] = set()  # sync: batches awaiting a quorum
        self._loop = asyncio.get_running_loop()
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()  # something is pending (or we are closing)
        self._full = asyncio.Event()  # a batch's worth of entries is pending
        # Pending entries that close a batch at once: the previous batch's size
        # (adaptive group commit, see the module docstring), at most max_batch.
        self._target = max_batch
        self._closing = False
        self._closed = False
        self.commit_times = CommitTimes()  # read by axid.audit.metrics.LogCollector
        self._task = self._loop.create_task(self._run(), name=f"axid-audit-batcher:{store.log}")

    # ------------------------------------------------------------------ open / close

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        log: str,
        key: str | os.PathLike[str] | Ed25519PrivateKey,
        create_key: bool = False,
        max_batch: int = 512,
        max_delay: float = 0.002,
        lock_timeout: float = 30.0,
        head: str | os.PathLike[str] | None = None,
        head_required: bool = False,
        witnesses: Sequence[WitnessConfig | Mapping[str, object]] | None = None,
        quorum: int | None = None,
        witness_mode: str = "async",
        witness_timeout: float = DEFAULT_WITNESS_TIMEOUT,
        origin: str | None = None,
    ) -> DecisionLog:
        """Open (creating tables and the log row if needed) a decision log.

        ``key`` is the log's Ed25519 signing key or its PEM file's path (with
        ``create_key``, generated 0600 if missing); a log that exists under another
        key raises :class:`~axid.audit.store.LogKeyMismatch`. ``lock_timeout`` bounds
        each batch's wait for the database lock. ``head`` is the head file (default
        ``<key's directory>/<log>.head``; memory only for a key object and no
        ``head``): if the database does not extend it (:mod:`axid.audit.head`), or
        it is missing and ``head_required``, the log opens but every append raises
        :class:`AuditUnavailable`. ``witnesses`` (``{"url", "vkey"}`` mappings or
        :class:`~axid.audit.witnessing.WitnessConfig`), ``quorum``, ``witness_mode``
        (``"async"``, or ``"sync"``: see the module docstring) and ``witness_timeout``
        (seconds) configure witnessing; a bad setting raises
        :class:`~axid.audit.witnessing.WitnessConfigError` (a ``ValueError``).
        ``origin`` is the checkpoint origin and key name (default ``axid/<log>``;
        invalid: :class:`~axid.audit.store.LogNameError`); a log stored under
        another origin raises :class:`~axid.audit.store.LogKeyMismatch`.
        """
        settings = _checked_arguments(
            log, max_batch, max_delay, witnesses, quorum, witness_mode, witness_timeout
        )
        origin = origin_for(log, origin)
        # One thread: batches are serial anyway, and SQLite connections stay put.
        res = _Opening(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"axid-audit-{log}"))
        try:
            engine, store, vkey, head_file = await res.open(
                url, (log, origin), key, create_key, lock_timeout, head, head_required, settings
            )
            return cls(
                store=store,
                engine=engine,
                executor=res.executor,
                max_batch=max_batch,
                max_delay=float(max_delay),
                vkey=vkey,
                head=head_file,
                witnessing=res.witnessing,
                sync_witnesses=settings.mode == "sync",
            )
        except BaseException:
            await res.release()
            raise

    async def close(self) -> None:
        """Commit what is pending, stop the batcher and release the database."""
        self._closing = True
        self._wakeup.set()
        self._full.set()
        if not self._task.done():
            # asyncio.wait: cancelling close() must not cancel an in-flight commit.
            await asyncio.wait({self._task})
        if self._closed:
            return
        self._closed = True
        if not self._task.cancelled() and self._task.exception() is not None:
            _log.error(
                "decision log %s: batcher failed", self._store.log, exc_info=self._task.exception()
            )
        try:
            if self._witness_waits:
                # Each waits at most witness_timeout; asyncio.wait: see above.
                await asyncio.wait(set(self._witness_waits))
            if self._witnessing is not None:
                await self._witnessing.close()
            if self._head is not None:
                await self._head.flush()
            await self._loop.run_in_executor(self._executor, self._engine.dispose)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> DecisionLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ properties

    @property
    def vkey(self) -> str:
        """The log's verifier key, ``axid/<log>+<keyid>+<base64>``."""
        return self._vkey

    @property
    def origin(self) -> str:
        return self._store.origin

    @property
    def store(self) -> LogStore:
        return self._store

    @property
    def name(self) -> str:
        """The log's name."""
        return self._store.log

    @property
    def integrity_failures(self) -> int:
        """Integrity failures seen (0 or 1: the first one stops every append)."""
        return self._store.integrity_failures

    @property
    def witness_refusals(self) -> dict[str, int]:
        """Refusals per witness name since opening (empty without witnesses)."""
        return {} if self._witnessing is None else self._witnessing.refusals

    @property
    def witness_lag(self) -> dict[str, int]:
        """Per witness name, this log's size minus the size of the latest checkpoint
        it cosigned (empty without witnesses)."""
        return {} if self._witnessing is None else self._witnessing.lag

    # ------------------------------------------------------------------ append

    async def append(self, fields: DecisionFields | Mapping[str, object]) -> Receipt:
        """Record one decision; return once its batch is committed and checkpointed.

        ``fields`` is a :class:`~axid.audit.entry.DecisionFields`, or a mapping
        of exactly the entry's field names (for callers outside AXID), which
        becomes one at once. Raises :class:`~axid.audit.entry.EntryError` (this
        caller only) for a malformed mapping, and :class:`AuditUnavailable` when the batch could
        not be committed or the log is closed, or (``witness_mode="sync"``)
        when the committed batch was not cosigned by a quorum of witnesses
        within ``witness_timeout``: the entry is recorded then, but the caller
        must deny all the same.
        """
        if self._closing:
            raise AuditUnavailable("decision log is closed")
        # Checked once, when the DecisionFields is made (here for a mapping): a
        # malformed entry fails this caller only, and the commit batch just
        # completes and serialises it. It is immutable, so what was checked is
        # what gets written, whatever the caller does to its mapping meanwhile.
        own = fields if type(fields) is DecisionFields else DecisionFields.from_mapping(fields)

        fut: asyncio.Future[Receipt] = self._loop.create_future()
        self._pending.append(_Pending(own, fut, self._loop.time()))
        self._wakeup.set()
        if len(self._pending) >= self._target:
            self._full.set()
        return await fut

    # ------------------------------------------------------------------ batcher

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    # No await between the check and the wait: no lost wakeup.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if len(self._pending) < self._target and not self._closing:
                    delay = self._pending[0].queued_at + self._max_delay - self._loop.time()
                    if delay > 0:
                        self._full.clear()
                        try:
                            async with asyncio.timeout(delay):
                                await self._full.wait()
                        except TimeoutError:
                            pass
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._target = len(batch)
                self._full.clear()
                if len(self._pending) >= self._target:
                    self._full.set()
                # A caller that was cancelled before its batch formed made no decision.
                batch = [p for p in batch if not p.future.done()]
                if batch:
                    await self._commit(batch)
                    # Callers that queued while this batch committed are the next
                    # cohort; this one's callers come back soon after. Aiming at
                    # both merges cohorts into one batch (bounded by max_delay):
                    # the commit's fixed cost is paid once for both.
                    self._target = min(self._max_batch, len(batch) + len(self._pending))
        finally:
            # Never leave a caller waiting forever, whatever stopped the batcher.
            self._closing = True
            for p in self._pending:
                _fail(p.future, AuditUnavailable("decision log stopped"))
            self._pending.clear()

    async def _commit(self, batch: list[_Pending]) -> None:
        items = [p.fields for p in batch]
        started = time.perf_counter()
        try:
            results = await self._loop.run_in_executor(
                self._executor, self._store.append_batch, items
            )
        except IntegrityFailure as e:
            for p in batch:
                err = AuditUnavailable(f"decision log integrity check failed: {e.check}")
                err.__cause__ = e
                _fail(p.future, err)
            return
        except Exception as e:
            # Whole batch failed; nothing of it is reported as committed.
            # Type only: driver messages can quote the entries' values.
            _log.warning(
                "decision log %s: batch of %d entries failed: %s",
                self._store.log,
                len(batch),
                type(e).__name__,
            )
            for p in batch:
                err = AuditUnavailable("decision log could not commit the entry")
                err.__cause__ = e
                _fail(p.future, err)
            return
        except BaseException:
            for p in batch:
                _fail(p.future, AuditUnavailable("decision log stopped"))
            raise
        self.commit_times.observe(time.perf_counter() - started)
        note = results[-1].checkpoint
        if self._witnessing is not None:
            self._witnessing.offer(note)
        if self._sync_witnesses:
            task = self._loop.create_task(self._deliver_witnessed(batch, results))
            self._witness_waits.add(task)
            task.add_done_callback(self._witness_waits.discard)
        else:
            for p, receipt in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(receipt)
        if self._head is not None:
            self._head.offer(note)

    async def _deliver_witnessed(self, batch: list[_Pending], results: list[Receipt]) -> None:
        """Sync mode: give a committed batch's callers their receipts once a
        checkpoint covering it is cosigned by the quorum, else AuditUnavailable."""
        assert self._witnessing is not None
        size = results[-1].seq + 1  # the batch's checkpoint size
        try:
            cosigned = await self._witnessing.wait(size)
        except WitnessUnavailable as e:
            _log.warning(
                "decision log %s: batch of %d entries committed at size %d but not "
                "witnessed in time (%s): its callers are refused",
                self._store.log,
                len(batch),
                size,
                e,
            )
            for p in batch:
                err = AuditUnavailable("decision recorded but not witnessed in time")
                err.__cause__ = e
                _fail(p.future, err)
            return
        except BaseException:
            # Cancelled (or anything else): nobody is left waiting.
            for p in batch:
                _fail(p.future, AuditUnavailable("decision log stopped"))
            raise
        for p, receipt in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(dataclasses.replace(receipt, checkpoint=cosigned))


@dataclass(slots=True)
class _Opening:
    """What :meth:`DecisionLog.open` acquires, in order; released if opening fails."""

    executor: ThreadPoolExecutor
    engine: Engine | None = None
    witnessing: Witnessing | None = None

    async def open(
        self,
        url: str,
        names: tuple[str, str],
        key: str | os.PathLike[str] | Ed25519PrivateKey,
        create_key: bool,
        lock_timeout: float,
        head: str | os.PathLike[str] | None,
        head_required: bool,
        settings: WitnessSettings,
    ) -> tuple[Engine, LogStore, str, _HeadFile | None]:
        """The key, the database (schema, log row, authenticated head) and the
        witnesses: the engine, the store, the log's vkey and its head file.
        ``names``: the log's name and its (checked) origin."""
        log, origin = names
        loop = asyncio.get_running_loop()
        executor = self.executor
        if isinstance(key, Ed25519PrivateKey):
            private_key = key
        else:
            private_key = await loop.run_in_executor(executor, _load_key, key, create_key)
        signer = NoteSigner(origin, private_key)
        vkey = signer.vkey()
        try:
            self.engine = engine = await loop.run_in_executor(
                executor, lambda: make_engine(url, lock_timeout=lock_timeout)
            )
            store = LogStore(engine, log, signer=signer, origin=origin)
            await loop.run_in_executor(executor, _setup, engine, store, origin, vkey)
            head_file = _HeadFile.for_log(head, key, log)
            await loop.run_in_executor(executor, _authenticate, store, head_file, head_required)
            if settings.witnesses:
                # After an integrity failure nothing the database holds is offered.
                self.witnessing = await Witnessing.start(
                    store, settings, signer.verifier(), offer=store.integrity_failures == 0
                )
        except (SQLAlchemyError, OSError) as e:
            raise AuditUnavailable(f"decision log {log!r}: database unavailable") from e
        return engine, store, vkey, head_file

    async def release(self) -> None:
        if self.witnessing is not None:
            await self.witnessing.close()
        if self.engine is not None:
            self.engine.dispose()
        self.executor.shutdown(wait=False)


def _fail(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


def _checked_arguments(
    log: str,
    max_batch: object,
    max_delay: object,
    witnesses: Sequence[WitnessConfig | Mapping[str, object]] | None,
    quorum: int | None,
    witness_mode: str,
    witness_timeout: float,
) -> WitnessSettings:
    """:meth:`DecisionLog.open`'s arguments checked (``ValueError``), before it
    acquires anything; the witnessing settings."""
    validate_log_name(log)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError("max_batch must be an int >= 1")
    if (
        not isinstance(max_delay, int | float)
        or isinstance(max_delay, bool)
        or not 0 <= max_delay <= 60
    ):
        raise ValueError("max_delay must be between 0 and 60 seconds")
    return witness_settings(witnesses, quorum, witness_mode, witness_timeout)


def _load_key(path: str | os.PathLike[str], create: bool) -> Ed25519PrivateKey:
    if create and not os.path.lexists(path):
        try:
            return generate_log_key(path)
        except LogKeyError:
            if not os.path.lexists(path):
                raise
            # Another process published the key first (atomically): use that one.
    return load_log_key(path)


def _setup(engine: Engine, store: LogStore, origin: str, vkey: str) -> None:
    create_schema(engine)
    store.ensure_log(origin, vkey)


def _authenticate(store: LogStore, head: _HeadFile | None, required: bool) -> None:
    """Prove the database extends the head file; a failure is logged and kept by the store."""
    try:
        note = None if head is None else read_head_file(head.path)
    except IntegrityFailure as e:
        store.refuse(e)
        return
    try:
        if note is None and head is not None:
            _log.warning(
                "decision log %s: no head file at %s: trusting the database's latest "
                "checkpoint after checking it (first use)",
                store.log,
                head.path,
            )
        latest = store.authenticate(note, required=required and head is not None)
    except IntegrityFailure:
        return  # logged once by the store; every append now raises
    if head is not None and latest is not None and latest != note:
        write_head_file(head.path, latest)


class _HeadFile:
    """Writes the head file after commits, off the callers' path, newest note last.

    Callers get their receipts as soon as the database committed; the file
    follows (a crash in between leaves the database one batch ahead of the
    file: consistent, so accepted on restart). Writes coalesce: while one is
    under way, only the newest note offered meanwhile is written next.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axid-audit-head")
        self._latest: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_log(
        cls,
        head: str | os.PathLike[str] | None,
        key: str | os.PathLike[str] | Ed25519PrivateKey,
        log: str,
    ) -> _HeadFile | None:
        if head is not None:
            return cls(Path(head))
        if isinstance(key, Ed25519PrivateKey):
            return None
        return cls(Path(key).parent / f"{log}.head")

    def offer(self, note: bytes) -> None:
        self._latest = note
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while self._latest is not None:
            note, self._latest = self._latest, None
            try:
                await loop.run_in_executor(self._executor, write_head_file, self.path, note)
            except OSError as e:
                # The database stays the running writer's truth (its in-memory
                # head); the file is retried with the next commit.
                _log.warning("decision log head file %s not written: %s", self.path, e)

    async def flush(self) -> None:
        if self._task is not None:
            await asyncio.wait({self._task})
        self._executor.shutdown(wait=False)
