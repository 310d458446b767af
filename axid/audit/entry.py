"""Decision-log entries: building and strictly parsing their canonical bytes.

An entry is the RFC 8785 (JCS) canonical JSON of an object holding exactly
:data:`ENTRY_FIELDS`; those bytes are what gets hashed (leaf hash =
SHA-256(0x00 || bytes)) and exported, one per line, in ``entries.jsonl``.

Field types (``None`` is JSON ``null``):

====================  =========================================================
``v``                 int, always 1
``seq``               int, 0-based position in the log (<= 2**53 - 1, JCS range)
``ts``                str, RFC 3339 UTC with exactly milliseconds:
                      ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (sorts lexicographically)
``log``               str, the log name
``decision``          ``"allow"`` or ``"deny"`` (required)
``reason``            str, a reason code ``[a-z0-9][a-z0-9_.:-]{0,63}`` (required)
``chain``             list of str (default ``[]``)
``prev``              str, 64 lowercase hex: leaf hash of entry ``seq - 1``;
                      :data:`ZERO_HASH_HEX` for seq 0 and only for seq 0
every other field     str or ``None`` (default ``None``): ``method``, ``path``,
                      ``service``, ``peer``, ``peer_cert``, ``kid``, ``jti``,
                      ``iss``, ``tenant``, ``agent``, ``run``, ``spawn_parent``,
                      ``scope_required`` (space-delimited actions), ``rule``,
                      ``note``
====================  =========================================================

Strings must be valid Unicode (no lone surrogates) and at most
:data:`MAX_STR_LEN` characters; ``chain`` holds at most :data:`MAX_CHAIN`
items; a whole entry is at most :data:`MAX_ENTRY_SIZE` bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime

import rfc8785

__all__ = [
    "ENTRY_FIELDS",
    "ENTRY_VERSION",
    "MAX_CHAIN",
    "MAX_ENTRY_SIZE",
    "MAX_STR_LEN",
    "ZERO_HASH_HEX",
    "EntryError",
    "canonical_entry",
    "format_ts",
    "parse_entry",
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
_TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


class EntryError(ValueError):
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
    if not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
        raise EntryError(f"timestamp must be YYYY-MM-DDTHH:MM:SS.mmmZ, got {ts!r}")
    try:
        dt = datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError as e:
        raise EntryError(f"invalid timestamp {ts!r}") from e
    ms = int(dt.timestamp()) * 1000 + int(ts[20:23])
    if ms < 0:
        raise EntryError(f"timestamp before 1970: {ts!r}")
    return ms


# --------------------------------------------------------------------------- validation


def _check_str(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        want = "str or None" if optional else "str"
        raise EntryError(f"field {name!r} must be {want}, got {type(value).__name__}")
    if len(value) > MAX_STR_LEN:
        raise EntryError(f"field {name!r} longer than {MAX_STR_LEN} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EntryError(f"field {name!r} is not valid Unicode") from e


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EntryError(f"field {name!r} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise EntryError(f"field {name!r} out of range: {value}")


def _validate(entry: Mapping[str, object]) -> None:
    """Check every field's type and value; ``entry`` holds exactly ENTRY_FIELDS."""
    if type(entry["v"]) is not int or entry["v"] != ENTRY_VERSION:
        raise EntryError(f"unsupported entry version {entry['v']!r}")
    _check_int("seq", entry["seq"], 0, _MAX_SEQ)
    ts = entry["ts"]
    if not isinstance(ts, str):
        raise EntryError("field 'ts' must be str")
    parse_ts(ts)
    _check_str("log", entry["log"], optional=False)
    if not entry["log"]:
        raise EntryError("field 'log' is empty")
    if not isinstance(entry["decision"], str) or entry["decision"] not in _DECISIONS:
        raise EntryError(f"field 'decision' must be 'allow' or 'deny', got {entry['decision']!r}")
    reason = entry["reason"]
    if not isinstance(reason, str) or not _REASON_RE.fullmatch(reason):
        raise EntryError(f"field 'reason' is not a reason code: {reason!r}")
    for name in _OPTIONAL_STR:
        _check_str(name, entry[name], optional=True)
    chain = entry["chain"]
    if not isinstance(chain, list):
        raise EntryError(f"field 'chain' must be a list, got {type(chain).__name__}")
    if len(chain) > MAX_CHAIN:
        raise EntryError(f"field 'chain' has more than {MAX_CHAIN} items")
    for i, run in enumerate(chain):
        _check_str(f"chain[{i}]", run, optional=False)
    prev = entry["prev"]
    if not isinstance(prev, str) or not _HEX64_RE.fullmatch(prev):
        raise EntryError("field 'prev' must be 64 lowercase hex digits")
    # The chain starts at seq 0 and only there; an all-zero hash elsewhere
    # would be a forged chain start (SHA-256 never yields it in practice).
    if (entry["seq"] == 0) != (prev == ZERO_HASH_HEX):
        raise EntryError("field 'prev' must be the zero hash exactly when seq is 0")


def canonical_entry(
    fields: Mapping[str, object], *, seq: int, prev: str, log: str, ts: int | str
) -> bytes:
    """Build the canonical (JCS) bytes of one entry.

    ``fields`` holds the decision fields (``decision`` and ``reason`` required,
    the others optional, defaulting to ``None`` or ``[]`` for ``chain``);
    ``v``, ``seq``, ``ts``, ``log`` and ``prev`` come from the log, as keywords.
    ``ts`` is Unix milliseconds (int) or the canonical timestamp string.
    """
    if not isinstance(fields, Mapping):
        raise EntryError("fields must be a mapping")
    for key in fields:
        if not isinstance(key, str) or key not in ENTRY_FIELDS:
            raise EntryError(f"unknown entry field {key!r}")
        if key in _LOG_FIELDS:
            raise EntryError(f"field {key!r} is set by the log, not by the caller")
    missing = _REQUIRED - fields.keys()
    if missing:
        raise EntryError(f"missing required field(s): {', '.join(sorted(missing))}")
    if isinstance(ts, int) and not isinstance(ts, bool):
        ts = format_ts(ts)
    entry: dict[str, object] = {name: None for name in ENTRY_FIELDS}
    entry["chain"] = []
    entry.update(fields)
    if isinstance(entry["chain"], list | tuple):
        entry["chain"] = list(entry["chain"])  # a tuple is a fine way to pass a chain
    entry.update(v=ENTRY_VERSION, seq=seq, ts=ts, log=log, prev=prev)
    _validate(entry)
    try:
        data = rfc8785.dumps(entry)
    except rfc8785.CanonicalizationError as e:  # unreachable after _validate; fail closed
        raise EntryError("entry cannot be canonicalized") from e
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryError(f"entry larger than {MAX_ENTRY_SIZE} bytes")
    return data


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for k, v in pairs:
        if k in obj:
            raise EntryError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _no_constants(name: str) -> object:
    raise EntryError(f"non-JSON number {name}")


def parse_entry(data: bytes) -> dict[str, object]:
    """Parse entry bytes; they must be exactly the canonical form of a valid entry."""
    if not isinstance(data, bytes):
        raise TypeError(f"entry must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryError(f"entry larger than {MAX_ENTRY_SIZE} bytes")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except EntryError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise EntryError("entry is not valid UTF-8 JSON") from e
    if not isinstance(obj, dict):
        raise EntryError("entry is not a JSON object")
    if set(obj) != set(ENTRY_FIELDS):
        extra = sorted(set(obj) - set(ENTRY_FIELDS))
        missing = sorted(set(ENTRY_FIELDS) - set(obj))
        raise EntryError(f"entry fields differ: unknown {extra}, missing {missing}")
    _validate(obj)
    try:
        canonical = rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as e:
        raise EntryError("entry cannot be canonicalized") from e
    if canonical != data:
        raise EntryError("entry is not in RFC 8785 canonical form")
    return obj
