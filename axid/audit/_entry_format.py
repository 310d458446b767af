"""The decision entry's fixed format: field names, limits, errors and timestamps.

What every part of the entry format shares (the one encoder and parser in
:mod:`axid.audit.entry`, the "clean" check in :mod:`axid.audit._entry_clean`);
imports no other entry module. Every name is re-exported by :mod:`axid.audit.entry`.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta

from axid.audit.errors import AuditError

__all__ = [
    "ENTRY_FIELDS",
    "ENTRY_VERSION",
    "MAX_CHAIN",
    "MAX_ENTRY_SIZE",
    "MAX_NOTE",
    "MAX_STR_LEN",
    "ZERO_HASH_HEX",
    "EntryError",
    "format_ts",
    "parse_ts",
]

ENTRY_FIELDS: tuple[str, ...] = (
    "v",
    "seq",
    "ts",
    "log",
    "decision",
    "reason",
    "method",
    "path",
    "service",
    "peer",
    "peer_cert",
    "kid",
    "jti",
    "iss",
    "tenant",
    "agent",
    "run",
    "spawn_parent",
    "chain",
    "scope_required",
    "rule",
    "note",
    "prev",
)
ENTRY_VERSION = 1
ZERO_HASH_HEX = "0" * 64
MAX_STR_LEN = 8192
MAX_CHAIN = 64
MAX_ENTRY_SIZE = 256 * 1024
MAX_NOTE = 2000  # the notes AXID's own services write (DecisionFields.cut_note)
_MAX_SEQ = 2**53 - 1  # RFC 8785 (I-JSON) integer range

# Set by the log itself (keyword arguments of canonical_entry), never by callers' fields.
_LOG_FIELDS = frozenset({"v", "seq", "ts", "log", "prev"})
_REQUIRED = frozenset({"decision", "reason"})
_OPTIONAL_STR = tuple(
    f for f in ENTRY_FIELDS if f not in _LOG_FIELDS and f not in _REQUIRED and f != "chain"
)
_DECISIONS = frozenset({"allow", "deny"})
_REASON_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_TS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z"
)
_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

# The caller's part of an entry (DecisionFields' fields, in this order).
_DECISION_FIELDS: tuple[str, ...] = tuple(f for f in ENTRY_FIELDS if f not in _LOG_FIELDS)
_DECISION_KEYS = frozenset(_DECISION_FIELDS)
_ENTRY_KEYS = frozenset(ENTRY_FIELDS)
# Longest log name DecisionFields reserves room for (the store's LOG_NAME_RE
# allows 64 ASCII characters); encode_entry checks the exact size regardless.
_RESERVED_LOG_LEN = 64


class EntryError(AuditError, ValueError):
    """An entry (or its fields) is malformed or not in canonical form."""


# --------------------------------------------------------------------------- timestamps


def format_ts(ms: int) -> str:
    """Unix milliseconds -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= _MAX_TS_MS:
        raise EntryError(f"timestamp out of range: {ms!r}")
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def parse_ts(ts: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` (exactly that form) -> Unix milliseconds."""
    m = _TS_RE.fullmatch(ts) if isinstance(ts, str) else None
    if m is None:
        raise EntryError(f"timestamp must be YYYY-MM-DDTHH:MM:SS.mmmZ, got {ts!r}")
    # ASCII digits only (the regex), so int() sees plain decimals.
    y, mo, d, h, mi, sec, frac = (int(g) for g in m.groups())
    try:
        # datetime refuses impossible dates, hour 24, minute/second 60 (leap seconds).
        dt = datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
    except ValueError as e:
        raise EntryError(f"invalid timestamp {ts!r}") from e
    ms = (dt - _EPOCH) // _ONE_MS + frac
    if ms < 0:
        raise EntryError(f"timestamp before 1970: {ts!r}")
    return ms


# Entries have one fixed set of ASCII keys, so their canonical order is fixed
# (for ASCII, UTF-16 code-unit order is Python's str order).
_SORTED_FIELDS: tuple[str, ...] = tuple(sorted(ENTRY_FIELDS))


# A commit batch stamps all its entries with one ts: check each distinct string
# once. Thread-safe; failures raise and are not cached.
_parse_ts_cached = functools.lru_cache(maxsize=64)(parse_ts)
