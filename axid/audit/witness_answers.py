"""What a witness answers to ``POST <url>/add-checkpoint`` (C2SP tlog-witness), as
:mod:`axid.audit.witnessing` reads it: the cosignature lines of a 200, the size of a
409, and the two ways a submission ends without cosignatures."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from axid.audit.cosignature import CosignatureError, WitnessKey, verify_cosignature
from axid.audit.note import Checkpoint
from axid.audit.store import StoreError, cosignature_key

__all__ = ["Refused", "Unreachable", "check_cosignatures", "first_line", "parse_size"]

_SIZE_RE: Final = re.compile(rb"(0|[1-9][0-9]{0,18})\n")
_SIZE_TYPE: Final = "text/x.tlog.size"


class Refused(Exception):
    """The witness refused (an ERROR and a counted refusal)."""


class Unreachable(Exception):
    """The witness could not be asked (a WARNING and a retry with backoff)."""


def check_cosignatures(
    data: bytes, checkpoint: Checkpoint, keys: Sequence[WitnessKey]
) -> tuple[list[bytes], str | None]:
    """The lines of a 200 answer that verify with ``keys``, and what was wrong.

    Lines by other keys are ignored (C2SP tlog-witness); a line claiming one of
    ``keys`` that does not verify, a malformed line, or no good line at all is
    a problem (a refusal); the good lines are kept anyway.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], "its answer is not UTF-8"
    if not text.endswith("\n"):
        return [], "its answer is not newline-terminated signature lines"
    known = {(k.name, k.key_id.hex()): k for k in keys}
    good: dict[tuple[str, str], bytes] = {}
    problems: list[str] = []
    for line in text[:-1].split("\n"):
        raw = (line + "\n").encode("utf-8")
        try:
            claimed = cosignature_key(raw)
        except StoreError:
            problems.append("a malformed signature line")
            continue
        key = known.get(claimed)
        if key is None:
            continue
        try:
            verify_cosignature(line + "\n", checkpoint, key)
        except CosignatureError:
            problems.append(f"a cosignature by {claimed[0]}+{claimed[1]} that does not verify")
            continue
        good.setdefault(claimed, raw)
    if not good and not problems:
        problems.append("no cosignature by its configured key(s)")
    return list(good.values()), "; ".join(problems) or None


def parse_size(ctype: str, data: bytes) -> int:
    media = ctype.split(";", 1)[0].strip().lower()
    m = _SIZE_RE.fullmatch(data)
    if media != _SIZE_TYPE or m is None:
        raise Refused(f"409 without a {_SIZE_TYPE} size: {first_line(data)}")
    return int(m.group(1))


def first_line(data: bytes) -> str:
    """The start of a witness's answer, safe to log."""
    text = data[:200].decode("utf-8", "replace").split("\n", 1)[0]
    return "".join(c if c.isprintable() else "?" for c in text)[:120] or "(empty)"
