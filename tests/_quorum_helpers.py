"""Helpers for the witness-quorum tests: witnesses, cosigned notes, forged cosignatures.

Cosignatures are made with :class:`axid.audit.cosignature.WitnessSigner`, the
same code a witness signs with, and appended to the log's signed checkpoint
note after its own signature line (C2SP signed-note: one signature a line).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

from _audit_helpers import LogFx, pg_fx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey

from axid.audit.cosignature import WitnessSigner
from axid.audit.note import Checkpoint
from axid.audit.receipt import checkpoint_of
from axid.audit.store import LogStore

# Three witnesses; w1 has two keys (Ed25519 cosignature/v1 and ML-DSA-44 subtree/v1).
W1 = WitnessSigner("w1.example", Ed25519PrivateKey.generate())
W1_ML = WitnessSigner("w1.example", MLDSA44PrivateKey.generate())
W2 = WitnessSigner("w2.example", MLDSA44PrivateKey.generate())
W3 = WitnessSigner("w3.example", Ed25519PrivateKey.generate())
# Not given to the auditor: a witness it does not know, and one under w1's name
# with another key (an unknown key: C2SP says to ignore it).
STRANGER = WitnessSigner("w9.example", Ed25519PrivateKey.generate())
IMPOSTOR = WitnessSigner("w1.example", Ed25519PrivateKey.generate())


def vkey(signer: WitnessSigner) -> str:
    return signer.public().vkey()


def witness_args(*signers: WitnessSigner, quorum: int | None = None) -> list[str]:
    """``--witness VKEY`` for each signer, then ``--quorum K`` if given."""
    args = [a for s in signers for a in ("--witness", vkey(s))]
    return args + ([] if quorum is None else ["--quorum", str(quorum)])


def cosign(note: bytes, *signers: WitnessSigner, at: int | None = None) -> bytes:
    """``note`` with a cosignature line by each signer appended."""
    cp = checkpoint_of(note)
    ts = int(time.time()) if at is None else at
    return note + "".join(s.cosign(cp, ts) for s in signers).encode()


def forged_line(note: bytes, signer: WitnessSigner) -> bytes:
    """A line that claims ``signer``'s key (name and key ID) but does not verify on ``note``:
    the signer's genuine cosignature of another checkpoint (one entry larger)."""
    cp = checkpoint_of(note)
    other = Checkpoint(cp.origin, cp.size + 1, cp.root, cp.extensions)
    return signer.cosign(other, int(time.time())).encode()


def flipped_line(note: bytes, signer: WitnessSigner) -> bytes:
    """The signer's cosignature of ``note`` with one bit of its signature flipped."""
    line = signer.cosign(checkpoint_of(note), int(time.time()))
    prefix, b64 = line.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 0x01
    return f"{prefix} {base64.b64encode(bytes(blob)).decode()}\n".encode()


def garbage_line(name: str = "w8.example") -> bytes:
    """A well-formed signature line by an unknown key: random key ID and bytes."""
    return f"\u2014 {name} {base64.b64encode(os.urandom(76)).decode()}\n".encode()


def cosign_stored(fx: LogFx, size: int, *signers: WitnessSigner) -> None:
    """Store the signers' cosignatures on the log's checkpoint of ``size``
    (``LogStore.add_cosignatures``, the table the log's witnessing writes)."""
    note = fx.checkpoint(size)
    add_lines(fx, size, *(s.cosign(checkpoint_of(note), int(time.time())) for s in signers))


def add_lines(fx: LogFx, size: int, *lines: str | bytes) -> None:
    """Store cosignature lines as given (only their form is checked on the way in)."""
    LogStore(fx.engine, fx.log).add_cosignatures(size, list(lines))


def pg_quorum_fx(tmp: Path) -> Iterator[LogFx]:
    """:func:`pg_fx`, also removing the log's cosignature rows (before its checkpoints)."""
    gen = pg_fx(tmp)
    fx = next(gen)
    try:
        yield fx
    finally:
        fx.sql("DELETE FROM axid_audit_cosignature WHERE log = :log")
        next(gen, None)
