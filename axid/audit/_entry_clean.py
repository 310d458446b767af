"""Clean or don't know: :func:`entries_clean`, the entries' one-regex check.

Not a parser: it says only "clean" (bytes :func:`~axid.audit.entry.parse_entry`
accepts, saying what the caller expects) or "don't know". ``parse_entry``
uses it to skip the full check, the auditor's accelerator to vouch for whole
ranges at once. Re-exported by :mod:`axid.audit.entry`; imports only
:mod:`axid.audit._entry_format`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import filterfalse

from axid.audit._entry_format import (
    _DECISIONS,
    _ENTRY_KEYS,
    _MAX_SEQ,
    _OPTIONAL_STR,
    _REASON_RE,
    _SORTED_FIELDS,
    ENTRY_VERSION,
    MAX_CHAIN,
    MAX_STR_LEN,
    ZERO_HASH_HEX,
    EntryError,
    _parse_ts_cached,
)

__all__ = ["entries_clean"]


# --------------------------------------------------------------------------- clean or don't know

# The exact grammar of the bytes the template writes for a valid entry, as one
# regular expression over the fixed template. A JCS string: raw UTF-8 except
# quote, backslash and U+0000-U+001F; those only as the two-character escapes
# (\" \\ \b \f \n \r \t) or, for the other controls, \u00xx with lowercase
# hex. Every string it admits therefore decodes and re-encodes to the same
# bytes, as do the other values (``null``, ``seq`` in plain decimal, ``v``).
_SCAN_STR = (
    rb'"[^"\\\x00-\x1f]*+(?:\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f]))[^"\\\x00-\x1f]*+)*+"'
)
# The same without escapes: a string of bytes that need none (a positive
# byte class, which the regex engine matches faster). Nearly every entry
# matches this one; the others are matched against the full grammar.
_SCAN_STR_PLAIN = rb'"[ !#-\[\]-\xff]*+"'


def _scan_re(s: bytes, log: bytes) -> re.Pattern[bytes]:
    values: dict[str, bytes] = {
        "v": b"%d" % ENTRY_VERSION,
        "seq": rb"(0|[1-9][0-9]{0,15})",
        "ts": rb'"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z)"',
        # A log name with an escape is valid but left to the full check: the
        # group compared with an expected name is the name's bytes as they stand.
        "log": b'"(' + log + b')"',
        "prev": rb'"([0-9a-f]{64})"',
        "decision": rb'"(?:' + b"|".join(sorted(d.encode() for d in _DECISIONS)) + rb')"',
        "reason": b'"' + _REASON_RE.pattern.encode() + b'"',
        "chain": rb"\[(?:" + s + rb"(?:," + s + rb"){0,%d})?\]" % (MAX_CHAIN - 1),
        **{f: rb"(?:null|" + s + rb")" for f in _OPTIONAL_STR},
    }
    if values.keys() != _ENTRY_KEYS:  # pragma: no cover - a field without a grammar
        raise RuntimeError("scan grammar does not cover ENTRY_FIELDS")
    return re.compile(
        rb"\{" + b",".join(b'"%s":%s' % (k.encode(), values[k]) for k in _SORTED_FIELDS) + rb"\}"
    )


_SCAN_RE = _scan_re(_SCAN_STR, rb'[^"\\\x00-\x1f]++')
_SCAN_RE_PLAIN = _scan_re(_SCAN_STR_PLAIN, rb"[ !#-\[\]-\xff]++")
# entries_clean unpacks the capture groups in this (template) order.
if tuple(f for f in _SORTED_FIELDS if f in ("log", "prev", "seq", "ts")) != (
    "log",
    "prev",
    "seq",
    "ts",
):  # pragma: no cover
    raise RuntimeError("scan groups out of order")
_ZERO_HEX_B = ZERO_HASH_HEX.encode()


def entries_clean(
    datas: Sequence[bytes],
    *,
    start: int | None = None,
    log: str | None = None,
    prevs: bytes | None = None,
) -> bool:
    """Whether every entry is proven one :func:`parse_entry` accepts, saying what is expected.

    A check, not a parser: True means "clean", False only "don't know" (an
    entry may still be valid, e.g. one with an escape in its log name or
    longer than :data:`MAX_STR_LEN` bytes): the caller then asks
    :func:`parse_entry`, for the verdict and a precise error. Given, the
    expectations must hold too: entry ``i`` says ``seq`` ``start + i``, its
    ``log`` is ``log``, its ``prev`` is ``prevs[64 * i : 64 * (i + 1)]``
    (lowercase ASCII hex, all entries' end to end). It never says "clean" of
    what :func:`parse_entry` refuses:

    - the template and value grammar (``_SCAN_RE``) admit exactly the
      canonical encodings of the allowed types (so no duplicate, missing or
      reordered key, no whitespace, no float, no non-canonical escape) and
      the decision, reason, prev, ts and version formats;
    - ``len(data) <= MAX_STR_LEN`` bounds every decoded string to
      :data:`MAX_STR_LEN` characters (escapes only shrink) and the entry to
      :data:`MAX_ENTRY_SIZE`; the ``{0,63}`` repeat bounds ``chain``;
    - non-ASCII entries must decode as UTF-8 (which refuses surrogates);
    - ``_SCAN_RE_PLAIN``, tried first, is that grammar minus escapes;
    - the remaining rules are checked here: ``seq`` range, real calendar
      timestamps, and the zero ``prev`` exactly at seq 0.

    The grammar's groups are compared with the expectations here and never
    leave this function.
    """
    if not datas:
        return True
    if set(map(type, datas)) != {bytes} or max(map(len, datas)) > MAX_STR_LEN:
        return False
    plain, full = _SCAN_RE_PLAIN.fullmatch, _SCAN_RE.fullmatch
    try:
        for data in filterfalse(bytes.isascii, datas):
            data.decode("utf-8")
        rows = [(plain(d) or full(d)).groups() for d in datas]  # type: ignore[union-attr]
    except (UnicodeDecodeError, AttributeError):  # AttributeError: no match (None)
        return False
    logs, prev_hex, seq_digits, tss = (list(col) for col in zip(*rows, strict=True))
    seqs = list(map(int, seq_digits))  # plain ASCII decimal (the grammar)
    if max(seqs) > _MAX_SEQ or not _as_expected(logs, prev_hex, seqs, start, log, prevs):
        return False
    try:
        for ts in set(tss):
            _parse_ts_cached(ts.decode("ascii"))
    except EntryError:
        return False
    return not (
        (0 in seqs or _ZERO_HEX_B in prev_hex)
        and any((s == 0) != (p == _ZERO_HEX_B) for s, p in zip(seqs, prev_hex, strict=True))
    )


def _as_expected(
    logs: list[bytes],
    prev_hex: list[bytes],
    seqs: list[int],
    start: int | None,
    log: str | None,
    prevs: bytes | None,
) -> bool:
    """The grammar's groups (UTF-8 log names, hex prevs, seqs) against the expectations."""
    if start is not None and seqs != list(range(start, start + len(seqs))):
        return False
    if log is not None:
        try:
            want = log.encode("utf-8")  # a name with an escape never matches: don't know
        except (AttributeError, UnicodeEncodeError):
            return False
        if logs.count(want) != len(logs):
            return False
    return prevs is None or b"".join(prev_hex) == prevs
