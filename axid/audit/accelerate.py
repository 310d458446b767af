"""The auditor's accelerator: of a range of entries it says "clean", or nothing.

It reads a source's entries a chunk at a time and judges each chunk at once:
:func:`~axid.audit.entry.entries_clean` proves every entry canonical and
valid with one regular expression per entry (and that the entries continue
each other: consecutive seqs, one log, each ``prev`` the leaf hash of the
entry before); the chunk's leaf hashes and Merkle subtrees are hashed level by
level; stored seqs and leaf hashes are compared in one go; index columns are
found in the entry bytes. With several CPUs, forked workers
(:mod:`axid.audit.forkpool`) judge chunks in parallel; with a database, each
reads its chunks itself.

Its only output is a :class:`Clean` verdict, or none. It never sees the
findings: the reference pass (:mod:`axid.audit.reference`) takes a verdict
only where it continues exactly what the pass has read (checked by reading
the range's first entry itself), and reads everything else entry by entry.
A chunk with anything unusual in it (or a worker that fails, hangs or dies)
costs time, never a different report.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from array import array
from collections.abc import Callable, Generator, Iterator, Sequence
from functools import partial
from itertools import accumulate, islice, pairwise
from json.encoder import encode_basestring as _json_str  # the encoder entries are built with
from typing import Any, NamedTuple

from axid.audit.entry import EntryError, entries_clean, format_ts, parse_entry
from axid.audit.forkpool import ForkPool, in_order, usable_cpus
from axid.audit.merkle import HASH_SIZE
from axid.audit.sources import DatabaseSource

__all__ = ["Accelerator", "Chunk", "Clean", "check_chunk", "check_rows", "index_clean"]

# Entries per chunk. A power of two, so that every chunk starts at a multiple
# of its size and its subtrees are tree nodes.
_CHUNK = 2048
# Workers (workers=None): one per usable CPU, started once the log has proved
# long enough to repay the fork (so many chunks read).
_POOL_AFTER_CHUNKS = 8


class Clean(NamedTuple):
    """ "Entries ``start .. start + count - 1`` are clean": each is one
    :func:`~axid.audit.entry.parse_entry` accepts; entry ``i`` says seq ``i``,
    names the log the first one names and records as ``prev`` the leaf hash
    of entry ``i - 1``; the rows' stored seqs are their positions, their
    stored leaf hashes (if any) the entries' hashes, their index columns (if
    any) what the entries say.

    ``first`` is entry ``start``'s bytes, for the reference to read (so that
    it, not this claim, says whether the range continues its pass);
    ``layers[k]`` the range's perfect subtrees of ``2**k`` leaves, their
    hashes end to end (``layers[0]``: the leaf hashes).
    """

    start: int
    count: int
    first: bytes
    layers: list[bytes]


def check_chunk(start: int, datas: Sequence[bytes]) -> Clean | None:
    """The verdict on entries from position ``start`` (stored seqs, leaf hashes
    and index columns aside). Pure, so that a worker process can run it."""
    if not datas or type(datas[0]) is not bytes:
        return None
    try:
        first = parse_entry(datas[0])  # the log and prev the others must continue
    except EntryError:
        return None
    sha256 = hashlib.sha256
    lhs = [sha256(b"\x00" + d).digest() for d in datas]
    layer0 = b"".join(lhs)
    # Every link at once: entry i's prev is the hex of leaf hash i - 1.
    prevs = str(first["prev"]).encode() + binascii.hexlify(layer0[:-HASH_SIZE])
    if not entries_clean(datas, start=start, log=str(first["log"]), prevs=prevs):
        return None
    layers = [layer0]
    layer = lhs
    while len(layer) > 1:
        pairs = iter(layer)  # an odd last node has no sibling yet: zip drops it
        layer = [sha256(b"\x01" + a + b).digest() for a, b in zip(pairs, pairs, strict=False)]
        layers.append(b"".join(layer))
    return Clean(start, len(datas), datas[0], layers)


def stored_clean(start: int, seqs: Sequence[Any], stored: Sequence[Any], layer0: bytes) -> bool:
    """Stored seqs are the positions from ``start``; stored leaf hashes (if any) match."""
    m = len(seqs)
    if list(seqs) != list(range(start, start + m)):
        return False  # a gap, a duplicate or a swap
    if stored.count(None) == m:  # a source without stored hashes (a bundle)
        return True
    if set(map(type, stored)) != {bytes} or set(map(len, stored)) != {HASH_SIZE}:
        return False
    return hmac.compare_digest(b"".join(stored), layer0)


def check_rows(start: int, rows: list[Any]) -> Clean | None:
    """The verdict on source rows (:func:`check_chunk`, :func:`stored_clean`,
    :func:`index_clean`)."""
    try:
        seqs, datas, stored, *index = zip(*rows, strict=True)
    except (TypeError, ValueError):
        return None
    clean = check_chunk(start, datas)
    if (
        clean is None
        or not stored_clean(start, seqs, stored, clean.layers[0])
        or not index_clean(datas, index)
    ):
        return None
    return clean


# --------------------------------------------------------------------------- index columns


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


def index_clean(datas: Sequence[bytes], index: Sequence[Sequence[Any]]) -> bool:
    """The verdict on index columns: True only when every entry provably agrees
    with its columns (``index``: one tuple per column, empty for a bundle).

    Only for entries :func:`~axid.audit.entry.entries_clean` said are clean:
    RFC 8785 text with the fields in their fixed order, so a ``"`` not
    preceded by a backslash is a string delimiter and every key occurs once.
    Then ``X"KEY":V`` found in the bytes (X is ``{`` or ``,``, not a
    backslash, so that quote opens a string, one followed by ``:``, i.e. the
    key) means the value of KEY begins with V, and a complete JSON token V (a
    string encoded by :mod:`json`, or ``null``) that begins a value is that
    value. Anything else (a column of another type, say) is left to the
    reference (:func:`~axid.audit.columns.index_disagreements`).
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


# --------------------------------------------------------------------------- chunks


_UNSET: Any = object()
# A chunk's rows by column: stored seqs, datas, stored leaf hashes, index columns.
_Columns = tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...], list[tuple[Any, ...]]]


class Chunk:
    """Up to ``_CHUNK`` consecutive entries from ``start``: the rows read here
    (None when a worker read them), what reading raised after them, and the
    verdict on them (:meth:`verdict`)."""

    __slots__ = ("_cols", "clean", "count", "done", "exc", "rows", "start", "worker")

    def __init__(self, start: int, rows: list[Any] | None, exc: Exception | None, count: int):
        self.start = start
        self.rows = rows
        self.exc = exc
        self.count = count
        self.worker: int | None = None  # the worker judging it (see ForkPool)
        self.done = False  # whether ``clean`` holds the entries' verdict
        self.clean: Clean | None = None
        self._cols: Any = _UNSET

    @property
    def last(self) -> bool:
        return self.exc is not None or self.count < _CHUNK

    def answered(self, clean: Clean | None) -> None:
        """A worker's verdict (rows sent: :func:`check_chunk`; read itself: :func:`check_rows`)."""
        self.clean = clean
        self.done = True

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

    def verdict(self) -> Clean | None:
        """The chunk's verdict: :class:`Clean`, or None ("don't know")."""
        if self.rows is None:
            return self.clean  # a worker read the rows: its verdict, if it gave one
        cols = self.columns()
        if cols is None:
            return None
        seqs, datas, stored, index = cols
        if not self.done:
            self.answered(check_chunk(self.start, datas))
        clean = self.clean
        if (
            clean is None
            or not stored_clean(self.start, seqs, stored, clean.layers[0])
            or not index_clean(datas, index)
        ):
            return None
        return clean


class Accelerator:
    """The chunks of one pass over ``source``, each with a verdict to offer.

    ``workers``: forked worker processes (Linux); None, one per usable CPU
    when there are several, once the log has shown itself long; 0, none.
    """

    def __init__(self, source: Any, workers: int | None) -> None:
        self._source = source
        if workers is None:
            n = usable_cpus()
            self._plan = (n if n >= 2 else 0, _POOL_AFTER_CHUNKS)
        else:
            self._plan = (workers, 0)
        self._pool: ForkPool | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def ranged(self) -> Generator[Chunk, None, None]:
        """With workers on a database, the chunks they read and judge themselves.

        Worker ``k`` reads the rows with seq in ``[k * _CHUNK, (k + 1) * _CHUNK)``,
        which are the rows at those positions of the log's seq-ordered stream
        as long as every row before had seq == position (each clean chunk
        taken proves it for the next) and no seq is negative (checked here).
        From the first chunk not taken, the pass reads the rows itself
        (:meth:`chunks`). Nothing without workers or a database.
        """
        workers, after = self._plan
        src = self._source
        if not workers or not isinstance(src, DatabaseSource) or src.min_seq < 0:
            return
        end = src.end_seq
        if end < after * _CHUNK:
            return  # a small log: not worth a fork
        self._pool = ForkPool.start(workers, partial(_work, src.read_range), depth=2)
        if self._pool is None:
            return
        starts = iter(range(0, end, _CHUNK))

        def fetch() -> Chunk | None:
            start = next(starts, None)
            return None if start is None else Chunk(start, None, None, min(_CHUNK, end - start))

        yield from in_order(self._pool, fetch, self._submit_range)

    def chunks(self, entries: Iterator[Any], start: int) -> Iterator[Chunk]:
        """The entries from position ``start``, read here in chunks; with workers, judged there.

        Reading runs ahead of the pass (with workers, a few chunks are in
        flight), so what reading raises is kept with its chunk, for the pass
        to act on only where reading entry by entry would have met it.
        """

        def read() -> Chunk:
            nonlocal start
            rows: list[Any] = []
            exc: Exception | None = None
            try:
                for row in islice(entries, _CHUNK):
                    rows.append(row)
            except Exception as e:  # kept: raised where the pass reaches it
                exc = e
            chunk = Chunk(start, rows, exc, len(rows))
            start += len(rows)
            return chunk

        workers, after = self._plan
        k = 0
        while self._pool is None:
            if workers and k >= after:
                self._pool = ForkPool.start(workers, partial(_work, None), depth=1)
                workers = 0  # started, or no fork here: this process goes on alone
                continue
            chunk = read()
            yield chunk
            if chunk.last:
                return
            k += 1
        ended = False

        def fetch() -> Chunk | None:
            nonlocal ended
            if ended:
                return None
            chunk = read()
            ended = chunk.last
            return chunk

        yield from in_order(self._pool, fetch, self._submit_rows)

    def _submit_rows(self, chunk: Chunk) -> None:
        """Send a chunk's entries to a free worker (if they can go: else judged here)."""
        assert self._pool is not None
        cols = chunk.columns()
        if cols is None or not chunk.rows:
            return
        datas = cols[1]
        if set(map(type, datas)) != {bytes}:
            return
        lens = array("Q", map(len, datas)).tobytes()
        self._pool.submit(chunk, ("rows", chunk.start, lens), b"".join(datas))

    def _submit_range(self, chunk: Chunk) -> None:
        """Have a free worker read and judge the chunk's rows itself."""
        assert self._pool is not None
        self._pool.submit(chunk, ("range", chunk.start, chunk.count), None)


def _work(
    reader: Callable[[int, int], list[Any]] | None, task: tuple[str, int, Any], blob: bytes | None
) -> Clean | None:  # pragma: no cover - runs in a worker (coverage does not follow forks)
    """A worker's task: the verdict on entries sent (``rows``) or read here (``range``)."""
    kind, start, arg = task
    if kind == "rows" and blob is not None:
        sizes = array("Q")
        sizes.frombytes(arg)
        return check_chunk(start, [blob[a:b] for a, b in pairwise(accumulate(sizes, initial=0))])
    if kind == "range" and reader is not None:
        rows = reader(start, arg)
        return check_rows(start, rows) if len(rows) == arg else None
    return None
