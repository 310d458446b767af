"""Witnessing: the log's side of C2SP ``tlog-witness`` (DESIGN.md, "Witnesses").

After each commit the :class:`~axid.audit.log.DecisionLog` offers its new
checkpoint to :class:`Witnessing`, which submits it to every configured
witness (``POST <url>/add-checkpoint``: ``old M``, the RFC 9162 consistency
proof from M, an empty line, the log's signed note), verifies every returned
cosignature against that witness's key, and stores the good lines beside the
checkpoint (:meth:`LogStore.add_cosignatures
<axid.audit.store.LogStore.add_cosignatures>`; exports carry them).

Witnesses and submissions:

- A witness is a key name with its submission prefix; several keys of one
  witness (e.g. Ed25519 and ML-DSA-44) are several config entries with the
  same name and URL, submitted to once and counted once.
- One task per witness. It submits the *target* checkpoint, which moves to
  the newest committed one only once the current target is cosigned by
  ``quorum`` witnesses (or every witness is done with it: cosigned, refused,
  or backing off). So submissions coalesce (batches committed while one is in
  flight are covered by the next, newest, checkpoint) and, under steady load,
  witnesses still cosign the *same* checkpoints, which a quorum needs.
- The old size sent is the witness's size as far as this process knows it:
  at start the largest size it cosigned in the database, then what it
  answered. A 409 (``text/x.tlog.size``, ``<size>\\n``) tells it the witness's
  size; the checkpoint is then resubmitted with the proof from there (a size
  beyond the submitted checkpoint: the database's newest checkpoint is
  submitted, if it is that large).

Failure cases, per witness, never blocking the log:

- network error, timeout (``witness_timeout`` per request), 408, 429 or 5xx:
  a WARNING (then at most one a minute while it lasts), retried with
  exponential backoff up to 30 s, in sync mode up to ``witness_timeout / 2``
  (not a refusal);
- a refusal (any other answer; a 409 it cannot resync from, e.g. a size larger
  than the log's, which means a rollback, a fork or a wrong witness; a 200
  without a valid cosignature by the configured key; a line claiming that key
  that does not verify, which is dropped): one ERROR line, counted in
  :attr:`Witnessing.refusals` (``axid_log_witness_refusals_total``). The
  refused target is not resubmitted; the next commit's checkpoint is;
- cosignatures that cannot be stored (database down): WARNING, retried like
  a network error.

``sync`` mode (:meth:`Witnessing.wait`): a committed batch waits for a
checkpoint of its size *or larger* cosigned by ``quorum`` distinct witnesses
(later checkpoints also commit its entries; insisting on each batch's own one
would serialise batches behind witness round trips), and its receipts carry
that checkpoint with the cosignatures appended. Without one within
``witness_timeout`` the wait fails (:class:`WitnessUnavailable`); the batch's
entries stay committed, only not witnessed in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from sqlalchemy.exc import SQLAlchemyError

from axid.audit.cosignature import WitnessKey
from axid.audit.errors import AuditError
from axid.audit.note import Checkpoint, NoteError, NoteVerifier, open_checkpoint
from axid.audit.store import LogStore, StoreError, consistency_text, cosignature_key
from axid.audit.witness_answers import (
    Refused,
    Unreachable,
    check_cosignatures,
    first_line,
    parse_size,
)

# The settings live in axid.audit.witness_config; importable from here as before.
from axid.audit.witness_config import (
    DEFAULT_WITNESS_TIMEOUT,
    MAX_WITNESS_KEYS,
    WitnessConfig,
    WitnessConfigError,
    WitnessSettings,
    witness_settings,
)

__all__ = [
    "DEFAULT_WITNESS_TIMEOUT",
    "MAX_WITNESS_KEYS",
    "WitnessConfig",
    "WitnessConfigError",
    "WitnessSettings",
    "WitnessUnavailable",
    "Witnessing",
    "witness_settings",
]

PATH: Final = "/add-checkpoint"
_MAX_RESPONSE: Final = 256 * 1024  # 32 ML-DSA-44 cosignature lines are ~110 KB
_MAX_RESYNCS: Final = 3
_BACKOFF_MIN: Final = 0.2
_BACKOFF_MAX: Final = 30.0
_WARN_EVERY: Final = 60.0
_log = logging.getLogger(__name__)


class WitnessUnavailable(AuditError):
    """No checkpoint covering the batch was cosigned by a quorum in time (sync mode)."""


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class _Cp:
    """A checkpoint of this log: its size, signed note and parsed body."""

    size: int
    note: bytes
    checkpoint: Checkpoint


@dataclass(slots=True)
class _Witness:
    name: str
    endpoint: str
    keys: tuple[WitnessKey, ...]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    known: int = 0  # the witness's latest size as far as we know: the old size we send
    cosigned: int = 0  # the largest size with its cosignature stored
    refusals: int = 0
    refused_at: int = -1  # the size of the last target it refused
    retry_at: float = 0.0  # loop time: no attempt before (backoff after network errors)
    backoff: float = 0.0
    warn_after: float = 0.0  # loop time: unavailability is logged at WARNING again after
    busy: bool = False


@dataclass(slots=True)
class _Cosigned:
    """The stored cosignature lines on one checkpoint, by witness name."""

    cp: _Cp
    lines: dict[str, list[bytes]] = field(default_factory=dict)

    def note(self) -> bytes:
        lines = sorted((ln for group in self.lines.values() for ln in group), key=cosignature_key)
        return self.cp.note + b"".join(lines)


def _group(witnesses: Sequence[WitnessConfig]) -> list[_Witness]:
    by_name: dict[str, _Witness] = {}
    for w in witnesses:
        got = by_name.get(w.name)
        if got is None:
            by_name[w.name] = _Witness(w.name, w.url + PATH, (w.key,))
        else:
            got.keys = (*got.keys, w.key)
    return list(by_name.values())


# --------------------------------------------------------------------------- witnessing


class Witnessing:
    """Submits a log's checkpoints to its witnesses and keeps their cosignatures.

    Create it with :meth:`start` inside the event loop; :meth:`offer` each new
    checkpoint note; :meth:`close` when done.
    """

    def __init__(self, store: LogStore, settings: WitnessSettings, verifier: NoteVerifier) -> None:
        if not settings.witnesses:
            raise ValueError("witnessing needs at least one witness")
        self._store = store
        self._settings = settings
        self._verifier = verifier
        self._witnesses = _group(settings.witnesses)
        self._loop = asyncio.get_running_loop()
        # Its own thread: proofs and cosignature writes never queue behind commits.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"axid-witness-{store.log}"
        )
        n = len(self._witnesses)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout),
            limits=httpx.Limits(max_connections=2 * n, max_keepalive_connections=n),
            follow_redirects=False,
            headers={"user-agent": "axid-log"},
        )
        self._newest: _Cp | None = None
        self._target: _Cp | None = None
        self._cosigned: dict[int, _Cosigned] = {}
        self._waiters: list[tuple[int, asyncio.Future[bytes]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls, store: LogStore, settings: WitnessSettings, verifier: NoteVerifier, *, offer: bool
    ) -> Witnessing:
        """Read what the witnesses cosigned so far and start submitting.

        With ``offer`` the database's latest checkpoint is offered at once, so
        witnesses that lag (e.g. after a restart) catch up without a commit.
        """
        self = cls(store, settings, verifier)
        try:
            sizes = await self._db(store.cosigned_sizes)
            latest = await self._db(store.latest_checkpoint) if offer else None
        except BaseException:
            await self.close()
            raise
        for w in self._witnesses:
            w.cosigned = max(sizes.get((k.name, k.key_id.hex()), 0) for k in w.keys)
            w.known = w.cosigned
            self._tasks.append(
                self._loop.create_task(self._run(w), name=f"axid-witness:{store.log}:{w.name}")
            )
        if latest is not None:
            self.offer(latest)
        return self

    async def close(self) -> None:
        """Stop submitting (in-flight submissions are abandoned; the next process
        submits the latest checkpoint on start) and fail every waiter."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(WitnessUnavailable("witnessing stopped"))
        try:
            await self._client.aclose()
        finally:
            await asyncio.to_thread(self._executor.shutdown, True)

    # ------------------------------------------------------------------ metrics

    @property
    def refusals(self) -> dict[str, int]:
        """Refusals per witness name (``axid_log_witness_refusals_total``)."""
        return {w.name: w.refusals for w in self._witnesses}

    @property
    def lag(self) -> dict[str, int]:
        """Entries per witness name not yet covered by its stored cosignature
        (``axid_log_witness_lag_entries``)."""
        size = 0 if self._newest is None else self._newest.size
        return {w.name: max(0, size - w.cosigned) for w in self._witnesses}

    # ------------------------------------------------------------------ the log's side

    def offer(self, note: bytes) -> None:
        """A newly committed checkpoint note of this log (the log's own signature only)."""
        try:
            cp = self._parse(note)
        except NoteError as e:  # pragma: no cover - the log signed it a moment ago
            _log.error("decision log %s: checkpoint not offered to witnesses: %s", self.log, e)
            return
        if self._newest is None or cp.size > self._newest.size:
            self._newest = cp
        self._advance()

    async def wait(self, size: int) -> bytes:
        """The cosigned note of a checkpoint of ``size`` or larger that ``quorum``
        witnesses cosigned; :class:`WitnessUnavailable` after ``timeout`` seconds."""
        got = self._quorum_note(size)
        if got is not None:
            return got
        fut: asyncio.Future[bytes] = self._loop.create_future()
        waiter = (size, fut)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._settings.timeout):
                return await fut
        except TimeoutError:
            raise WitnessUnavailable(
                f"no checkpoint of size >= {size} cosigned by {self._settings.quorum} "
                f"witness(es) within {self._settings.timeout:g} s"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    @property
    def log(self) -> str:
        return self._store.log

    def _parse(self, note: bytes) -> _Cp:
        cp = open_checkpoint(note, [self._verifier], origin=self._store.origin)
        return _Cp(cp.size, note, cp)

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ targets

    def _advance(self) -> None:
        """Move the target to the newest checkpoint once the current one is settled."""
        new, target = self._newest, self._target
        if new is None or (target is not None and target.size >= new.size):
            return
        if target is not None and not self._settled(target):
            return
        self._target = new
        self._prune()
        for w in self._witnesses:
            w.wake.set()

    def _settled(self, t: _Cp) -> bool:
        cosigned = sum(1 for w in self._witnesses if w.cosigned >= t.size)
        if cosigned >= self._settings.quorum:
            return True
        now = self._loop.time()
        return all(
            w.cosigned >= t.size or w.refused_at >= t.size or (not w.busy and w.retry_at > now)
            for w in self._witnesses
        )

    async def _run(self, w: _Witness) -> None:
        while True:
            t = self._target
            if t is None or w.cosigned >= t.size or w.refused_at >= t.size:
                w.wake.clear()
                await w.wake.wait()
                continue
            delay = w.retry_at - self._loop.time()
            if delay > 0:
                w.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await w.wake.wait()
                continue
            w.busy = True
            try:
                await self._attempt(w, t)
            except Exception:  # never let one witness's surprise stop its task
                _log.exception("decision log %s: witness %s: unexpected error", self.log, w.name)
                self._unreachable(w, "unexpected error")
            finally:
                w.busy = False
            self._advance()

    # ------------------------------------------------------------------ one submission

    async def _attempt(self, w: _Witness, target: _Cp) -> None:
        try:
            cp, lines, problem = await self._exchange(w, target)
        except Refused as e:
            self._refused(w, target, str(e))
            return
        except (Unreachable, httpx.HTTPError, TimeoutError, OSError) as e:
            self._unreachable(w, str(e) or type(e).__name__)
            return
        except (SQLAlchemyError, StoreError) as e:
            self._unreachable(w, f"the log's database: {type(e).__name__}")
            return
        if problem is not None:
            self._refused(w, cp, problem)
        if not lines:
            return
        try:
            await self._db(self._store.add_cosignatures, cp.size, lines)
        except (SQLAlchemyError, StoreError) as e:
            self._unreachable(w, f"its cosignatures not stored: {type(e).__name__}")
            return
        w.backoff, w.retry_at, w.warn_after = 0.0, 0.0, 0.0
        w.cosigned = max(w.cosigned, cp.size)
        self._record(w, cp, lines)

    async def _exchange(self, w: _Witness, target: _Cp) -> tuple[_Cp, list[bytes], str | None]:
        """Submit ``target`` (resyncing on 409); return the checkpoint cosigned,
        the good lines and what was wrong with the others."""
        cp, old = target, w.known
        for _ in range(_MAX_RESYNCS + 1):
            if old > cp.size:
                cp = await self._at_least(old)
            proof = await self._db(self._store.consistency_proof, old, cp.size)
            body = consistency_text(old, proof, cp.note).encode("utf-8")
            status, ctype, data = await self._post(w, body)
            if status == 200:
                w.known = cp.size
                lines, problem = check_cosignatures(data, cp.checkpoint, w.keys)
                return cp, lines, problem
            if status == 409:
                size = parse_size(ctype, data)
                if size == old:
                    raise Refused(f"409 for the old size {old} it was sent (another root?)")
                w.known = old = size
                continue
            if status in (408, 429) or status >= 500:
                raise Unreachable(f"HTTP {status}")
            raise Refused(f"HTTP {status}: {first_line(data)}")
        raise Refused(f"kept answering 409 ({_MAX_RESYNCS} resyncs)")

    async def _at_least(self, size: int) -> _Cp:
        """The database's latest checkpoint, if it is at least ``size``."""
        note = await self._db(self._store.latest_checkpoint)
        try:
            cp = None if note is None else self._parse(note)
        except NoteError as e:
            raise Refused(f"it is at size {size}; the log's latest checkpoint: {e}") from None
        if cp is None or cp.size < size:
            have = 0 if cp is None else cp.size
            raise Refused(
                f"it has cosigned size {size}, larger than the log's {have}: the log was "
                "rolled back or forked, or the witness is wrong"
            )
        if self._newest is None or cp.size > self._newest.size:
            self._newest = cp
        return cp

    async def _post(self, w: _Witness, body: bytes) -> tuple[int, str, bytes]:
        async with asyncio.timeout(self._settings.timeout):
            async with self._client.stream("POST", w.endpoint, content=body) as resp:
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > _MAX_RESPONSE:
                        raise Refused(f"answer larger than {_MAX_RESPONSE} bytes")
                return resp.status_code, resp.headers.get("content-type", ""), bytes(data)

    # ------------------------------------------------------------------ outcomes

    def _refused(self, w: _Witness, cp: _Cp, reason: str) -> None:
        w.refusals += 1
        w.refused_at = max(w.refused_at, cp.size)
        _log.error(
            "decision log %s: witness %s (%s) refused checkpoint %d: %s",
            self.log,
            w.name,
            w.endpoint,
            cp.size,
            reason,
        )

    def _unreachable(self, w: _Witness, reason: str) -> None:
        # Sync: retried at least twice within a batch's wait, so that a witness
        # that is back is asked again before the next batches time out.
        cap = self._settings.timeout / 2 if self._settings.mode == "sync" else _BACKOFF_MAX
        w.backoff = min(max(cap, _BACKOFF_MIN), max(_BACKOFF_MIN, 2 * w.backoff))
        now = self._loop.time()
        w.retry_at = now + w.backoff
        # One WARNING when it becomes unavailable, then one a minute while it stays so.
        level = logging.WARNING if now >= w.warn_after else logging.DEBUG
        if level == logging.WARNING:
            w.warn_after = now + _WARN_EVERY
        _log.log(
            level,
            "decision log %s: witness %s (%s) unavailable: %s; retrying in %.1f s",
            self.log,
            w.name,
            w.endpoint,
            reason,
            w.backoff,
        )

    def _record(self, w: _Witness, cp: _Cp, lines: list[bytes]) -> None:
        got = self._cosigned.get(cp.size)
        if got is None:
            got = self._cosigned[cp.size] = _Cosigned(cp)
        # One line per key, the first kept (as the database does): a receipt
        # carries exactly the stored lines.
        have = {cosignature_key(ln) for ln in got.lines.get(w.name, [])}
        new = [ln for ln in lines if cosignature_key(ln) not in have]
        got.lines[w.name] = got.lines.get(w.name, []) + new
        if len(got.lines) < self._settings.quorum:
            return
        note = got.note()
        for size, fut in self._waiters:
            if size <= cp.size and not fut.done():
                fut.set_result(note)

    def _quorum_note(self, size: int) -> bytes | None:
        quorum = self._settings.quorum
        for s in sorted(self._cosigned):
            got = self._cosigned[s]
            if s >= size and quorum >= 1 and len(got.lines) >= quorum:
                return got.note()
        return None

    def _prune(self) -> None:
        """Forget cosignatures no waiter and no current target can use."""
        keep = min(
            [self._target.size if self._target is not None else 0] + [s for s, _ in self._waiters]
        )
        for s in [s for s in self._cosigned if s < keep]:
            del self._cosigned[s]
