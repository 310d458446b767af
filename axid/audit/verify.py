"""Offline verification of a decision log: every byte, link, signature and root.

:func:`verify_log` makes ONE streaming pass over a :class:`LogSource` (an export
bundle directory or the database) and checks, in order of the log:

- each entry parses strictly (canonical RFC 8785, exact field set);
- its ``seq`` field equals its position and the seq it is stored under (so a
  gap, a duplicate, a swap or an insertion shows), its ``log`` field is the
  log's name, and a stored leaf hash (database) equals the recomputed one;
- its ``prev`` is the leaf hash of the entry before it (the hash chain);
- every checkpoint: signed by the log key, right origin, right size, and its
  root equals the root recomputed from the entries (which also makes successive
  checkpoints consistent); no checkpoint beyond the last entry, no entry after
  the last checkpoint (an unsigned tail);
- an auditor's *trusted* checkpoint (kept from an earlier run): its size must
  not exceed the log (else the log was truncated or rolled back) and its root
  must equal the recomputed root at its size (else the log forked).

Memory is O(log n) (a compact Merkle range) plus the checkpoint at hand.
The report names the FIRST bad seq. A broken chain link between two entries
is attributed with one entry of look-ahead: if entry ``k`` was altered, its
hash no longer matches ``prev`` of ``k + 1`` while ``k`` itself still links to
``k - 1``; if ``k``'s own ``prev`` was altered, both of its links break.

This module imports neither FastAPI nor the verifier: an auditor needs only it,
the pure modules and (for :class:`DatabaseSource`) the storage layer.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from axid.audit.entry import MAX_ENTRY_SIZE, ZERO_HASH_HEX, EntryError, parse_entry
from axid.audit.merkle import CompactRange, leaf_hash
from axid.audit.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteVerifier,
    open_checkpoint,
)

__all__ = [
    "DatabaseSource",
    "ExportDirSource",
    "Finding",
    "LogSource",
    "SourceFormatError",
    "VerifyReport",
    "VerifyUsageError",
    "load_vkey_arg",
    "verify_log",
]

_ORIGIN_PREFIX = "axid/"
_SIZE_NAME_RE = re.compile(r"0|[1-9][0-9]*")
_PROGRESS_EVERY = 1024
# After the first finding, read this many more entries: enough to attribute a
# broken chain link and to let an entry-level finding explain a root mismatch.
_WINDOW = 2
_MAX_VKEY_FILE = 4096


class LogSource(Protocol):
    """What the verifier reads. Sources may also offer ``log_name`` (str | None)
    and ``size_hint() -> int | None`` (for a progress bar); both are optional."""

    def entries(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        """``(stored seq, exact entry bytes, stored leaf hash or None)`` in log order."""
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


# --------------------------------------------------------------------------- findings


@dataclass
class _Candidate:
    finding: Finding
    kind: str  # "global" | "exact" | "range"
    lo: int  # first seq that may be bad
    hi: int  # range: exclusive end; exact: lo + 1
    order: int


class _Findings:
    """Collects findings during the pass and picks the first bad one at the end.

    Exact findings name one entry; range findings (a root mismatch) only say
    that some entry in ``[lo, hi)`` differs; global ones concern the whole log
    (wrong key, malformed bundle). An exact finding inside or before the first
    range explains it more precisely and wins.
    """

    def __init__(self) -> None:
        self._items: list[_Candidate] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add_global(self, what: str, *, checkpoint_size: int | None = None) -> None:
        self._add(Finding(None, checkpoint_size, what), "global", -1, -1)

    def add_exact(self, seq: int, what: str, *, checkpoint_size: int | None = None) -> None:
        self._add(Finding(seq, checkpoint_size, what), "exact", seq, seq + 1)

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
            (c for c in self._items if c.kind == "exact"),
            key=lambda c: (c.lo, c.order),
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
    ) -> None:
        self.source = source
        self.verifier = verifier
        self.origin = origin
        self.log_name = log_name
        self.trusted = trusted
        self.f = findings
        self.progress = progress
        self.cr = CompactRange()
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
        self.last_good = size
        self.latest = cp
        self.latest_note = note

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

        prev_hash: bytes | None = None
        prev_own_ok = True
        pending: int | None = None  # position whose link to its predecessor broke
        expected_log = self.log_name
        entries = iter(self.source.entries())
        while True:
            if self.stop_at is not None and self.n > self.stop_at:
                break
            try:
                item = next(entries, None)
            except SourceFormatError as e:
                self._source_error(e)
                self.aborted = True
                break
            if item is None:
                break
            stored_seq, data, stored_lh = item
            p = self.n
            lh = leaf_hash(data)
            own_ok = True
            if stored_seq != p:
                own_ok = False
                if stored_seq > p:
                    self.f.add_exact(
                        p, f"entry {p} is missing: the next stored entry is seq {stored_seq}"
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
                        self.f.add_exact(
                            p, f"entry {p} carries seq {fseq} (its seq field was altered)"
                        )
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
                if expected_log is None:
                    expected_log = log_field
                if log_field != expected_log:
                    own_ok = False
                    self.f.add_exact(
                        p, f"entry {p} belongs to log {log_field!r}, not {expected_log!r}"
                    )
            if stored_lh is not None and not hmac.compare_digest(stored_lh, lh):
                own_ok = False
                self.f.add_exact(
                    p,
                    f"entry {p} was altered: its bytes hash to {_short(lh)} but the stored "
                    f"leaf hash is {_short(stored_lh)}",
                )
            if pending is not None:
                self._resolve_link(pending, own_ok, link_ok)
                pending = None
            if own_ok and not link_ok and prev_own_ok:
                if p == 0:
                    self.f.add_exact(0, "entry 0 does not start the chain (prev is not zero)")
                else:
                    pending = p
            if not own_ok:
                self._found(p)

            self.cr.append(lh)
            self.n += 1
            prev_hash = lh
            prev_own_ok = own_ok
            if self.progress is not None and self.n % _PROGRESS_EVERY == 0:
                self.progress(self.n)
            self._check_checkpoints_at_size()

        if pending is not None:
            self._resolve_link(pending, False, False)
        if self.progress is not None:
            self.progress(self.n)
        ended = self.stop_at is None or self.n <= self.stop_at
        return ended and not self.aborted

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


def _origin_log_name(origin: str) -> str | None:
    return origin[len(_ORIGIN_PREFIX) :] if origin.startswith(_ORIGIN_PREFIX) else None


def verify_log(
    source: LogSource,
    *,
    vkey: str | None = None,
    trusted_checkpoint: bytes | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify a whole log in one streaming pass; see the module docstring.

    ``vkey`` is the auditor's trusted verifier key; without it the key stored
    with the log is used (and a warning says so: such a key is only as
    trustworthy as the log). Raises :class:`VerifyUsageError` for unreadable
    sources and bad arguments; tampering is reported, never raised.
    """
    findings = _Findings()
    warnings: list[str] = []
    try:
        return _verify(source, vkey, trusted_checkpoint, progress, findings, warnings)
    except OSError as e:
        raise VerifyUsageError(f"cannot read the log: {e}") from e


def _verify(
    source: LogSource,
    vkey: str | None,
    trusted_checkpoint: bytes | None,
    progress: Callable[[int], None] | None,
    findings: _Findings,
    warnings: list[str],
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

    run = _Pass(source, verifier, origin, log_name, trusted, findings, progress)
    ended = run.run()
    if ended and not run._has_global():
        run.finish()
    ok = not findings
    return report(
        entries=run.n,
        cps=run.cp_count,
        ok=ok,
        root=run.cr.root() if ended else None,
        latest=run.latest,
        latest_note=run.latest_note,
        key=verifier.vkey(),
    )


# --------------------------------------------------------------------------- sources


def load_vkey_arg(value: str) -> str:
    """A ``--vkey`` argument: the vkey itself, or a file holding it on one line."""
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
        value = line
    elif "+" not in value:
        raise VerifyUsageError(f"--vkey {value!r}: no such file, and not a vkey")
    try:
        NoteVerifier.from_vkey(value)
    except NoteError as e:
        raise VerifyUsageError(f"bad --vkey: {e}") from e
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
        try:
            f = self._entries.open("rb")
        except OSError as e:
            raise VerifyUsageError(f"cannot read {self._entries}: {e}") from e
        with f:
            seq = 0
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
        # Imported here so that bundle verification needs no database layer.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        from axid.audit.store import LogStore, list_logs, make_engine

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
            logs = list_logs(engine)
        except SQLAlchemyError as e:
            engine.dispose()
            raise VerifyUsageError(f"cannot read the decision log tables: {_db_error(e)}") from e
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
        )
        try:
            with store.engine.connect() as conn:
                max_seq, max_cp = conn.execute(q).one()
        except SQLAlchemyError as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e
        # Upper bounds of the cut: entries with seq < end_seq, checkpoints <= max_cp.
        self.end_seq = 0 if max_seq is None else int(max_seq) + 1
        self.max_cp = -1 if max_cp is None else int(max_cp)

    def _guard(self, it: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from it
        except self._sa_error as e:
            raise VerifyUsageError(f"cannot read the database: {_db_error(e)}") from e

    def size_hint(self) -> int | None:
        return self.end_seq

    def entries(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        return self._guard(iter(self.store.entries(0, self.end_seq)))

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        def upto() -> Iterator[tuple[int, bytes]]:
            for size, note in self.store.checkpoints():
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


def _db_error(e: Exception) -> str:
    # SQLAlchemy messages embed the SQL and parameters; the first line is enough.
    return str(e).splitlines()[0] if str(e) else type(e).__name__
