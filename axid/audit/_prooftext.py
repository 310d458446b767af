"""Proofs as text: C2SP ``tlog-proof`` and the tlog-witness consistency request.

Pure (no storage); re-exported by :mod:`axid.audit.store`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from axid.audit.merkle import HASH_SIZE

__all__ = ["PROOF_HEADER", "consistency_text", "proof_text"]

PROOF_HEADER = "c2sp.org/tlog-proof@v1"


def proof_text(seq: int, proof: Sequence[bytes], note: bytes) -> str:
    """A C2SP ``tlog-proof`` (c2sp.org/tlog-proof@v1) for entry ``seq``.

    Header line, ``index N``, the inclusion proof (leaf's sibling first, one
    base64 hash a line), an empty line, then the signed checkpoint verbatim.
    """
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"invalid entry index {seq!r}")
    lines = [PROOF_HEADER, f"index {seq}", *(_b64_hash(h, i) for i, h in enumerate(proof))]
    return "\n".join(lines) + "\n\n" + _note_text(note)


def consistency_text(old: int, proof: Sequence[bytes], note: bytes) -> str:
    """A consistency proof in the C2SP tlog-witness ``add-checkpoint`` request form.

    ``old M``, the RFC 9162 consistency proof from size M to the checkpoint's
    size (one base64 hash a line), an empty line, the signed checkpoint verbatim.
    """
    if not isinstance(old, int) or isinstance(old, bool) or old < 0:
        raise ValueError(f"invalid old size {old!r}")
    lines = [f"old {old}", *(_b64_hash(h, i) for i, h in enumerate(proof))]
    return "\n".join(lines) + "\n\n" + _note_text(note)


def _b64_hash(h: object, i: int) -> str:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise ValueError(f"proof[{i}] is not a {HASH_SIZE}-byte hash")
    return base64.b64encode(h).decode("ascii")


def _note_text(note: bytes) -> str:
    try:
        cp = note.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("checkpoint note is not UTF-8") from e
    if not cp.endswith("\n"):
        raise ValueError("checkpoint note must end with a newline")
    return cp
