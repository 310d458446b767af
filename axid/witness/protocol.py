"""C2SP tlog-witness ``add-checkpoint``: the request body and the decision, as pure code.

The body is parsed strictly (:func:`parse_body`), then checked in this order;
the first check that fails gives the answer:

1. parse: a malformed body, more than 63 proof lines, a tree size above
   2**63-1 (the storage's integer): 400;
2. origin: no configured log has the checkpoint's origin: 404
   (:func:`authenticate`);
3. signatures: a signature line by a trusted key (name and key ID) that does
   not verify, or none that verifies: 403 (:func:`authenticate`);
4. old size larger than the checkpoint's size: 400 (:func:`check_sizes`);
5. (under the origin's lock, against the stored latest cosigned checkpoint)
   old size other than the stored size: 409 with ``<stored size>\\n``
   (:func:`decide`);
6. a non-empty proof with old size 0, a size-0 checkpoint whose root is not
   the empty tree's, the stored size with another root, or a consistency proof
   that does not verify (RFC 9162 2.1.4.2): 422 (:func:`decide`);
7. else 200: the witness stores the checkpoint's size and root and cosigns it.

Every refusal in steps 5-6 that shows the log signed two views (all 422s, and
a 409 whose checkpoint has the stored size but another root) is marked as
evidence: it was validly signed by the log's key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from axid.audit.merkle import ProofError, empty_root, verify_consistency
from axid.audit.note import (
    MAX_SIGNATURES,
    Checkpoint,
    NoteError,
    NoteVerifier,
    is_valid_key_name,
)
from axid.witness.errors import WitnessError

__all__ = [
    "MAX_PROOF_LINES",
    "MAX_TREE_SIZE",
    "LogState",
    "Outcome",
    "Refusal",
    "Submission",
    "authenticate",
    "check_sizes",
    "decide",
    "parse_body",
]

MAX_PROOF_LINES: Final = 63  # tlog-witness: a client MUST NOT send more
MAX_TREE_SIZE: Final = 2**63 - 1  # stored as a signed 64-bit integer
_OLD_RE: Final = re.compile(r"old (0|[1-9][0-9]{0,19})")
_SIG_PREFIX: Final = "\u2014 "
_HASH_SIZE: Final = 32


class Refusal(WitnessError):
    """A refused submission: HTTP status and one short reason line."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Submission:
    """A parsed ``add-checkpoint`` body (signatures not yet verified)."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: Checkpoint
    text: bytes  # the note text: what the log's signature signs
    signatures: tuple[tuple[str, bytes, bytes], ...]  # (key name, key ID, signature)


@dataclass(frozen=True)
class LogState:
    """The latest checkpoint the witness cosigned for one origin (0 and the empty root
    when it never cosigned one) and the timestamp of that cosignature."""

    size: int
    root: bytes
    timestamp: int = 0

    @classmethod
    def initial(cls) -> LogState:
        return cls(0, empty_root(), 0)


@dataclass(frozen=True)
class Outcome:
    """What to answer, what to store (``new_state`` on 200) and whether to keep evidence."""

    status: int
    reason: str
    new_state: LogState | None = None
    evidence: bool = False
    latest_size: int | None = None  # the 409 body's size


# --------------------------------------------------------------------------- parsing


def _bad(reason: str) -> Refusal:
    return Refusal(400, reason)


def _b64_hash(line: str) -> bytes:
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("malformed body: proof line is not base64") from None
    if len(raw) != _HASH_SIZE or base64.b64encode(raw).decode("ascii") != line:
        raise _bad("malformed body: proof line is not one canonical base64 hash")
    return raw


def _signature_line(line: str) -> tuple[str, bytes, bytes]:
    if not line.startswith(_SIG_PREFIX):
        raise _bad("malformed body: signature line does not start with an em dash")
    name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not is_valid_key_name(name) or not b64.isascii():
        raise _bad("malformed body: signature line has no valid key name")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("malformed body: signature is not base64") from None
    if len(raw) < 5 or base64.b64encode(raw).decode("ascii") != b64:
        raise _bad("malformed body: signature is not canonical base64 of 5+ bytes")
    return name, raw[:4], raw[4:]


def _split_head(text: str) -> tuple[int, tuple[bytes, ...], str]:
    """``old N``, the proof lines and the empty line; returns the rest (the note)."""
    head, sep, note = text.partition("\n")
    m = _OLD_RE.fullmatch(head)
    if not sep or m is None:
        raise _bad("malformed body: first line must be 'old <size>'")
    old = int(m.group(1))
    proof: list[bytes] = []
    while True:
        line, sep, note = note.partition("\n")
        if not sep:
            raise _bad("malformed body: no empty line before the checkpoint")
        if not line:
            break
        if len(proof) == MAX_PROOF_LINES:
            raise _bad(f"more than {MAX_PROOF_LINES} consistency proof lines")
        proof.append(_b64_hash(line))
    return old, tuple(proof), note


def _split_note(note: str) -> tuple[str, tuple[tuple[str, bytes, bytes], ...]]:
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise _bad("malformed body: the checkpoint is not a signed note")
    text, block = note[: split + 1], note[split + 2 : -1]
    lines = block.split("\n") if block else []
    if not lines:
        raise _bad("malformed body: the checkpoint has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise _bad(f"malformed body: more than {MAX_SIGNATURES} signatures")
    sigs = tuple(_signature_line(line) for line in lines)
    if len({(name, kid) for name, kid, _ in sigs}) != len(sigs):
        raise _bad("malformed body: two signatures by one key")
    return text, sigs


def parse_body(body: bytes) -> Submission:
    """Parse an ``add-checkpoint`` body strictly; a :class:`Refusal` (400) if malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("malformed body: not UTF-8") from None
    if any(c < " " and c != "\n" for c in text):
        raise _bad("malformed body: control character other than newline")
    old, proof, note = _split_head(text)
    cp_text, sigs = _split_note(note)
    try:
        checkpoint = Checkpoint.parse(cp_text)
    except NoteError:
        raise _bad("malformed body: invalid checkpoint") from None
    if old > MAX_TREE_SIZE or checkpoint.size > MAX_TREE_SIZE:
        raise _bad(f"tree sizes above {MAX_TREE_SIZE} are not supported")
    return Submission(old, proof, checkpoint, cp_text.encode("utf-8"), sigs)


# --------------------------------------------------------------------------- checks


def authenticate(sub: Submission, logs: Mapping[str, Sequence[NoteVerifier]]) -> None:
    """404 for an unknown origin; 403 unless a trusted key's signature verifies and
    none by a trusted key fails (signatures by other keys are ignored)."""
    keys = logs.get(sub.checkpoint.origin)
    if keys is None:
        raise Refusal(404, "unknown log origin")
    known = {(k.name, k.key_id): k for k in keys}
    verified = False
    for name, kid, sig in sub.signatures:
        key = known.get((name, kid))
        if key is None:
            continue
        if not key.verify(sub.text, sig):
            raise Refusal(403, "a signature by a trusted log key does not verify")
        verified = True
    if not verified:
        raise Refusal(403, "no signature by a trusted log key")


def check_sizes(sub: Submission) -> None:
    """400 when the old size is larger than the checkpoint's size."""
    if sub.old_size > sub.checkpoint.size:
        raise _bad("old size is larger than the checkpoint size")


def decide(stored: LogState, sub: Submission, now: int) -> Outcome:
    """The answer to an authenticated submission given the stored latest checkpoint.

    ``now`` is the cosignature's timestamp; the stored one never goes backwards.
    """
    cp = sub.checkpoint
    if sub.old_size != stored.size:
        reason = "old size is not the latest cosigned size"
        fork = cp.size == stored.size and not hmac.compare_digest(cp.root, stored.root)
        if fork:
            reason += ", and the checkpoint has that size with another root"
        return Outcome(409, reason, evidence=fork, latest_size=stored.size)
    reason = _inconsistency(stored, sub)
    if reason is not None:
        return Outcome(422, reason, evidence=True)
    return Outcome(
        200, "cosigned", new_state=LogState(cp.size, cp.root, max(now, stored.timestamp))
    )


def _inconsistency(stored: LogState, sub: Submission) -> str | None:
    cp = sub.checkpoint
    if sub.old_size == 0 and sub.proof:
        return "non-empty consistency proof with old size 0"
    if cp.size == 0 and not hmac.compare_digest(cp.root, empty_root()):
        return "size-0 checkpoint with another root than the empty tree's"
    if cp.size == stored.size and not hmac.compare_digest(cp.root, stored.root):
        return "same size as the latest cosigned checkpoint with another root"
    try:
        verify_consistency(stored.size, cp.size, stored.root, cp.root, sub.proof)
    except ProofError:
        return "consistency proof does not verify"
    return None
