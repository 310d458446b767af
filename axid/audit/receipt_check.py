"""The auditor's check of a receipt (:mod:`axid.audit.receipt`) against what the
log answers, and the two proof texts that answer carries.

The check (:func:`check_receipt`) is pure: it takes the receipt, the log's
verifier key and what the log answered (:class:`LogEvidence`: its latest signed
checkpoint, the C2SP ``tlog-proof`` of the entry at the receipt's size, the
consistency proof from the receipt's size to the latest, and, from a database,
the stored entry) and decides. The two proof texts are parsed by
:func:`parse_inclusion_proof` and :func:`parse_consistency_proof`.

Every error is a :class:`~axid.audit.receipt.ReceiptError`: a malformed proof
text, a receipt that is not this log's, or a log answer to another question than
the one asked. A log that answers the question but does not back the receipt is
not an error but a :class:`ReceiptFailure`, with both signed views.

With a witness quorum (:class:`~axid.audit.quorum.WitnessPolicy`), the
receipt's checkpoint must also be consistent with a checkpoint of the same or
a larger size cosigned by K of the given witnesses: the receipt's own (its
note carries the cosignatures: sync witnessing), the log's latest, or the
checkpoint :attr:`LogEvidence.witnessed` proves consistent with it. A
cosignature by a given witness key that does not verify, on any note the
check reads, is a failure (the note was altered).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from axid.audit.cosignature import CosignatureError
from axid.audit.merkle import HASH_SIZE, ProofError, verify_consistency, verify_inclusion
from axid.audit.note import MAX_NOTE_SIZE, Checkpoint, NoteError, NoteVerifier, open_checkpoint
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import Receipt, ReceiptError

__all__ = [
    "TLOG_PROOF_HEADER",
    "ConsistencyProof",
    "InclusionProof",
    "LogEvidence",
    "Missing",
    "ReceiptCheck",
    "ReceiptFailure",
    "ReceiptOk",
    "StoredEntry",
    "check_receipt",
    "open_receipt",
    "parse_consistency_proof",
    "parse_inclusion_proof",
]

TLOG_PROOF_HEADER: Final = "c2sp.org/tlog-proof@v1"
_MAX_INCLUSION_HASHES: Final = 64  # the longest path in a tree of at most 2**64-1 leaves
_MAX_CONSISTENCY_HASHES: Final = 63  # c2sp.org/tlog-witness: at most 63 proof lines
_MAX_PROOF_TEXT: Final = MAX_NOTE_SIZE + 8 * 1024
_MAX_TREE_SIZE: Final = 2**64 - 1
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]{0,19}")


# --------------------------------------------------------------------------- proof texts


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """A C2SP ``tlog-proof``: entry ``index``'s inclusion in the signed ``checkpoint``."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes  # the signed note, verbatim
    extra: bytes | None = None  # opaque, unauthenticated (c2sp.org/tlog-proof)


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """A consistency proof from size ``old`` to the signed ``checkpoint``.

    Its text is the C2SP tlog-witness ``add-checkpoint`` request form.
    """

    old: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes  # the signed note, verbatim


def parse_inclusion_proof(text: bytes) -> InclusionProof:
    """Parse a ``c2sp.org/tlog-proof@v1`` text strictly."""
    lines, note = _split_proof(text, "tlog-proof")
    if lines[0] != TLOG_PROOF_HEADER:
        raise ReceiptError(f"tlog-proof must start with {TLOG_PROOF_HEADER}")
    rest = lines[1:]
    extra = None
    if rest and rest[0].startswith("extra "):
        extra = _b64(rest[0].removeprefix("extra "), "tlog-proof extra data")
        rest = rest[1:]
    if not rest:
        raise ReceiptError("tlog-proof has no index line")
    index = _decimal(rest[0], "index ", "tlog-proof index")
    hashes = _hashes(rest[1:], _MAX_INCLUSION_HASHES, "tlog-proof")
    return InclusionProof(index, hashes, note, extra)


def parse_consistency_proof(text: bytes) -> ConsistencyProof:
    """Parse a consistency proof in the tlog-witness ``add-checkpoint`` form strictly."""
    lines, note = _split_proof(text, "consistency proof")
    old = _decimal(lines[0], "old ", "consistency proof old size")
    return ConsistencyProof(
        old, _hashes(lines[1:], _MAX_CONSISTENCY_HASHES, "consistency proof"), note
    )


def _split_proof(text: object, what: str) -> tuple[list[str], bytes]:
    """The head lines (ASCII) and the note after the first empty line."""
    if not isinstance(text, bytes) or len(text) > _MAX_PROOF_TEXT:
        raise ReceiptError(f"{what} is not bytes of acceptable size")
    head, sep, note = text.partition(b"\n\n")
    if not sep:
        raise ReceiptError(f"{what} has no empty line before its checkpoint")
    if not head.isascii():
        raise ReceiptError(f"{what} is not ASCII before its checkpoint")
    _check_note_form(note, what)
    return head.decode("ascii").split("\n"), note


def _check_note_form(note: bytes, what: str) -> None:
    if not note or len(note) > MAX_NOTE_SIZE or not note.endswith(b"\n"):
        raise ReceiptError(f"{what}: the checkpoint is empty, too large or lacks its final newline")
    try:
        note.decode("utf-8")
    except UnicodeDecodeError:
        raise ReceiptError(f"{what}: the checkpoint is not UTF-8") from None


def _decimal(line: str, prefix: str, what: str) -> int:
    digits = line.removeprefix(prefix)
    if digits == line or not _DECIMAL_RE.fullmatch(digits) or int(digits) > _MAX_TREE_SIZE:
        raise ReceiptError(f"{what}: want {prefix!r} and a decimal without leading zeros")
    return int(digits)


def _hashes(lines: list[str], limit: int, what: str) -> tuple[bytes, ...]:
    if len(lines) > limit:
        raise ReceiptError(f"{what} has more than {limit} hashes")
    hashes = tuple(_b64(line, f"{what} hash {i}") for i, line in enumerate(lines))
    if any(len(h) != HASH_SIZE for h in hashes):
        raise ReceiptError(f"{what}: every hash must be {HASH_SIZE} bytes")
    return hashes


def _b64(s: str, what: str) -> bytes:
    """Standard, padded, canonical base64 of at least one byte."""
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptError(f"{what} is not base64") from None
    if not raw or base64.b64encode(raw).decode("ascii") != s:
        raise ReceiptError(f"{what} is empty or not canonical base64")
    return raw


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True, slots=True)
class Missing:
    """The log had no answer where one was due (no checkpoint at that size, ...)."""

    why: str


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry row as a database stores it."""

    data: bytes
    leaf_hash: bytes


@dataclass(frozen=True, slots=True)
class LogEvidence:
    """What the log answered about a receipt of size M for entry seq.

    ``latest``: its latest signed checkpoint (size N); ``inclusion``: the
    tlog-proof of seq at size M; ``consistency``: the proof from M to N;
    ``entry``: the stored entry at seq, or None when the source serves no
    entries (the public read routes serve proofs only); ``witnessed``: for a
    witness quorum, the consistency proof from M to a checkpoint (its note with
    its cosignatures) the source offers as cosigned by the quorum, or None.
    """

    latest: bytes | Missing
    inclusion: InclusionProof | Missing
    consistency: ConsistencyProof | Missing
    entry: StoredEntry | Missing | None = None
    witnessed: ConsistencyProof | Missing | None = None


@dataclass(frozen=True, slots=True)
class ReceiptOk:
    """The log holds the entry at seq in the receipt's tree, and its latest tree extends it."""

    checkpoint: Checkpoint  # the receipt's, verified
    latest: Checkpoint  # the log's latest, verified
    latest_note: bytes
    # With a witness quorum: the cosigned checkpoint the receipt's is consistent with.
    witnessed: Checkpoint | None = None
    cosigners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceiptFailure:
    """The log does not back the receipt: what is wrong, and both signed views."""

    what: str
    receipt_note: bytes
    log_note: bytes | None  # the log's note the failure is about (as served), if any
    # The log holds the receipt, but no checkpoint cosigned by the witness quorum
    # extends it (not evidence of a rewrite: the witnesses may lag, or were bypassed).
    unwitnessed: bool = False


ReceiptCheck = ReceiptOk | ReceiptFailure


def open_receipt(receipt: Receipt, verifier: NoteVerifier) -> Checkpoint:
    """The receipt's checkpoint, verified with the log's key; else the receipt is not this log's."""
    receipt._check()
    try:
        return open_checkpoint(receipt.checkpoint, [verifier], origin=verifier.name)
    except NoteError as e:
        raise ReceiptError(f"not a receipt of log {verifier.name}: {e}") from None


def check_receipt(
    receipt: Receipt,
    verifier: NoteVerifier,
    evidence: LogEvidence,
    witnesses: WitnessPolicy | None = None,
) -> ReceiptCheck:
    """Does the log still hold exactly the receipted entry and extend the receipted checkpoint?

    With ``witnesses``, is the receipt's checkpoint also consistent with one
    cosigned by their quorum (see the module docstring)?

    Raises :class:`ReceiptError` when the receipt does not verify with
    ``verifier`` (it says nothing about this log) or the log answered another
    question than the one asked (another index or size).
    """
    mine = open_receipt(receipt, verifier)
    latest = _latest(evidence.latest, verifier)
    problem = (
        _rollback_problem(mine, latest)
        or _inclusion_problem(receipt, mine, verifier, evidence.inclusion)
        or _entry_problem(receipt, evidence.entry)
        or (latest if isinstance(latest, _Problem) else None)
    )
    if problem is None and isinstance(latest, _Signed):
        problem = _consistency_problem(mine, latest, verifier, evidence.consistency)
        if problem is None:
            ok = ReceiptOk(mine, latest.checkpoint, latest.note)
            if witnesses is None:
                return ok
            witnessed = _witnessed(receipt, ok, verifier, evidence, witnesses)
            if isinstance(witnessed, ReceiptOk):
                return witnessed
            problem = witnessed
    assert problem is not None  # latest is either _Signed (handled above) or a _Problem
    note = problem.note if problem.note is not None else _bytes_or_none(evidence.latest)
    return ReceiptFailure(problem.what, receipt.checkpoint, note, problem.unwitnessed)


class _Problem(NamedTuple):
    what: str
    note: bytes | None  # the log's note it is about, if any
    unwitnessed: bool = False  # held, but no witness quorum (not a rewrite)


class _Signed(NamedTuple):
    checkpoint: Checkpoint
    note: bytes


def _bytes_or_none(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _opened(note: bytes, verifier: NoteVerifier) -> Checkpoint | str:
    """The verified checkpoint, or why it does not verify."""
    try:
        return open_checkpoint(note, [verifier], origin=verifier.name)
    except NoteError as e:
        return str(e)


def _latest(note: bytes | Missing, verifier: NoteVerifier) -> _Signed | _Problem:
    if isinstance(note, Missing):
        return _Problem(f"the log serves no latest checkpoint: {note.why}", None)
    cp = _opened(note, verifier)
    if isinstance(cp, str):
        return _Problem(f"the log's latest checkpoint does not verify: {cp}", note)
    return _Signed(cp, note)


def _inclusion_problem(
    receipt: Receipt, mine: Checkpoint, verifier: NoteVerifier, proof: InclusionProof | Missing
) -> _Problem | None:
    """The log's tree at the receipt's size: the same signed root, the entry in it at seq."""
    where = f"entry {receipt.seq} at size {mine.size}"
    if isinstance(proof, Missing):
        return _Problem(f"the log gives no inclusion proof of {where}: {proof.why}", None)
    if proof.index != receipt.seq:
        raise ReceiptError(f"the log answered for entry {proof.index}, not {receipt.seq}")
    theirs = _opened(proof.checkpoint, verifier)
    if isinstance(theirs, str):
        return _Problem(
            f"the log's checkpoint of size {mine.size} does not verify: {theirs}", proof.checkpoint
        )
    if theirs.size != mine.size:
        raise ReceiptError(f"the log answered for size {theirs.size}, not {mine.size}")
    if not hmac.compare_digest(theirs.root, mine.root):
        return _Problem(
            f"fork: the log's signed checkpoint of size {mine.size} has another root "
            "than the receipt's signed checkpoint",
            proof.checkpoint,
        )
    try:
        verify_inclusion(receipt.seq, mine.size, receipt.leaf_hash, proof.hashes, mine.root)
    except ProofError as e:
        return _Problem(f"the log's tree no longer holds {where}: {e}", proof.checkpoint)
    return None


def _entry_problem(receipt: Receipt, stored: StoredEntry | Missing | None) -> _Problem | None:
    """The stored entry, when the source serves it: exactly the receipt's bytes and leaf."""
    if stored is None:
        return None
    if isinstance(stored, Missing):
        return _Problem(f"the log no longer stores entry {receipt.seq}: {stored.why}", None)
    same = stored.data == receipt.entry and hmac.compare_digest(stored.leaf_hash, receipt.leaf_hash)
    if not same:
        return _Problem(f"the log's stored entry {receipt.seq} is not the receipt's", None)
    return None


def _rollback_problem(mine: Checkpoint, latest: _Signed | _Problem) -> _Problem | None:
    """A verified latest checkpoint older than the receipt's: the log was rolled back."""
    if isinstance(latest, _Problem) or latest.checkpoint.size >= mine.size:
        return None
    return _Problem(
        f"rollback: the log's latest checkpoint (size {latest.checkpoint.size}) is older "
        f"than the receipt's (size {mine.size})",
        latest.note,
    )


def _consistency_problem(
    mine: Checkpoint, latest: _Signed, verifier: NoteVerifier, proof: ConsistencyProof | Missing
) -> _Problem | None:
    """The log's latest signed checkpoint (no older than the receipt's) extends the receipt's."""
    size = latest.checkpoint.size
    span = f"from size {mine.size} to {size}"
    if isinstance(proof, Missing):
        return _Problem(f"the log gives no consistency proof {span}: {proof.why}", latest.note)
    if proof.old != mine.size:
        raise ReceiptError(f"the log answered from size {proof.old}, not {mine.size}")
    theirs = _opened(proof.checkpoint, verifier)
    if isinstance(theirs, str):
        return _Problem(
            f"the log's checkpoint of size {size} does not verify: {theirs}", proof.checkpoint
        )
    if theirs.size != size:
        raise ReceiptError(f"the log answered to size {theirs.size}, not {size}")
    if theirs != latest.checkpoint:
        return _Problem(f"fork: the log signed two checkpoints of size {size}", proof.checkpoint)
    try:
        verify_consistency(mine.size, size, mine.root, latest.checkpoint.root, proof.hashes)
    except ProofError as e:
        return _Problem(
            f"the log's latest checkpoint does not extend the receipt's ({span}): {e}", latest.note
        )
    return None


# --------------------------------------------------------------------------- witnesses


def _witnessed(
    receipt: Receipt,
    ok: ReceiptOk,
    verifier: NoteVerifier,
    evidence: LogEvidence,
    policy: WitnessPolicy,
) -> ReceiptOk | _Problem:
    """The held receipt, with the cosigned checkpoint its checkpoint is consistent with.

    Every note the check read (and the one ``evidence.witnessed`` leads to) is
    searched for cosignatures by the given witnesses: all must verify, and that
    proof must hold if given. Notes of the receipt's size and root count
    together, and so do the notes of the latest checkpoint: cosignatures are
    over the checkpoint, not the note's other signature lines.
    """
    mine, latest = ok.checkpoint, ok.latest
    notes = [receipt.checkpoint, ok.latest_note]
    for proof in (evidence.inclusion, evidence.consistency):
        if not isinstance(proof, Missing):
            notes.append(proof.checkpoint)
    by_size: dict[int, set[str]] = {mine.size: set(), latest.size: set()}
    for note in notes:
        cp = _opened(note, verifier)
        if isinstance(cp, str):  # pragma: no cover - each was verified before
            return _Problem(f"the log's checkpoint does not verify: {cp}", note)
        names = _cosigners(note, cp, policy)
        if isinstance(names, _Problem):
            return names
        by_size.setdefault(cp.size, set()).update(names)
    other = _witnessed_proof(mine, verifier, evidence.witnessed, policy)
    if isinstance(other, _Problem):
        return other
    for cp in (mine, latest):
        if policy.met_by(by_size[cp.size]):
            return _ok_witnessed(ok, cp, by_size[cp.size], policy)
    if other is None:
        seen = ", ".join(
            f"{what} (size {cp.size}) by {', '.join(sorted(by_size[cp.size])) or 'none'}"
            for what, cp in (("the receipt's", mine), ("the log's latest", latest))
        )
        return _Problem(
            f"no checkpoint of size {mine.size} or more cosigned by {policy.describe()}: "
            f"cosigned are {seen}",
            ok.latest_note,
            unwitnessed=True,
        )
    return _ok_witnessed(ok, other[0], other[1], policy)


def _ok_witnessed(
    ok: ReceiptOk, cp: Checkpoint, names: set[str] | frozenset[str], policy: WitnessPolicy
) -> ReceiptOk:
    cosigners = tuple(sorted(set(names) & set(policy.names)))
    return ReceiptOk(ok.checkpoint, ok.latest, ok.latest_note, cp, cosigners)


def _cosigners(note: bytes, cp: Checkpoint, policy: WitnessPolicy) -> set[str] | _Problem:
    try:
        return set(policy.cosigners(note, cp))
    except CosignatureError as e:
        return _Problem(
            f"the log's checkpoint of size {cp.size} carries a witness cosignature that does "
            f"not verify: {e} (the note was altered, or the cosignature forged)",
            note,
        )


def _witnessed_proof(
    mine: Checkpoint,
    verifier: NoteVerifier,
    proof: ConsistencyProof | Missing | None,
    policy: WitnessPolicy,
) -> tuple[Checkpoint, frozenset[str]] | _Problem | None:
    """The checkpoint ``proof`` leads to, if it is cosigned by the quorum and extends
    the receipt's; None when there is no such proof."""
    if proof is None or isinstance(proof, Missing):
        return None
    if proof.old != mine.size:
        raise ReceiptError(f"the log answered from size {proof.old}, not {mine.size}")
    theirs = _opened(proof.checkpoint, verifier)
    if isinstance(theirs, str):
        return _Problem(
            f"the log's cosigned checkpoint does not verify: {theirs}", proof.checkpoint
        )
    if theirs.size < mine.size:
        raise ReceiptError(f"the log answered with size {theirs.size}, older than {mine.size}")
    names = _cosigners(proof.checkpoint, theirs, policy)
    if isinstance(names, _Problem):
        return names
    if not policy.met_by(names):
        return None
    try:
        verify_consistency(mine.size, theirs.size, mine.root, theirs.root, proof.hashes)
    except ProofError as e:
        return _Problem(
            f"fork: the log's checkpoint of size {theirs.size} cosigned by "
            f"{', '.join(sorted(names))} does not extend the receipt's: {e}",
            proof.checkpoint,
        )
    return theirs, frozenset(names)
