"""Offline verification of a decision log: every byte, link, signature and root.

:func:`verify_log` makes ONE streaming pass over a :class:`LogSource` (an export
bundle directory or the database) and checks, in order of the log:

- each entry parses strictly (canonical RFC 8785, exact field set);
- its ``seq`` field equals its position and the seq it is stored under (so a
  gap, a duplicate, a swap or an insertion shows), its ``log`` field is the
  log's name, and a stored leaf hash (database) equals the recomputed one;
- (database) the row's index columns (:data:`INDEX_COLUMNS`, the copies
  ``axid audit show`` filters on) hold exactly what the entry says;
- its ``prev`` is the leaf hash of the entry before it (the hash chain);
- every checkpoint: signed by the log key, right origin, right size, and its
  root equals the root recomputed from the entries (which also makes successive
  checkpoints consistent); no checkpoint beyond the last entry, no entry after
  the last checkpoint (an unsigned tail);
- an auditor's *trusted* checkpoint (kept from an earlier run): its size must
  not exceed the log (else the log was truncated or rolled back) and its root
  must equal the recomputed root at its size (else the log forked);
- with a witness quorum (:class:`~axid.audit.quorum.WitnessPolicy`): every
  cosignature on every checkpoint that claims a given witness key must verify
  (else the note was altered: a finding), and some checkpoint that verified
  (so one of the log's own, consistent with all the others) must carry
  cosignatures by K distinct witnesses, with at most N entries after the
  newest such one (else ``witness_failure`` says why; not tampering).

Memory is O(log n) (a compact Merkle range) plus the chunks at hand.
The report names the FIRST bad seq. A broken chain link between two entries
is attributed with one entry of look-ahead: if entry ``k`` was altered, its
hash no longer matches ``prev`` of ``k + 1`` while ``k`` itself still links to
``k - 1``; if ``k``'s own ``prev`` was altered, both of its links break.

Speed: entries are checked a chunk at a time (:func:`~axid.audit.entry.entries_clean`
proves a whole chunk canonical and valid with one regular expression per
entry; the chain links of the chunk are compared at once; its Merkle subtrees
are hashed level by level; its index columns are found in the entry bytes),
and a chunk with anything off is gone through entry by entry by the reference
code, which alone makes findings: the report is the same either way. On Linux
with several CPUs, forked workers check chunks in parallel (with a database,
each reads its chunks itself).

This module imports neither FastAPI nor the verifier: an auditor needs only it,
the pure modules and (for :class:`DatabaseSource`) the storage layer.
"""

from __future__ import annotations

import binascii
import contextlib
import gc
import hashlib
import hmac
import multiprocessing
import os
import re
import signal
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain, islice, pairwise
from json.encoder import encode_basestring as _json_str  # the encoder entries are built with
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from axid.audit.cosignature import CosignatureError, WitnessKey
from axid.audit.entry import (
    MAX_ENTRY_SIZE,
    ZERO_HASH_HEX,
    EntryError,
    entries_clean,
    format_ts,
    parse_entry,
    parse_ts,
)
from axid.audit.merkle import HASH_SIZE, CompactRange, leaf_hash
from axid.audit.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteVerifier,
    open_checkpoint,
)
from axid.audit.quorum import WitnessPolicy

__all__ = [
    "INDEX_COLUMNS",
    "DatabaseSource",
    "ExportDirSource",
    "Finding",
    "LogSource",
    "SourceFormatError",
    "VerifyReport",
    "VerifyUsageError",
    "index_disagreements",
    "load_vkey_arg",
    "load_witness_arg",
    "verify_log",
]

_ORIGIN_PREFIX = "axid/"
# The copies of entry fields a database row keeps for filtering (``axid audit
# show``), in the order a :class:`DatabaseSource` row carries them after
# ``(seq, data, leaf_hash)``. Verification checks each against the entry bytes.
INDEX_COLUMNS: tuple[str, ...] = ("decision", "reason", "tenant", "agent", "run", "ts")
_SIZE_NAME_RE = re.compile(r"0|[1-9][0-9]*")
_PROGRESS_EVERY = 1024
# After the first finding, read this many more entries: enough to attribute a
# broken chain link and to let an entry-level finding explain a root mismatch.
_WINDOW = 2
_MAX_VKEY_FILE = 4096

# The fast path checks entries a chunk at a time (entries_clean, the leaf
# hashes, the chain links, the chunk's Merkle subtrees) and goes entry by
# entry, through the reference code above, for any chunk where anything is
# off: findings come from that code alone. A power of two, so that every
# chunk starts at a multiple of its size and its subtrees are tree nodes.
_CHUNK = 2048
_ZERO32 = bytes(HASH_SIZE)
# Worker processes (workers=None): one per usable CPU, started once the log
# has proved long enough to repay the fork (so many chunks read).
_POOL_AFTER_CHUNKS = 8
_MAX_WORKERS = 8
# A worker's answer on one chunk takes milliseconds; past this, the worker
# is taken for hung and this process checks its chunks itself.
_WORKER_TIMEOUT = 30.0
_REAP_GRACE = 1.0  # seconds a worker has to leave once told, before SIGKILL
_DB_PAGE = 8192  # rows per database read
_BUNDLE_BLOCK = 4 * MAX_ENTRY_SIZE  # bytes of entries.jsonl per read: whole lines, mostly
_CAN_FORK = sys.platform == "linux" and hasattr(os, "fork")


class LogSource(Protocol):
    """What the verifier reads. Sources may also offer ``log_name`` (str | None)
    and ``size_hint() -> int | None`` (for a progress bar); both are optional."""

    def entries(self) -> Iterator[tuple[Any, ...]]:
        """``(stored seq, exact entry bytes, stored leaf hash or None)`` in log order,
        each followed, from a database, by the row's :data:`INDEX_COLUMNS`."""
        ...

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        """``(size as stored/named, signed note bytes)``, ascending by size."""
        ...

    def vkey(self) -> str | None:
        """The verifier key stored with the log, if any."""
        ...


class VerifyUsageError(Exception):
    """The log could not be read or the arguments are wrong (CLI exit 2)."""


class SourceFormatError(Exception):
    """The stored form of the log is malformed: evidence of tampering, not a usage error.

    ``seq``/``checkpoint_size`` locate the damage (both ``None``: the whole source).
    """

    def __init__(
        self, what: str, *, seq: int | None = None, checkpoint_size: int | None = None
    ) -> None:
        super().__init__(what)
        self.what = what
        self.seq = seq
        self.checkpoint_size = checkpoint_size


@dataclass(frozen=True)
class Finding:
    """What is wrong and where: the first bad ``seq`` and/or the checkpoint concerned."""

    seq: int | None
    checkpoint_size: int | None
    what: str

    def __str__(self) -> str:
        where = []
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.checkpoint_size is not None:
            where.append(f"checkpoint {self.checkpoint_size}")
        return f"{', '.join(where) or 'log'}: {self.what}"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_log`. ``ok`` is True only when nothing was found."""

    ok: bool
    entries: int
    checkpoints: int
    first_bad: Finding | None
    latest_checkpoint: Checkpoint | None
    root: bytes | None
    latest_note: bytes | None = None
    vkey: str | None = None
    vkey_from_log: bool = False
    warnings: list[str] = field(default_factory=list)
    # With a witness quorum (verify_log(witnesses=...)); else None/empty.
    quorum: int | None = None
    witnesses: tuple[str, ...] = ()  # the distinct names of the given witnesses
    witnessed_size: int | None = None  # newest checkpoint cosigned by a quorum
    witnessed_note: bytes | None = None  # that checkpoint's note, with its cosignatures
    cosigners: tuple[str, ...] = ()  # the given witnesses whose cosignatures on it verify
    unwitnessed: int | None = None  # entries after it
    witness_failure: str | None = None  # why the quorum is not met (not tampering)


# --------------------------------------------------------------------------- findings


@dataclass
class _Candidate:
    finding: Finding
    kind: str  # "global" | "exact" | "index" | "range"
    lo: int  # first seq that may be bad
    hi: int  # range: exclusive end; exact: lo + 1
    order: int


class _Findings:
    """Collects findings during the pass and picks the first bad one at the end.

    Exact findings name one entry; range findings (a root mismatch) only say
    that some entry in ``[lo, hi)`` differs; global ones concern the whole log
    (wrong key, malformed bundle). An exact finding inside or before the first
    range explains it more precisely and wins. Index findings (a row's index
    columns edited) are exact ones that yield to any other finding on the
    same entry (a forged row's columns hardly matter beside its being forged).
    """

    def __init__(self) -> None:
        self._items: list[_Candidate] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add_global(self, what: str, *, checkpoint_size: int | None = None) -> None:
        self._add(Finding(None, checkpoint_size, what), "global", -1, -1)

    def add_exact(self, seq: int, what: str, *, checkpoint_size: int | None = None) -> None:
        self._add(Finding(seq, checkpoint_size, what), "exact", seq, seq + 1)

    def add_index(self, seq: int, what: str) -> None:
        self._add(Finding(seq, None, what), "index", seq, seq + 1)

    def add_range(
        self, lo: int, hi: int, what: str, *, checkpoint_size: int | None, show_seq: bool = True
    ) -> None:
        self._add(Finding(lo if show_seq else None, checkpoint_size, what), "range", lo, hi)

    def _add(self, finding: Finding, kind: str, lo: int, hi: int) -> None:
        self._items.append(_Candidate(finding, kind, lo, hi, len(self._items)))

    def first(self) -> Finding | None:
        if not self._items:
            return None
        glob = [c for c in self._items if c.kind == "global"]
        if glob:
            return glob[0].finding
        exact = min(
            (c for c in self._items if c.kind in ("exact", "index")),
            key=lambda c: (c.lo, c.kind == "index", c.order),
            default=None,
        )
        rng = next((c for c in self._items if c.kind == "range"), None)
        if exact is not None and (rng is None or exact.lo < rng.hi):
            return exact.finding
        assert rng is not None
        return rng.finding


# --------------------------------------------------------------------------- verification


def _short(h: bytes) -> str:
    return h.hex()[:16] + "…"


class _Pass:
    """State of one streaming verification pass."""

    def __init__(
        self,
        source: LogSource,
        verifier: NoteVerifier,
        origin: str,
        log_name: str | None,
        trusted: Checkpoint | None,
        findings: _Findings,
        progress: Callable[[int], None] | None,
        workers: int | None,
        policy: WitnessPolicy | None = None,
    ) -> None:
        self.source = source
        self.verifier = verifier
        self.origin = origin
        self.log_name = log_name
        self.trusted = trusted
        self.f = findings
        self.progress = progress
        # (number of workers, from which chunk): workers=None waits to see a long log.
        if workers is None:
            n = _usable_cpus()
            self._pool_plan = (n if n >= 2 else 0, _POOL_AFTER_CHUNKS)
        else:
            self._pool_plan = (workers, 0)
        self._pool: _Pool | None = None
        self.cr = _Edge()
        self.n = 0  # entries read so far == current tree size
        self.last_good = 0  # size of the last checkpoint that fully verified
        self.max_cp = -1  # largest checkpoint size seen (good or bad)
        self.cp_count = 0
        self.latest: Checkpoint | None = None
        self.latest_note: bytes | None = None
        self._cps: Iterator[tuple[int, bytes]] | None = None
        self._next_cp: tuple[int, bytes] | None = None
        self._last_cp_size = -1
        self.stop_at: int | None = None  # last position to read once something is found
        self.aborted = False  # a source stream broke off: skip end-of-log checks
        # The entry-by-entry state (see _take_one).
        self._prev_hash: bytes | None = None
        self._prev_own_ok = True
        self._pending: int | None = None  # position whose link to its predecessor broke
        self._expected_log = log_name
        # The witness quorum (see _check_cosignatures).
        self.policy = policy
        self.witnessed: Checkpoint | None = None  # newest good checkpoint with a quorum
        self.witnessed_note: bytes | None = None
        self.cosigners: frozenset[str] = frozenset()
        self.most_cosigners: tuple[int, frozenset[str]] | None = None  # (size, names)

    # ---- checkpoints stream

    def _advance_cp(self) -> None:
        self._next_cp = None
        if self._cps is None:
            return
        try:
            item = next(self._cps, None)
        except SourceFormatError as e:
            self._source_error(e)
            self._cps = None
            return
        if item is None:
            self._cps = None
            return
        size, note = item
        if size <= self._last_cp_size:
            self.f.add_global(
                f"checkpoints out of order: size {size} listed after {self._last_cp_size}",
                checkpoint_size=size,
            )
            self._cps = None
            return
        self._last_cp_size = size
        self._next_cp = (size, note)

    def _source_error(self, e: SourceFormatError) -> None:
        if e.seq is not None:
            self.f.add_exact(e.seq, e.what, checkpoint_size=e.checkpoint_size)
        elif e.checkpoint_size is not None:
            self.f.add_exact(self.last_good, e.what, checkpoint_size=e.checkpoint_size)
        else:
            self.f.add_global(e.what)
        self._found()

    def _found(self, position: int | None = None) -> None:
        if self.stop_at is None:
            self.stop_at = (self.n - 1 if position is None else position) + _WINDOW

    def _check_checkpoints_at_size(self) -> None:
        """Check every stored checkpoint (and the trusted one) of the current size."""
        size = self.n
        root: bytes | None = None
        while self._next_cp is not None and self._next_cp[0] == size:
            root = self.cr.root() if root is None else root
            self._check_cp(size, self._next_cp[1], root)
            self._advance_cp()
        if self.trusted is not None and self.trusted.size == size:
            root = self.cr.root() if root is None else root
            if not hmac.compare_digest(self.trusted.root, root):
                self.f.add_range(
                    0,
                    size,
                    f"fork: the trusted checkpoint for size {size} has root "
                    f"{_short(self.trusted.root)} but the log's entries 0..{size - 1} give "
                    f"{_short(root)} (history was rewritten, or the key signed two histories)",
                    checkpoint_size=size,
                    show_seq=False,
                )
                self._found()

    def _check_cp(self, size: int, note: bytes, root: bytes) -> None:
        self.cp_count += 1
        self.max_cp = max(self.max_cp, size)
        covering = f" (covering seq {self.last_good}..{size - 1})" if size > self.last_good else ""
        try:
            cp = open_checkpoint(note, [self.verifier], origin=self.origin)
        except NoteError as e:
            self.f.add_exact(
                self.last_good,
                f"checkpoint {size}{covering} is not validly signed by the log key "
                f"{self.verifier.name}+{self.verifier.key_id.hex()}: {e}",
                checkpoint_size=size,
            )
            self._found()
            return
        if cp.size != size:
            self.f.add_exact(
                self.last_good,
                f"checkpoint stored as size {size} is signed for size {cp.size}",
                checkpoint_size=size,
            )
            self._found()
            return
        if not hmac.compare_digest(cp.root, root):
            self.f.add_range(
                self.last_good,
                size,
                f"root mismatch: checkpoint {size} signs root {_short(cp.root)} but the "
                f"entries give {_short(root)}: an entry in seq {self.last_good}..{size - 1} "
                "differs from what was signed",
                checkpoint_size=size,
            )
            self._found()
            return
        if self.policy is not None and not self._check_cosignatures(size, note, cp):
            return
        self.last_good = size
        self.latest = cp
        self.latest_note = note

    def _check_cosignatures(self, size: int, note: bytes, cp: Checkpoint) -> bool:
        """Every cosignature on a checkpoint that verified, by a given witness key,
        must verify; a checkpoint with a quorum is the newest witnessed one so far.

        Called only for a checkpoint whose signature, size and root check out:
        it is then one of the log's own, consistent with every other checkpoint
        and with the entries, so a quorum on it witnesses the log.
        """
        assert self.policy is not None
        try:
            names = self.policy.cosigners(note, cp)
        except CosignatureError as e:
            self.f.add_range(
                self.last_good,
                size,
                f"checkpoint {size} carries a witness cosignature that does not verify: {e} "
                "(the note was altered after the witness cosigned it, or the cosignature "
                "was forged)",
                checkpoint_size=size,
                show_seq=False,
            )
            self._found()
            return False
        if self.most_cosigners is None or len(names) >= len(self.most_cosigners[1]):
            self.most_cosigners = (size, names)
        if self.policy.met_by(names):
            self.witnessed, self.witnessed_note, self.cosigners = cp, note, names
        return True

    # ---- entries stream

    def run(self) -> bool:
        """Do the pass; True when it reached the end of the log."""
        try:
            self._cps = iter(self.source.checkpoints())
        except SourceFormatError as e:
            self._source_error(e)
            self._cps = None
        self._advance_cp()
        self._check_checkpoints_at_size()
        if self._has_global():
            return False

        try:
            self._take_entries()
        finally:
            if self._pool is not None:
                self._pool.close()

        if self._pending is not None:
            self._resolve_link(self._pending, False, False)
        if self.progress is not None:
            self.progress(self.n)
        ended = self.stop_at is None or self.n <= self.stop_at
        return ended and not self.aborted

    def _stopped(self) -> bool:
        return self.stop_at is not None and self.n > self.stop_at

    # ---- the fast path: chunks

    def _take_entries(self) -> None:
        """Take every entry, in chunks; stop where the pass stops."""
        start = 0
        end = self._ranged_end()
        if end is not None:
            for chunk in self._ranged_chunks(end):
                taken = self._take_ranged(chunk)
                if taken is None:  # needs a closer look: entry by entry from here
                    break
                if not taken:
                    return
            start = self.n
        source: Any = self.source
        entries = source.entries() if start == 0 else source._entries_from(start)
        for chunk in self._chunks(iter(entries), start):
            if not self._take(chunk):
                return

    def _ranged_end(self) -> int | None:
        """With workers on a database, they read the entries themselves: ``end_seq``, else None.

        Worker ``k`` reads the rows with seq in ``[k * _CHUNK, (k + 1) * _CHUNK)``,
        which are the rows at those positions of the log's seq-ordered stream
        as long as every row before had seq == position (each chunk taken
        proves it for the next) and no seq is negative (checked here). The
        first chunk that does not prove it, this process reads from there.
        """
        workers, after = self._pool_plan
        src = self.source
        if not workers or not isinstance(src, DatabaseSource) or src.min_seq < 0:
            return None
        if src.end_seq < after * _CHUNK:
            return None  # a small log: not worth a fork
        self._pool = _Pool.start(workers, src._read_range)
        return src.end_seq if self._pool is not None else None

    def _ranged_chunks(self, end: int) -> Iterator[_Chunk]:
        pool = self._pool
        assert pool is not None
        starts = iter(range(0, end, _CHUNK))
        nxt = next(starts, None)

        def fetch() -> _Chunk | None:
            nonlocal nxt
            if nxt is None:
                return None
            chunk = _Chunk(nxt, None, None, min(_CHUNK, end - nxt))
            nxt = next(starts, None)
            return chunk

        yield from _in_order(pool, fetch, pool.submit_range)

    def _take_ranged(self, chunk: _Chunk) -> bool | None:
        """Take a chunk a worker read and checked; None: not taken (read it here)."""
        checked = chunk.checked
        if checked is None or self.stop_at is not None or self._pending is not None:
            return None
        if not self._accept(chunk.start, checked):
            return None
        return self._take_checked(chunk.start, chunk.count, checked[2])

    def _chunks(self, entries: Iterator[Any], start: int) -> Iterator[_Chunk]:
        """The entries from position ``start``, in chunks of _CHUNK; with workers, checked.

        Reading runs ahead of the pass (with workers, a few chunks are in
        flight), so what reading raises is kept with its chunk and acted on
        only where the entry-by-entry pass would have met it.
        """

        def read() -> _Chunk:
            nonlocal start
            rows: list[Any] = []
            exc: Exception | None = None
            try:
                for row in islice(entries, _CHUNK):
                    rows.append(row)
            except Exception as e:  # kept: raised where the pass reaches it
                exc = e
            chunk = _Chunk(start, rows, exc, len(rows))
            start += len(rows)
            return chunk

        workers, after = self._pool_plan
        k = 0
        while self._pool is None:
            if workers and k >= after:
                self._pool = _Pool.start(workers)
                workers = 0  # started, or no fork here: this process goes on alone
                continue
            chunk = read()
            yield chunk
            if chunk.last:
                return
            k += 1
        ended = False

        def fetch() -> _Chunk | None:
            nonlocal ended
            if ended:
                return None
            chunk = read()
            ended = chunk.last
            return chunk

        yield from _in_order(self._pool, fetch, self._pool.submit_rows)

    def _take(self, chunk: _Chunk) -> bool:
        """Take one chunk of rows into the pass; False when the pass stops here."""
        rows = chunk.rows or []
        if rows and self.stop_at is None and self._pending is None:
            checked = chunk.check()
            cols = chunk.columns()
            if (
                checked is not None
                and cols is not None
                and _stored_ok(chunk.start, cols[0], cols[2], checked[2][0])
                and _index_clean(cols[1], cols[3])
                and self._accept(chunk.start, checked)
            ):
                if not self._take_checked(chunk.start, len(rows), checked[2]):
                    return False
                rows = []
        for row in rows:
            if self._stopped():
                return False
            self._take_one(*row)
            if self.progress is not None and self.n % _PROGRESS_EVERY == 0:
                self.progress(self.n)
        if chunk.exc is not None:
            if self._stopped():
                return False
            if isinstance(chunk.exc, SourceFormatError):
                self._source_error(chunk.exc)
                self.aborted = True
                return False
            raise chunk.exc
        return not self._stopped()

    def _accept(self, start: int, checked: _Checked) -> bool:
        """Whether a chunk that checked clean also continues the pass: position, link, log."""
        log_b, first_prev, _layers = checked
        if start != self.n or not hmac.compare_digest(first_prev, self._prev_hash or _ZERO32):
            return False
        log = log_b.decode("utf-8")  # parse_entry read it
        if self._expected_log is None:
            self._expected_log = log
        return log == self._expected_log

    def _take_checked(self, start: int, m: int, layers: list[bytes]) -> bool:
        """Take ``m`` checked entries from ``start``, stopping at every checkpoint size.

        Exactly what entry-by-entry would do for entries that are all
        correct: only sizes with a (trusted) checkpoint need a root, and once
        a checkpoint fails, only up to ``stop_at``. False when the pass stops.
        """
        end = start + m
        pos = start
        while pos < end:
            if self._stopped():
                return False
            cut = end
            if self._next_cp is not None and self._next_cp[0] < cut:
                cut = self._next_cp[0]
            if self.trusted is not None and pos < self.trusted.size < cut:
                cut = self.trusted.size
            if self.stop_at is not None and self.stop_at + 1 < cut:
                cut = self.stop_at + 1
            if cut <= pos:  # pragma: no cover - sizes below n were all checked
                raise AssertionError("checkpoint stream behind the entries")
            self._add_subtrees(layers, start, pos, cut)
            pos = self.n = cut
            i = (cut - 1 - start) * HASH_SIZE
            self._prev_hash = layers[0][i : i + HASH_SIZE]
            self._check_checkpoints_at_size()
        if self.progress is not None:
            self.progress(self.n)
        return not self._stopped()

    def _add_subtrees(self, layers: list[bytes], base: int, lo: int, hi: int) -> None:
        """Append leaves ``[lo, hi)`` of the chunk at ``base`` as their largest subtrees."""
        a, b = lo - base, hi - base
        while a < b:
            level = (a & -a).bit_length() - 1 if a else len(layers) - 1
            while 1 << level > b - a:
                level -= 1
            i = (a >> level) * HASH_SIZE
            self.cr.add(level, layers[level][i : i + HASH_SIZE])
            a += 1 << level

    # ---- entry by entry: the reference path, and the one that names what is wrong

    def _take_one(self, stored_seq: Any, data: Any, stored_lh: Any, *index: Any) -> None:
        """One row: ``(stored seq, entry bytes, stored leaf hash)``, then (from a
        database) the index columns in :data:`INDEX_COLUMNS` order."""
        p = self.n
        prev_hash = self._prev_hash
        lh = leaf_hash(data)
        own_ok = True
        if stored_seq != p:
            own_ok = False
            if stored_seq > p:
                self.f.add_exact(
                    p, f"entry {p} is missing: the next stored entry is seq {stored_seq}"
                )
            elif stored_seq < 0:
                self.f.add_exact(
                    stored_seq, f"a row is stored at seq {stored_seq}: no log writes a negative seq"
                )
            else:
                self.f.add_exact(
                    stored_seq,
                    f"stored seq {stored_seq} appears again after seq {p - 1} "
                    "(duplicated or out of order)",
                )
        entry: dict[str, Any] | None = None
        try:
            entry = parse_entry(data)
        except EntryError as e:
            own_ok = False
            self.f.add_exact(p, f"entry {p} is malformed: {e}")
        link_ok = True
        if entry is not None:
            want = ZERO_HASH_HEX if prev_hash is None else prev_hash.hex()
            link_ok = hmac.compare_digest(str(entry["prev"]), want)
            fseq = entry["seq"]
            if fseq != p:
                own_ok = False
                if link_ok and prev_hash is not None:
                    # It still links to entry p - 1: in place, its seq field was edited.
                    self.f.add_exact(p, f"entry {p} carries seq {fseq} (its seq field was altered)")
                elif fseq > p:
                    self.f.add_exact(
                        p,
                        f"entry at seq {p} carries seq {fseq}: an entry was deleted "
                        "or entries were reordered",
                    )
                else:
                    self.f.add_exact(
                        fseq,
                        f"seq {fseq} appears again at position {p}: an entry was "
                        "inserted, duplicated or moved",
                    )
            log_field = entry["log"]
            if self._expected_log is None:
                self._expected_log = log_field
            if log_field != self._expected_log:
                own_ok = False
                self.f.add_exact(
                    p, f"entry {p} belongs to log {log_field!r}, not {self._expected_log!r}"
                )
        if stored_lh is not None and not hmac.compare_digest(stored_lh, lh):
            own_ok = False
            self.f.add_exact(
                p,
                f"entry {p} was altered: its bytes hash to {_short(lh)} but the stored "
                f"leaf hash is {_short(stored_lh)}",
            )
        if entry is not None and index:
            wrong = index_disagreements(entry, index)
            if wrong:
                self.f.add_index(
                    p,
                    f"entry {p}'s row disagrees with its bytes: {'; '.join(wrong)} "
                    "(its index columns or its bytes were edited in place)",
                )
                self._found(p)
        if self._pending is not None:
            self._resolve_link(self._pending, own_ok, link_ok)
            self._pending = None
        if own_ok and not link_ok and self._prev_own_ok:
            if p == 0:
                self.f.add_exact(0, "entry 0 does not start the chain (prev is not zero)")
            else:
                self._pending = p
        if not own_ok:
            self._found(p)

        self.cr.add(0, lh)
        self.n += 1
        self._prev_hash = lh
        self._prev_own_ok = own_ok
        self._check_checkpoints_at_size()

    def _has_global(self) -> bool:
        return any(c.kind == "global" for c in self.f._items)

    def _resolve_link(self, p: int, next_own_ok: bool, next_link_ok: bool) -> None:
        """Entry ``p``'s prev does not match entry ``p - 1``: decide which one changed."""
        if next_own_ok and next_link_ok:
            # Entry p+1 vouches for entry p's bytes, so p - 1 is the altered one.
            self.f.add_exact(
                p - 1,
                f"entry {p - 1} was altered: its hash is not the prev recorded by entry {p}",
            )
        elif next_own_ok:
            self.f.add_exact(
                p,
                f"entry {p} was altered: its prev does not match entry {p - 1} and its "
                f"hash is not the prev recorded by entry {p + 1}",
            )
        else:
            self.f.add_exact(
                p - 1,
                f"the hash chain breaks between seq {p - 1} and seq {p}: entry {p}'s prev "
                f"is not the hash of entry {p - 1} (one of the two was altered)",
            )
        self._found(p + 1)

    def finish(self) -> None:
        """End-of-log checks: checkpoints past the end, unsigned tail, truncation."""
        n = self.n
        if self._next_cp is not None:
            # Only the first one matters: it already proves entries are missing.
            size, note = self._next_cp
            self.cp_count += 1
            self.max_cp = max(self.max_cp, size)
            try:
                open_checkpoint(note, [self.verifier], origin=self.origin)
            except NoteError as e:
                self.f.add_exact(
                    self.last_good,
                    f"checkpoint {size}: not validly signed by the log key: {e}",
                    checkpoint_size=size,
                )
            else:
                self.f.add_exact(
                    n,
                    f"log truncated: checkpoint {size} is signed but the log has only {n} "
                    f"entries (seq {n}..{size - 1} are missing)",
                    checkpoint_size=size,
                )
            self._cps = None
            self._next_cp = None
        if n > 0 and self.max_cp < n:
            first = max(self.max_cp, 0)
            self.f.add_exact(
                first,
                f"unsigned tail: entries {first}..{n - 1} are not covered by any checkpoint "
                "(appended outside the log, or their checkpoint was deleted)",
            )
        if self.trusted is not None and self.trusted.size > n:
            self.f.add_exact(
                n,
                f"log truncated or rolled back: the trusted checkpoint has size "
                f"{self.trusted.size} but the log has only {n} entries; first missing seq {n}",
                checkpoint_size=self.trusted.size,
            )


# --------------------------------------------------------------------------- fast path


class _Edge:
    """The right edge of the tree being rebuilt, as in :class:`CompactRange`
    (one perfect subtree hash per set bit of ``size``, largest first), but
    also taking whole perfect subtrees: a chunk costs one call, not one per leaf."""

    __slots__ = ("hashes", "size")

    def __init__(self) -> None:
        self.size = 0
        self.hashes: list[bytes] = []

    def add(self, level: int, h: bytes) -> None:
        """Append the subtree of ``2**level`` leaves starting at ``size`` (a multiple of it)."""
        size = self.size
        if size & ((1 << level) - 1):  # pragma: no cover - chunks are aligned
            raise AssertionError("unaligned subtree")
        bit = 1 << level
        hashes = self.hashes
        while size & bit:  # each set bit from ``level`` up is a left sibling to merge
            h = hashlib.sha256(b"\x01" + hashes.pop() + h).digest()
            bit <<= 1
        hashes.append(h)
        self.size = size + (1 << level)

    def root(self) -> bytes:
        return CompactRange(self.size, self.hashes).root()


# A clean chunk: (its log's name in UTF-8, the prev of its first entry, its
# Merkle layers: layers[k] concatenates the hashes of its perfect subtrees of
# 2**k leaves, left to right; layers[0] the leaf hashes).
_Checked = tuple[bytes, bytes, list[bytes]]


def _check_chunk(start: int, datas: Sequence[bytes]) -> _Checked | None:
    """The fast verdict on entries from position ``start``: not None only when
    every entry is one :func:`parse_entry` accepts, its ``seq`` field is its
    position, its ``prev`` the leaf hash of the entry before it (the first's
    is returned, for the caller to match) and all name the first one's log
    (:func:`entries_clean`). Pure, so that a worker process can run it."""
    if not datas or type(datas[0]) is not bytes:
        return None
    try:
        first = parse_entry(datas[0])
    except EntryError:
        return None
    sha256 = hashlib.sha256
    lhs = [sha256(b"\x00" + d).digest() for d in datas]
    layer0 = b"".join(lhs)
    # Every link at once: entry i's prev is the hex of leaf hash i - 1.
    prevs = str(first["prev"]).encode() + binascii.hexlify(layer0[:-HASH_SIZE])
    log = str(first["log"])
    if not entries_clean(datas, start=start, log=log, prevs=prevs):
        return None
    layers = [layer0]
    layer = lhs
    while len(layer) > 1:
        pairs = iter(layer)  # an odd last node has no sibling yet: zip drops it
        layer = [sha256(b"\x01" + a + b).digest() for a, b in zip(pairs, pairs, strict=False)]
        layers.append(b"".join(layer))
    return log.encode(), binascii.unhexlify(prevs[: 2 * HASH_SIZE]), layers


# --------------------------------------------------------------------------- index columns


def index_disagreements(entry: Mapping[str, Any], index: Sequence[Any]) -> list[str]:
    """Which stored index columns disagree with the entry they index (the reference check).

    ``entry`` is what :func:`~axid.audit.entry.parse_entry` made of the entry
    bytes; ``index`` the row's columns in :data:`INDEX_COLUMNS` order, as
    stored. A column agrees when it holds exactly what the entry says, of the
    same type (``ts``: the entry's time in unix ms, an int). Returns one
    ``"COLUMN column is X but the entry says Y"`` per disagreeing column.
    """
    out: list[str] = []
    for name, stored in zip(INDEX_COLUMNS, index, strict=True):
        said = entry[name]
        want = parse_ts(said) if name == "ts" else said
        if type(stored) is not type(want) or stored != want:
            out.append(f"{name} column is {_stored_repr(name, stored)} but the entry says {said!r}")
    return out


def _stored_repr(name: str, stored: Any) -> str:
    if name == "ts" and type(stored) is int:
        try:
            return f"{stored} ({format_ts(stored)})"
        except EntryError:
            pass
    return repr(stored)


_STR_TYPES = frozenset({str})
_OPT_STR_TYPES = frozenset({str, type(None)})


class _Needles(dict[Any, bytes]):
    """``X"KEY":`` followed by a column value's JSON token, made once per distinct
    value (a chunk repeats few values)."""

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self.key = key

    def __missing__(self, value: str | None) -> bytes:
        token = b"null" if value is None else _json_str(value).encode("utf-8")
        needle = self[value] = self.key + token
        return needle


class _Tails(dict[tuple[Any, int], bytes]):
    """How an entry with this tenant and ts (unix ms) ends: ``,"tenant":T,"ts":"S","v":1}``."""

    def __init__(self) -> None:
        super().__init__()
        self.tenant = _Needles(b',"tenant":')

    def __missing__(self, key: tuple[str | None, int]) -> bytes:
        tenant, ms = key
        tail = self[key] = b'%s,"ts":"%s","v":1}' % (self.tenant[tenant], format_ts(ms).encode())
        return tail


def _index_clean(datas: Sequence[bytes], index: Sequence[Sequence[Any]]) -> bool:
    """The fast verdict on index columns: True only when every entry provably
    agrees with its columns (``index``: one tuple per column, empty for a bundle).

    Only for entries :func:`~axid.audit.entry.entries_clean` said are clean: RFC 8785
    text with the fields in their fixed order, so a ``"`` not preceded by a
    backslash is a string delimiter and every key occurs once. Then
    ``X"KEY":V`` found in the bytes (X is ``{`` or ``,``, not a backslash, so
    that quote opens a string, one followed by ``:``, i.e. the key) means the
    value of KEY begins with V, and a complete JSON token V (a string encoded
    by :mod:`json`, or ``null``) that begins a value is that value. Anything
    else (a column of another type, say) is left to :func:`index_disagreements`.
    (``rfind``: reason and run sit near the end of an entry.)
    """
    if not index:
        return True
    dec, rea, ten, age, run, ts = index
    if (
        set(map(type, dec)) | set(map(type, rea)) != _STR_TYPES
        or not set(map(type, ten)) | set(map(type, age)) | set(map(type, run)) <= _OPT_STR_TYPES
        or set(map(type, ts)) != {int}
    ):
        return False
    agent, decision = _Needles(b'{"agent":'), _Needles(b',"decision":')
    reason, run_n, tails = _Needles(b',"reason":'), _Needles(b',"run":'), _Tails()
    try:
        for data, d, r, t, a, u, ms in zip(datas, dec, rea, ten, age, run, ts, strict=True):
            if not (
                data.endswith(tails[(t, ms)])
                and data.startswith(agent[a])
                and data.rfind(run_n[u]) >= 0
                and data.rfind(reason[r]) >= 0
                and decision[d] in data
            ):
                return False
    except (EntryError, UnicodeEncodeError, ValueError):
        return False
    return True


def _stored_ok(start: int, seqs: Sequence[Any], stored: Sequence[Any], layer0: bytes) -> bool:
    """Stored seqs are the positions from ``start``; stored leaf hashes (if any) match."""
    m = len(seqs)
    if list(seqs) != list(range(start, start + m)):
        return False  # a gap, a duplicate or a swap
    if stored.count(None) == m:  # a source without stored hashes (a bundle)
        return True
    if set(map(type, stored)) != {bytes} or set(map(len, stored)) != {HASH_SIZE}:
        return False
    return hmac.compare_digest(b"".join(stored), layer0)


def _check_rows(start: int, rows: list[Any]) -> _Checked | None:
    """:func:`_check_chunk`, :func:`_stored_ok` and :func:`_index_clean` on source rows."""
    try:
        seqs, datas, stored, *index = zip(*rows, strict=True)
    except (TypeError, ValueError):
        return None
    checked = _check_chunk(start, datas)
    if (
        checked is None
        or not _stored_ok(start, seqs, stored, checked[2][0])
        or not _index_clean(datas, index)
    ):
        return None
    return checked


_UNSET: Any = object()
# A chunk's rows by column: stored seqs, datas, stored leaf hashes, index columns.
_Columns = tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...], list[tuple[Any, ...]]]


class _Chunk:
    """Up to _CHUNK consecutive entries: the rows read (None when a worker read
    them), what reading raised after them, and the fast verdict."""

    __slots__ = ("_cols", "checked", "count", "done", "exc", "rows", "start", "worker")

    def __init__(self, start: int, rows: list[Any] | None, exc: Exception | None, count: int):
        self.start = start
        self.rows = rows
        self.exc = exc
        self.count = count
        self.worker: int | None = None  # the worker checking it
        self.done = False
        self.checked: _Checked | None = None
        self._cols: Any = _UNSET

    @property
    def last(self) -> bool:
        return self.exc is not None or self.count < _CHUNK

    def columns(self) -> _Columns | None:
        """``(stored seqs, datas, stored leaf hashes, index columns)``; None if the
        rows are not all alike (triples, or triples and the index columns)."""
        if self._cols is _UNSET:
            try:
                seqs, datas, stored, *index = zip(*(self.rows or ()), strict=True)
                self._cols = (seqs, datas, stored, index)
            except (TypeError, ValueError):
                self._cols = None
        return self._cols  # type: ignore[no-any-return]

    def check(self) -> _Checked | None:
        """The fast verdict (a worker's, or computed here)."""
        if not self.done:
            cols = self.columns()
            if cols is not None:
                self.checked = _check_chunk(self.start, cols[1])
            self.done = True
        return self.checked


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _in_order(
    pool: _Pool, fetch: Callable[[], _Chunk | None], submit: Callable[[_Chunk], None]
) -> Iterator[_Chunk]:
    """The chunks ``fetch`` gives, in order, each checked by a worker where one took it.

    Keeps the workers fed: chunks are fetched and submitted while a worker is
    free (up to ``pool.window`` in flight), and the next in order is yielded
    once its verdict is in. Chunks left in flight when the consumer stops
    are collected (freeing their workers) and dropped.
    """
    inflight: deque[_Chunk] = deque()
    try:
        while True:
            while len(inflight) < pool.window and pool.room():
                chunk = fetch()
                if chunk is None:
                    break
                submit(chunk)  # a chunk no worker takes is checked here
                inflight.append(chunk)
            if not inflight:
                return
            if inflight[0].worker is not None:
                pool.collect_some()
                continue
            yield inflight.popleft()
    finally:
        while any(c.worker is not None for c in inflight):
            pool.collect_some()


class _Pool:
    """Forked worker processes that check chunks: rows sent to them, or (with a
    ``reader``) the rows they read themselves.

    ``os.fork`` directly, not multiprocessing's bootstrap: the child only
    serves its socket and leaves with ``os._exit``, never running this
    process's cleanup, and disables the garbage collector so that nothing
    inherited (a database connection, say) is finalised in it. If a worker
    fails, hangs or dies, this process checks the chunks itself: workers only
    ever save time, and what they say is only a "this chunk is clean".

    Verdicts are collected as workers finish (a worker is fed again at once),
    while the pass takes chunks in order: up to ``window`` chunks are in flight.
    """

    def __init__(self, depth: int) -> None:
        self._conns: list[Connection] = []
        self._pids: list[int] = []
        self._depth = depth  # tasks a worker may hold: its own and one queued
        self._queues: list[deque[_Chunk]] = []  # per worker: its chunks, in order
        self.window = 0
        self.broken = False

    @classmethod
    def start(cls, n: int, reader: Callable[[int, int], list[Any]] | None = None) -> _Pool | None:
        """``n`` workers. Given a ``reader`` (tasks are then small), each also
        holds a second task, so that it never waits for the next."""
        if not _CAN_FORK or n <= 0:
            return None
        pool = cls(1 if reader is None else 2)
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
                        _worker_loop(theirs, reader)
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
        """Whether a chunk can be taken in now (by a worker, or here if workers are gone)."""
        return self.broken or self._free_worker() is not None

    def submit_rows(self, chunk: _Chunk) -> None:
        """Send a chunk's entries to a free worker (if they can go: else checked here)."""
        cols = chunk.columns()
        if cols is None or not chunk.rows:
            return
        datas = cols[1]
        if set(map(type, datas)) != {bytes}:
            return
        lens = array("Q", map(len, datas)).tobytes()
        self._send(chunk, ("rows", chunk.start, lens), b"".join(datas))

    def submit_range(self, chunk: _Chunk) -> None:
        """Have a free worker read and check the chunk's rows itself."""
        self._send(chunk, ("range", chunk.start, chunk.count), None)

    def _send(self, chunk: _Chunk, task: tuple[str, int, Any], blob: bytes | None) -> None:
        w = self._free_worker()
        if w is None:
            return
        conn = self._conns[w]
        try:
            conn.send(task)
            if blob is not None:
                conn.send_bytes(blob)
        except (OSError, ValueError):
            self._break()
            return
        chunk.worker = w
        self._queues[w].append(chunk)

    def collect_some(self) -> None:
        """Wait for at least one verdict (or for the workers to be given up)."""
        busy = [self._conns[w] for w, q in enumerate(self._queues) if q]
        if self.broken or not busy:
            return
        try:
            ready = multiprocessing.connection.wait(busy, _WORKER_TIMEOUT)
            if not ready:
                self._break()
                return
            for conn in ready:
                status, checked = conn.recv()  # type: ignore[union-attr]
                chunk = self._queues[self._conns.index(conn)].popleft()  # type: ignore[arg-type]
                chunk.worker = None
                if status == "ok":
                    chunk.checked = checked
                    chunk.done = True
        except (EOFError, OSError, ValueError):
            self._break()

    def _break(self) -> None:
        self.broken = True
        for q in self._queues:
            for chunk in q:
                chunk.worker = None  # checked here, then
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


def _worker_loop(
    conn: Connection, reader: Callable[[int, int], list[Any]] | None
) -> None:  # pragma: no cover - runs in the worker
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            kind, start, arg = task
            blob = conn.recv_bytes() if kind == "rows" else b""
        except (EOFError, OSError):
            return
        try:
            checked: _Checked | None = None
            if kind == "rows":
                sizes = array("Q")
                sizes.frombytes(arg)
                datas = [blob[a:b] for a, b in pairwise(accumulate(sizes, initial=0))]
                checked = _check_chunk(start, datas)
            elif reader is not None:
                rows = reader(start, arg)
                if len(rows) == arg:
                    checked = _check_rows(start, rows)
            out: tuple[str, Any] = ("ok", checked)
        except Exception:  # the parent redoes the chunk itself (and so sees a bug)
            out = ("error", None)
        try:
            conn.send(out)
        except OSError:  # the parent stopped reading (it found what it needed)
            return


def _origin_log_name(origin: str) -> str | None:
    return origin[len(_ORIGIN_PREFIX) :] if origin.startswith(_ORIGIN_PREFIX) else None


def verify_log(
    source: LogSource,
    *,
    vkey: str | None = None,
    trusted_checkpoint: bytes | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    witnesses: WitnessPolicy | None = None,
) -> VerifyReport:
    """Verify a whole log in one streaming pass; see the module docstring.

    ``vkey`` is the auditor's trusted verifier key; without it the key stored
    with the log is used (and a warning says so: such a key is only as
    trustworthy as the log). Raises :class:`VerifyUsageError` for unreadable
    sources and bad arguments; tampering is reported, never raised.

    ``workers``: processes that check entries in parallel with this one
    (forked, Linux only). ``None``: one per usable CPU when there are several,
    once the log has shown itself long (tens of thousands of entries); ``0``:
    none. They change the speed only: findings and the report are the same.

    ``witnesses``: also require a checkpoint cosigned by a quorum of witnesses
    (the report's ``witnessed_size``, ``cosigners``, ``witness_failure``); an
    invalid cosignature by a given witness key is a finding.
    """
    if workers is not None and (type(workers) is not int or workers < 0):
        raise VerifyUsageError(f"workers must be an int >= 0, got {workers!r}")
    if witnesses is not None and not isinstance(witnesses, WitnessPolicy):
        raise VerifyUsageError("witnesses must be a WitnessPolicy")
    findings = _Findings()
    warnings: list[str] = []
    try:
        return _verify(
            source, vkey, trusted_checkpoint, progress, workers, findings, warnings, witnesses
        )
    except OSError as e:
        raise VerifyUsageError(f"cannot read the log: {e}") from e


def _verify(
    source: LogSource,
    vkey: str | None,
    trusted_checkpoint: bytes | None,
    progress: Callable[[int], None] | None,
    workers: int | None,
    findings: _Findings,
    warnings: list[str],
    policy: WitnessPolicy | None = None,
) -> VerifyReport:
    explicit: NoteVerifier | None = None
    if vkey is not None:
        try:
            explicit = NoteVerifier.from_vkey(vkey.strip())
        except NoteError as e:
            raise VerifyUsageError(f"bad --vkey: {e}") from e

    stored_text: str | None = None
    stored_bad: str | None = None
    try:
        stored_text = source.vkey()
    except SourceFormatError as e:
        stored_bad = e.what
    log_name: str | None = getattr(source, "log_name", None)

    def report(
        *,
        entries: int = 0,
        cps: int = 0,
        ok: bool = False,
        root: bytes | None = None,
        latest: Checkpoint | None = None,
        latest_note: bytes | None = None,
        key: str | None = None,
        witness: Mapping[str, Any] | None = None,
    ) -> VerifyReport:
        return VerifyReport(
            ok=ok,
            entries=entries,
            checkpoints=cps,
            first_bad=findings.first(),
            latest_checkpoint=latest,
            root=root,
            latest_note=latest_note,
            vkey=key,
            vkey_from_log=explicit is None,
            warnings=warnings,
            **(witness if witness is not None else _witness_fields(policy, None, False)),
        )

    verifier: NoteVerifier
    if explicit is not None:
        verifier = explicit
        if log_name is not None and explicit.name != _ORIGIN_PREFIX + log_name:
            raise VerifyUsageError(
                f"--vkey is a key for {explicit.name!r}, not for log {log_name!r} "
                f"(origin {_ORIGIN_PREFIX + log_name!r})"
            )
        if stored_bad is not None:
            findings.add_global(f"the stored verifier key is malformed: {stored_bad}")
            return report(key=explicit.vkey())
        if stored_text is not None and stored_text.strip() != explicit.vkey():
            findings.add_global(
                "the verifier key stored with the log is not the trusted --vkey: the log's "
                "key was replaced"
            )
            return report(key=explicit.vkey())
    else:
        if stored_bad is not None:
            findings.add_global(f"the stored verifier key is malformed: {stored_bad}")
            return report()
        if stored_text is None:
            raise VerifyUsageError("no verifier key stored with the log: pass --vkey")
        try:
            verifier = NoteVerifier.from_vkey(stored_text.strip())
        except NoteError as e:
            findings.add_global(f"the stored verifier key is malformed: {e}")
            return report()
        warnings.append(
            "no --vkey given: checked against the key stored with the log, which is only "
            "as trustworthy as the log itself; pass the log's published vkey"
        )
        if log_name is not None and verifier.name != _ORIGIN_PREFIX + log_name:
            findings.add_global(
                f"the stored verifier key is for {verifier.name!r}, not for log {log_name!r}"
            )
            return report(key=verifier.vkey())

    origin = verifier.name
    if log_name is None:
        log_name = _origin_log_name(origin)

    trusted: Checkpoint | None = None
    if trusted_checkpoint is not None:
        try:
            trusted = open_checkpoint(trusted_checkpoint, [verifier], origin=origin)
        except NoteError as e:
            if explicit is not None:
                raise VerifyUsageError(
                    f"the trusted checkpoint does not verify with --vkey: {e}"
                ) from e
            findings.add_global(
                "the trusted checkpoint does not verify with the key stored with the log "
                f"(the log's key may have been replaced; pass --vkey): {e}"
            )
            return report(key=verifier.vkey())

    run = _Pass(source, verifier, origin, log_name, trusted, findings, progress, workers, policy)
    ended = run.run()
    if ended and not run._has_global():
        run.finish()
    witness = _witness_fields(policy, run, ended and not findings)
    return report(
        entries=run.n,
        cps=run.cp_count,
        ok=not findings and witness.get("witness_failure") is None,
        root=run.cr.root() if ended else None,
        latest=run.latest,
        latest_note=run.latest_note,
        key=verifier.vkey(),
        witness=witness,
    )


def _witness_fields(policy: WitnessPolicy | None, run: _Pass | None, whole: bool) -> dict[str, Any]:
    """The report's witness fields; ``whole``: the pass read the whole log and found
    nothing, so a missing quorum (or too long an unwitnessed tail) is the verdict."""
    if policy is None:
        return {}
    out: dict[str, Any] = {"quorum": policy.quorum, "witnesses": policy.names}
    cp = None if run is None else run.witnessed
    if run is not None and cp is not None:
        out.update(
            witnessed_size=cp.size,
            witnessed_note=run.witnessed_note,
            cosigners=tuple(sorted(run.cosigners)),
            unwitnessed=run.n - cp.size,
        )
    if run is not None and whole:
        out["witness_failure"] = _witness_failure(policy, run)
    return out


def _witness_failure(policy: WitnessPolicy, run: _Pass) -> str | None:
    """Why the log is not witnessed as ``policy`` asks, or None when it is."""
    cp = run.witnessed
    if cp is None:
        most = run.most_cosigners
        seen = (
            "no checkpoint carries a valid cosignature by any of them"
            if most is None or not most[1]
            else f"the most any carries is {len(most[1])} (checkpoint {most[0]}: "
            f"{', '.join(sorted(most[1]))})"
        )
        return f"no checkpoint cosigned by {policy.describe()}: {seen}"
    after = run.n - cp.size
    if policy.max_unwitnessed is not None and after > policy.max_unwitnessed:
        return (
            f"{after} entries after the newest checkpoint cosigned by {policy.describe()} "
            f"(size {cp.size}), more than the {policy.max_unwitnessed} allowed "
            "(--max-unwitnessed)"
        )
    return None


# --------------------------------------------------------------------------- sources


def load_vkey_arg(value: str) -> str:
    """A ``--vkey`` argument: the vkey itself, or a file holding it on one line."""
    value = _vkey_text(value, "--vkey")
    try:
        NoteVerifier.from_vkey(value)
    except NoteError as e:
        raise VerifyUsageError(f"bad --vkey: {e}") from e
    return value


def load_witness_arg(value: str) -> WitnessKey:
    """A ``--witness`` argument: a witness vkey (type 0x04 Ed25519 cosignature/v1 or
    0x06 ML-DSA-44 subtree/v1), or a file holding it on one line."""
    text = _vkey_text(value, "--witness")
    try:
        return WitnessKey.from_vkey(text)
    except CosignatureError as e:
        raise VerifyUsageError(f"bad --witness {_clip(text)}: {e}") from e


def _clip(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _vkey_text(value: str, option: str) -> str:
    """The vkey an option names: the value itself, or the one line of the file it names."""
    p = Path(value)
    try:
        is_file = p.is_file()
    except OSError:  # e.g. a name too long to be a path: then it is not a file
        is_file = False
    if is_file:
        try:
            raw = p.read_bytes()[: _MAX_VKEY_FILE + 1]
        except OSError as e:
            raise VerifyUsageError(f"cannot read vkey file {value}: {e}") from e
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise VerifyUsageError(f"vkey file {value} is not ASCII") from e
        line = text[:-1] if text.endswith("\n") else text
        if not line or "\n" in line or "\r" in line or len(raw) > _MAX_VKEY_FILE:
            raise VerifyUsageError(f"vkey file {value} must hold exactly one vkey line")
        return line
    if "+" not in value:
        raise VerifyUsageError(f"{option} {_clip(value)}: no such file, and not a vkey")
    return value


class ExportDirSource:
    """An export bundle: ``entries.jsonl``, ``checkpoints/<size>``, ``vkey``.

    Strict: every line ends in ``\\n``, holds no CR and is not empty; checkpoint
    file names are decimal without leading zeros; nothing else is in
    ``checkpoints/``. Deviations are reported as findings (the bundle was
    altered); a missing or unreadable bundle is a :class:`VerifyUsageError`.
    """

    log_name: str | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VerifyUsageError(f"{self.path}: no such bundle directory")
        self._entries = self.path / "entries.jsonl"
        self._cps = self.path / "checkpoints"
        if not self._entries.is_file():
            raise VerifyUsageError(f"{self.path}: not an export bundle (no entries.jsonl)")
        if not self._cps.is_dir():
            raise VerifyUsageError(f"{self.path}: not an export bundle (no checkpoints/)")

    def size_hint(self) -> int | None:
        count = 0
        try:
            with self._entries.open("rb") as f:
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
        except OSError as e:
            raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
        return count

    def entries(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        return chain.from_iterable(self._entry_pages())

    def _entry_pages(self) -> Iterator[list[tuple[int, bytes, None]]]:
        """The lines a block at a time; a block with anything unusual in it, and
        everything after, line by line (which then says exactly what is wrong)."""
        try:
            f = self._entries.open("rb")
        except OSError as e:
            raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
        with f:
            seq = 0
            pos = 0  # offset of the first line not yet yielded
            while True:
                try:
                    f.seek(pos)
                    block = f.read(_BUNDLE_BLOCK)
                except OSError as e:
                    raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
                end = block.rfind(b"\n")
                if end < 0:  # the end of the file, or a line longer than a block
                    break
                head = block[:end]
                lines = head.split(b"\n")
                if b"\r" in head or b"" in lines or max(map(len, lines)) > MAX_ENTRY_SIZE + 1:
                    break
                yield [(seq + i, line, None) for i, line in enumerate(lines)]
                seq += len(lines)
                pos += end + 1
            try:
                f.seek(pos)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
            for row in self._lines(f, seq):
                yield [row]

    def _lines(self, f: Any, seq: int) -> Iterator[tuple[int, bytes, None]]:
        while True:
            try:
                line = f.readline(MAX_ENTRY_SIZE + 2)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
            if not line:
                return
            if not line.endswith(b"\n"):
                if len(line) > MAX_ENTRY_SIZE:
                    raise SourceFormatError(
                        f"entries.jsonl line {seq + 1} is longer than an entry can be",
                        seq=seq,
                    )
                raise SourceFormatError(
                    f"entries.jsonl line {seq + 1} does not end with a newline "
                    "(truncated or edited file)",
                    seq=seq,
                )
            body = line[:-1]
            if b"\r" in body:
                raise SourceFormatError(
                    f"entries.jsonl line {seq + 1} contains a carriage return", seq=seq
                )
            if not body:
                raise SourceFormatError(f"entries.jsonl line {seq + 1} is empty", seq=seq)
            yield seq, body, None
            seq += 1

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        sizes: list[int] = []
        try:
            with os.scandir(self._cps) as it:
                for de in it:
                    if not _SIZE_NAME_RE.fullmatch(de.name) or not de.is_file(
                        follow_symlinks=False
                    ):
                        raise SourceFormatError(
                            f"checkpoints/{de.name}: not a checkpoint file (a decimal size "
                            "without leading zeros)"
                        )
                    sizes.append(int(de.name))
        except OSError as e:
            raise VerifyUsageError(f"cannot list {self._cps}: {e}") from e
        sizes.sort()
        return self._read_cps(sizes)

    def _read_cps(self, sizes: list[int]) -> Iterator[tuple[int, bytes]]:
        for size in sizes:
            p = self._cps / str(size)
            try:
                with p.open("rb") as f:
                    # One byte over the limit is enough for open_checkpoint to refuse it.
                    note = f.read(MAX_NOTE_SIZE + 1)
            except OSError as e:
                raise VerifyUsageError(f"cannot read {p}: {e}") from e
            yield size, note

    def vkey(self) -> str | None:
        p = self.path / "vkey"
        if not p.exists():
            return None
        try:
            raw = p.read_bytes()[: _MAX_VKEY_FILE + 1]
        except OSError as e:
            raise VerifyUsageError(f"cannot read {p}: {e}") from e
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise SourceFormatError("vkey file is not ASCII") from e
        if (
            len(raw) > _MAX_VKEY_FILE
            or not text.endswith("\n")
            or len(text) < 2
            or "\n" in text[:-1]
            or "\r" in text
        ):
            raise SourceFormatError("vkey file must hold exactly one line ending in a newline")
        return text[:-1]


class DatabaseSource:
    """A log in the database, read through :class:`axid.audit.store.LogStore`.

    ``log`` may be None only when the database holds exactly one log. A SQLite
    URL must name an existing file: verifying never creates a database.

    The source reads a consistent cut taken once, in ONE statement (one
    snapshot even under PostgreSQL READ COMMITTED): the entries up to the
    largest stored seq and the checkpoints up to the largest stored size at that
    moment. Batches committed while the pass runs are left out, so verifying a
    live log gives no false "unsigned tail"/"truncated" findings, while rows an
    attacker stored before the cut are all seen.
    """

    def __init__(self, url: str, log: str | None = None) -> None:
        from axid.audit.store import LogStore

        engine, logs = _open_database(url)
        if log is None:
            if len(logs) != 1:
                engine.dispose()
                if not logs:
                    raise VerifyUsageError("the database holds no decision log")
                raise VerifyUsageError(
                    f"the database holds several logs, pass --log: {', '.join(logs)}"
                )
            log = logs[0]
        elif log not in logs:
            engine.dispose()
            raise VerifyUsageError(
                f"no log {log!r} in the database (logs: {', '.join(logs) or 'none'})"
            )
        self._init(LogStore(engine, log), owns_engine=True)

    @classmethod
    def open_all(cls, url: str) -> list[DatabaseSource]:
        """One source per log in the database, by name, sharing one engine
        (closing any of them closes it: close them all when done)."""
        from axid.audit.store import LogStore

        engine, logs = _open_database(url)
        if not logs:
            engine.dispose()
            raise VerifyUsageError("the database holds no decision log")
        sources: list[DatabaseSource] = []
        try:
            for name in logs:
                source = cls.__new__(cls)
                source._init(LogStore(engine, name), owns_engine=True)
                sources.append(source)
        except BaseException:
            engine.dispose()
            raise
        return sources

    @classmethod
    def from_store(cls, store: Any) -> DatabaseSource:
        """Wrap an open :class:`~axid.audit.store.LogStore` (its engine stays the caller's)."""
        self = cls.__new__(cls)
        self._init(store, owns_engine=False)
        return self

    def _init(self, store: Any, *, owns_engine: bool) -> None:
        from sqlalchemy import func, select
        from sqlalchemy.exc import SQLAlchemyError

        from axid.audit.store import AuditCheckpoint, AuditEntry

        self._sa_error = SQLAlchemyError
        self.store = store
        self.log_name: str | None = store.log
        self._owns_engine = owns_engine
        ent: Any = AuditEntry.__table__
        cps: Any = AuditCheckpoint.__table__
        q = select(
            select(func.max(ent.c.seq)).where(ent.c.log == store.log).scalar_subquery(),
            select(func.max(cps.c.size)).where(cps.c.log == store.log).scalar_subquery(),
            select(func.min(ent.c.seq)).where(ent.c.log == store.log).scalar_subquery(),
        )
        try:
            with store.engine.connect() as conn:
                max_seq, max_cp, min_seq = conn.execute(q).one()
        except SQLAlchemyError as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e
        # Upper bounds of the cut: entries with seq < end_seq, checkpoints <= max_cp.
        self.end_seq = 0 if max_seq is None else int(max_seq) + 1
        self.max_cp = -1 if max_cp is None else int(max_cp)
        self.min_seq = 0 if min_seq is None else int(min_seq)  # < 0 only if tampered with
        self._reader_pid = os.getpid()

    def _guard(self, it: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from it
        except self._sa_error as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e

    def size_hint(self) -> int | None:
        return self.end_seq

    def entries(self) -> Iterator[tuple[Any, ...]]:
        """``(seq, data, leaf_hash, decision, reason, tenant, agent, run, ts)`` rows:
        the entries with their index columns as stored (see :data:`INDEX_COLUMNS`)."""
        # From the lowest stored seq: a row an attacker stored at a negative
        # seq (no log writes one) is seen, and reported, too.
        return self._entries_from(min(self.min_seq, 0))

    def _entries_from(self, seq: int) -> Iterator[tuple[Any, ...]]:
        """The stored entries with ``seq`` or above, up to the cut."""
        # A page at a time through the guard: no Python frame per row.
        pages = self.store.indexed_entry_pages(seq, max(seq, self.end_seq), _DB_PAGE)
        return chain.from_iterable(self._guard(pages))

    def _read_range(self, start: int, count: int) -> list[Any]:
        """In a forked worker: the rows with seq in ``[start, start + count)``."""
        if self._reader_pid != os.getpid():
            # The connections in the pool are the parent's: leave them alone
            # (not even closed) and open our own (SQLAlchemy's fork recipe).
            self.store.engine.dispose(close=False)
            self._reader_pid = os.getpid()
        end = min(start + count, self.end_seq)
        for page in self.store.indexed_entry_pages(start, end, max(1, end - start)):
            return page
        return []

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        """The signed notes up to the cut, each with its witnesses' cosignature
        lines appended after the log's own (C2SP signed-note: unknown keys are ignored)."""

        def upto() -> Iterator[tuple[int, bytes]]:
            for size, note in self.store.cosigned_checkpoints():
                if size > self.max_cp:
                    return
                yield size, note

        return self._guard(upto())

    def vkey(self) -> str | None:
        from axid.audit.store import LogNotFound

        try:
            return self.store.vkey()
        except LogNotFound as e:
            raise VerifyUsageError(str(e)) from e
        except self._sa_error as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e

    def close(self) -> None:
        """Release the database connections (only if this source opened them)."""
        if self._owns_engine:
            self.store.engine.dispose()


def _open_database(url: str) -> tuple[Any, list[str]]:
    """An engine for an existing decision-log database, and its log names."""
    # Imported here so that bundle verification needs no database layer.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from axid.audit.store import list_logs, make_engine

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise VerifyUsageError("invalid database URL") from e
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:" or not Path(db).is_file():
            raise VerifyUsageError(f"no database file at {db or '(none)'}")
    try:
        engine = make_engine(url)
    except ValueError as e:  # DatabaseURLError
        raise VerifyUsageError(f"invalid database URL: {e}") from e
    try:
        return engine, list_logs(engine)
    except SQLAlchemyError as e:
        engine.dispose()
        raise VerifyUsageError(f"cannot read the decision log tables: {_db_error(e)}") from e


def _db_error(e: Exception) -> str:
    # SQLAlchemy messages embed the SQL and parameters; the first line is enough.
    return str(e).splitlines()[0] if str(e) else type(e).__name__
