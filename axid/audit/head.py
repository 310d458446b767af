"""The authenticated head: what a writer proves before it signs.

A signature only helps if the signer never signs a forgery. Before a writer
signs a checkpoint it proves, from what the database holds, that the database
extends the last checkpoint the writer itself signed or verified (its
*trusted head*, kept in memory and in the head file):

1. ``signature``: the database's latest checkpoint verifies with the log key;
2. ``complete``: its size is the number of stored entries (no unsigned tail),
   its root is the root recomputed from the stored tree nodes, and the last
   stored leaf is in that tree (new entries chain to it);
3. ``consistent``: it is the trusted head, or larger with an RFC 9162
   consistency proof (from the stored nodes) against the trusted root.

The checks are small pure functions (compute, then compare), as the Merkle
proofs are; :mod:`axid.audit.store` gathers their inputs under the log lock.
The head file helpers write the signed note atomically (temporary file, fsync,
rename), 0600.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from axid.audit.errors import AuditError
from axid.audit.merkle import ProofError, verify_consistency, verify_inclusion
from axid.audit.note import Checkpoint, NoteError, NoteVerifier, open_checkpoint

__all__ = [
    "IntegrityFailure",
    "check_complete",
    "check_extends",
    "check_last_leaf",
    "check_signed",
    "read_head_file",
    "write_head_file",
]

_MAX_HEAD_FILE: Final = 64 * 1024


class IntegrityFailure(AuditError):
    """The database does not extend the authenticated head: nothing may be signed."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


# --------------------------------------------------------------------------- checks


def check_signed(note: bytes | None, verifier: NoteVerifier, stored_size: int) -> Checkpoint | None:
    """Check 1: the database's latest checkpoint note verifies with the log key.

    ``None`` (no checkpoint) is acceptable only for an empty database.
    """
    if note is None:
        if stored_size:
            raise IntegrityFailure(
                "complete", f"{stored_size} entries are stored but no checkpoint signs them"
            )
        return None
    try:
        return open_checkpoint(note, [verifier], origin=verifier.name)
    except NoteError as e:
        raise IntegrityFailure("signature", f"latest checkpoint does not verify: {e}") from None


def check_complete(cp: Checkpoint, stored_size: int, stored_root: Callable[[], bytes]) -> None:
    """Check 2: the signed size is the stored size, the signed root the stored tree's.

    ``stored_root`` computes the root from the stored nodes, read only once the
    sizes agree.
    """
    if cp.size != stored_size:
        raise IntegrityFailure(
            "complete",
            f"latest checkpoint has size {cp.size} but {stored_size} entries are stored",
        )
    if not hmac.compare_digest(cp.root, stored_root()):
        raise IntegrityFailure(
            "complete", f"the stored tree nodes do not give the signed root of size {cp.size}"
        )


def check_last_leaf(cp: Checkpoint, last_leaf: bytes, proof: Sequence[bytes]) -> None:
    """Check 2, last part: new entries chain to a leaf that is in the signed tree."""
    try:
        verify_inclusion(cp.size - 1, cp.size, last_leaf, proof, cp.root)
    except ProofError as e:
        raise IntegrityFailure(
            "complete", f"the last stored entry is not leaf {cp.size - 1} of the signed tree: {e}"
        ) from None


def check_extends(
    trusted: Checkpoint | None, cp: Checkpoint | None, proof: Sequence[bytes]
) -> None:
    """Check 3: the database's checkpoint is the trusted head or extends it."""
    if trusted is None or trusted.size == 0:
        return
    size = 0 if cp is None else cp.size
    if cp is None or cp.size < trusted.size:
        raise IntegrityFailure(
            "consistent",
            f"the database's latest checkpoint has size {size}, older than the trusted "
            f"head of size {trusted.size}: rolled back",
        )
    if cp.size == trusted.size:
        if not hmac.compare_digest(cp.root, trusted.root):
            raise IntegrityFailure(
                "consistent", f"size {cp.size} has another root than the trusted head: forked"
            )
        return
    try:
        verify_consistency(trusted.size, cp.size, trusted.root, cp.root, proof)
    except ProofError as e:
        raise IntegrityFailure(
            "consistent",
            f"checkpoint {cp.size} is not consistent with the trusted head {trusted.size}: {e}",
        ) from None


# --------------------------------------------------------------------------- head file


def read_head_file(path: str | os.PathLike[str]) -> bytes | None:
    """The head file's signed note, or None if there is no file.

    Refuses a symbolic link or a file others may read or write (the head is
    only as trustworthy as the file).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077:
            raise IntegrityFailure("head", f"head file {path} is accessible to group or others")
        data = f.read(_MAX_HEAD_FILE + 1)
    if not data or len(data) > _MAX_HEAD_FILE:
        raise IntegrityFailure("head", f"head file {path} is empty or too large")
    return data


def write_head_file(path: str | os.PathLike[str], note: bytes) -> None:
    """Replace the head file with ``note`` atomically and durably (0600)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(note)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # No fsync of the directory: if a crash loses the rename, the previous head
    # comes back, which the database still extends (accepted), at the cost of one
    # fsync per batch less on the append path.
