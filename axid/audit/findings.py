"""What an audit finds: :class:`Finding`, :class:`VerifyReport`, and the collector
that picks the first bad one.

Only the reference pass (:mod:`axid.audit.reference`) and the key checks of
:func:`axid.audit.verify.verify_log` add findings; the accelerator
(:mod:`axid.audit.accelerate`) never sees this collector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axid.audit.errors import AuditError
from axid.audit.note import Checkpoint

__all__ = [
    "Finding",
    "Findings",
    "SourceFormatError",
    "VerifyReport",
    "VerifyUsageError",
]


class VerifyUsageError(AuditError):
    """The log could not be read or the arguments are wrong (CLI exit 2)."""


class SourceFormatError(AuditError):
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


@dataclass
class _Candidate:
    finding: Finding
    kind: str  # "global" | "exact" | "index" | "range"
    lo: int  # first seq that may be bad
    hi: int  # range: exclusive end; exact: lo + 1
    order: int


class Findings:
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

    def has_global(self) -> bool:
        """Whether a finding concerns the whole log (then no entry is worth reading)."""
        return any(c.kind == "global" for c in self._items)

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
