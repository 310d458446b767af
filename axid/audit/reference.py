"""The reference verification pass: the only code that decides a finding.

:class:`Pass` reads a log in order, entry by entry (:meth:`Pass._take_one`),
and every checkpoint at its size; see :mod:`axid.audit.verify` for what is
checked and how findings are attributed.

An accelerator (:mod:`axid.audit.accelerate`) may offer it a
:class:`~axid.audit.accelerate.Clean` verdict for a chunk of entries. The
pass takes one only while nothing has been found, and only where it continues
exactly what the pass has read: it reads the range's first entry itself
(:meth:`Pass._continues`: position, ``prev`` link, log name). Taking a range
adds no finding; it moves the pass as reading those clean entries one by one
would (the position, the last leaf hash, the Merkle tree), so checkpoints
inside it are checked against subtree hashes the accelerator computed.
Where a finding (or the root reported for the whole log) would rest on such
hashes while no verified checkpoint vouches for them (a root mismatch, a
broken link right after the range, an unsigned tail), the pass records
:attr:`Pass.doubt`, and :func:`~axid.audit.verify.verify_log`
runs it again with the accelerator held back to the entries the last verified
checkpoint covers: every reported finding is then made here, from bytes read
here or from hashes a signed root vouched for.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from axid.audit.columns import index_disagreements
from axid.audit.cosignature import CosignatureError
from axid.audit.entry import ZERO_HASH_HEX, EntryError, parse_entry
from axid.audit.findings import Findings, SourceFormatError
from axid.audit.merkle import HASH_SIZE, SubtreeEdge, leaf_hash
from axid.audit.note import Checkpoint, NoteError, NoteVerifier, open_checkpoint
from axid.audit.quorum import WitnessPolicy
from axid.audit.sources import LogSource
from axid.audit.witnessed import WitnessTally

if TYPE_CHECKING:
    from axid.audit.accelerate import Accelerator, Chunk, Clean

__all__ = ["Pass"]

_PROGRESS_EVERY = 1024
# After the first finding, read this many more entries: enough to attribute a
# broken chain link and to let an entry-level finding explain a root mismatch.
_WINDOW = 2


def _short(h: bytes) -> str:
    return h.hex()[:16] + "…"


class Pass:
    """State of one streaming verification pass (findings go to ``findings``).

    ``accelerator``: offers clean ranges (None: every entry is read here);
    ``limit``: only ranges that end at or before it are taken (None: any).
    """

    def __init__(
        self,
        source: LogSource,
        verifier: NoteVerifier,
        log_name: str | None,
        trusted: Checkpoint | None,
        findings: Findings,
        progress: Callable[[int], None] | None,
        policy: WitnessPolicy | None,
        accelerator: Accelerator | None,
        limit: int | None,
    ) -> None:
        self.source = source
        self.verifier = verifier
        self.origin = verifier.name
        self.trusted = trusted
        self.f = findings
        self.progress = progress
        self.accelerator = accelerator
        self.limit = limit
        self.cr = SubtreeEdge()
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
        # Clean ranges taken: where the last one ended; the doubt (see the module).
        self.fast_end = 0
        self.doubt: int | None = None
        # The witness quorum (see _check_cosignatures).
        self.tally = None if policy is None else WitnessTally(policy)

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

    def _doubt(self) -> None:
        """A finding rests on hashes of a clean range no verified checkpoint vouches for."""
        if self.doubt is None and self.fast_end > self.last_good:
            self.doubt = self.last_good

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
                self._doubt()
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
            self._doubt()
            self._found()
            return
        if self.tally is not None and not self._check_cosignatures(size, note, cp):
            return
        self.last_good = size
        self.latest = cp
        self.latest_note = note

    def _check_cosignatures(self, size: int, note: bytes, cp: Checkpoint) -> bool:
        """Every cosignature by a given witness key on a checkpoint that verified must
        verify (then it counts towards the quorum); False when one does not."""
        assert self.tally is not None
        try:
            self.tally.add(size, note, cp)
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
        if self.f.has_global():
            return False

        try:
            self._take_entries()
        finally:
            if self.accelerator is not None:
                self.accelerator.close()

        if self._pending is not None:
            self._resolve_link(self._pending, False, False)
        if self.progress is not None:
            self.progress(self.n)
        ended = self.stop_at is None or self.n <= self.stop_at
        return ended and not self.aborted

    def root(self) -> bytes:
        """The root of the entries read so far."""
        return self.cr.root()

    def _stopped(self) -> bool:
        return self.stop_at is not None and self.n > self.stop_at

    def _take_entries(self) -> None:
        """Take every entry (in chunks, with an accelerator); stop where the pass stops."""
        accel = self.accelerator
        source: Any = self.source
        if accel is None:
            self._take_plain(iter(source.entries()))
            return
        ranged = accel.ranged()
        try:
            for chunk in ranged:
                taken = self._take_clean(chunk)
                if taken is None:  # not clean here: read the rows from this one on
                    break
                if not taken:
                    return
        finally:
            ranged.close()  # collects what workers still hold
        entries = source.entries() if self.n == 0 else source.entries_from(self.n)
        for chunk in accel.chunks(iter(entries), self.n):
            if not self._take_chunk(chunk):
                return

    def _take_plain(self, entries: Iterator[Any]) -> None:
        """Every row, one by one: the pass without an accelerator."""
        while not self._stopped():
            try:
                row = next(entries, None)
            except SourceFormatError as e:
                self._source_error(e)
                self.aborted = True
                return
            if row is None:
                return
            self._take_row(row)

    def _take_chunk(self, chunk: Chunk) -> bool:
        """One chunk of rows read here: clean, or row by row; False when the pass stops."""
        rows = chunk.rows or []
        if rows:
            taken = self._take_clean(chunk)
            if taken is False:
                return False
            if taken:
                rows = []
        for row in rows:
            if self._stopped():
                return False
            self._take_row(row)
        if chunk.exc is not None:
            if self._stopped():
                return False
            if isinstance(chunk.exc, SourceFormatError):
                self._source_error(chunk.exc)
                self.aborted = True
                return False
            raise chunk.exc
        return not self._stopped()

    def _take_row(self, row: Sequence[Any]) -> None:
        self._take_one(*row)
        if self.progress is not None and self.n % _PROGRESS_EVERY == 0:
            self.progress(self.n)

    # ---- clean ranges

    def _take_clean(self, chunk: Chunk) -> bool | None:
        """Take a chunk as clean where its verdict says so and it continues the pass.

        None: not taken (its rows are for reading one by one); else whether the
        pass goes on after it.
        """
        start, count = chunk.start, chunk.count
        if (
            self.stop_at is not None
            or self._pending is not None
            or start != self.n
            or (self.limit is not None and start + count > self.limit)
        ):
            return None
        clean = chunk.verdict()
        if (
            clean is None
            or (clean.start, clean.count) != (start, count)
            or not clean.layers
            or len(clean.layers[0]) != count * HASH_SIZE
            or not self._continues(clean.first)
        ):
            return None
        return self._take_range(clean)

    def _continues(self, first: bytes) -> bool:
        """Whether entry ``first`` is the one this pass expects next: read here, it
        is valid, says seq n, records the last leaf hash as prev, names the log."""
        try:
            entry = parse_entry(first)
        except (EntryError, TypeError):
            return False
        want = ZERO_HASH_HEX if self._prev_hash is None else self._prev_hash.hex()
        if entry["seq"] != self.n or not hmac.compare_digest(str(entry["prev"]), want):
            return False
        if self._expected_log is None:
            self._expected_log = str(entry["log"])
        return entry["log"] == self._expected_log

    def _take_range(self, clean: Clean) -> bool:
        """Take a clean range, stopping at every checkpoint size in it.

        Exactly what entry by entry would do for entries that are all
        correct: only sizes with a (trusted) checkpoint need a root, and once
        a checkpoint fails, only up to ``stop_at``. False when the pass stops.
        """
        start, layers = clean.start, clean.layers
        end = start + clean.count
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
            pos = self.n = self.fast_end = cut
            i = (cut - 1 - start) * HASH_SIZE
            self._prev_hash = layers[0][i : i + HASH_SIZE]
            self._check_checkpoints_at_size()
        if self.progress is not None:
            self.progress(self.n)
        return not self._stopped()

    def _add_subtrees(self, layers: list[bytes], base: int, lo: int, hi: int) -> None:
        """Append leaves ``[lo, hi)`` of the range at ``base`` as their largest subtrees."""
        a, b = lo - base, hi - base
        while a < b:
            level = (a & -a).bit_length() - 1 if a else len(layers) - 1
            while 1 << level > b - a:
                level -= 1
            i = (a >> level) * HASH_SIZE
            self.cr.add(level, layers[level][i : i + HASH_SIZE])
            a += 1 << level

    # ---- entry by entry

    def _take_one(self, stored_seq: Any, data: Any, stored_lh: Any, *index: Any) -> None:
        """One row: ``(stored seq, entry bytes, stored leaf hash)``, then (from a
        database) the index columns in :data:`INDEX_COLUMNS` order."""
        p = self.n
        lh = leaf_hash(data)
        own_ok = self._check_stored_seq(p, stored_seq)
        entry: dict[str, Any] | None = None
        try:
            entry = parse_entry(data)
        except EntryError as e:
            own_ok = False
            self.f.add_exact(p, f"entry {p} is malformed: {e}")
        link_ok = True
        if entry is not None:
            want = ZERO_HASH_HEX if self._prev_hash is None else self._prev_hash.hex()
            link_ok = hmac.compare_digest(str(entry["prev"]), want)
            if not link_ok and p == self.fast_end:
                self._doubt()  # the hash it fails to match is the accelerator's
            own_ok = self._check_fields(p, entry, link_ok) and own_ok
        if stored_lh is not None and not hmac.compare_digest(stored_lh, lh):
            own_ok = False
            self.f.add_exact(
                p,
                f"entry {p} was altered: its bytes hash to {_short(lh)} but the stored "
                f"leaf hash is {_short(stored_lh)}",
            )
        if entry is not None and index:
            self._check_index(p, entry, index)
        self._check_link(p, own_ok, link_ok)
        self.cr.add(0, lh)
        self.n += 1
        self._prev_hash = lh
        self._prev_own_ok = own_ok
        self._check_checkpoints_at_size()

    def _check_stored_seq(self, p: int, stored_seq: Any) -> bool:
        """Whether the row at position ``p`` is stored under seq ``p``."""
        if stored_seq == p:
            return True
        if stored_seq > p:
            self.f.add_exact(p, f"entry {p} is missing: the next stored entry is seq {stored_seq}")
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
        return False

    def _check_fields(self, p: int, entry: Mapping[str, Any], link_ok: bool) -> bool:
        """Whether the entry's own seq and log fields are right for position ``p``."""
        ok = True
        fseq = entry["seq"]
        if fseq != p:
            ok = False
            if link_ok and self._prev_hash is not None:
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
            ok = False
            self.f.add_exact(
                p, f"entry {p} belongs to log {log_field!r}, not {self._expected_log!r}"
            )
        return ok

    def _check_index(self, p: int, entry: Mapping[str, Any], index: Sequence[Any]) -> None:
        wrong = index_disagreements(entry, index)
        if wrong:
            self.f.add_index(
                p,
                f"entry {p}'s row disagrees with its bytes: {'; '.join(wrong)} "
                "(its index columns or its bytes were edited in place)",
            )
            self._found(p)

    def _check_link(self, p: int, own_ok: bool, link_ok: bool) -> None:
        """Attribute broken chain links, with one entry of look-ahead (see verify)."""
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

    # ---- the end

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
        # The root reported for the whole log rests on every clean range's hashes.
        self._doubt()
