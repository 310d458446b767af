"""Decision-log entries: building and strictly parsing their canonical bytes.

The entry format's one encoder, its one parser and :class:`DecisionFields`
live here, side by side, so a reader can check that they agree; the field
names, limits, :class:`EntryError` and the timestamp helpers are in
:mod:`axid.audit._entry_format`, and :func:`entries_clean` (the one-regex
"clean" check) in :mod:`axid.audit._entry_clean`. Every name is importable
from here.

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

Inside AXID a decision is one typed value, :class:`DecisionFields`: the
caller's part of an entry, checked once, when it is made (a mapping of the
entry's field names becomes one with :meth:`DecisionFields.from_mapping`).
Hot path: :class:`~axid.audit.log.DecisionLog` gets or makes one before
queueing it; the commit batch then only adds the log's fields and
serialises (:func:`encode_entry`). :data:`MAX_NOTE` and
:meth:`DecisionFields.cut_note` are the one rule for the length of the
notes AXID's own services write.

ONE encoder: it fills a fixed template (the keys in canonical order) with
values escaped by the standard library's JSON string encoder (C-accelerated,
the one ``json.dumps`` uses), which for this schema (ASCII keys; values str,
None, int within the JCS range, list of str) gives exactly the RFC 8785
bytes: ASCII keys sort the same by UTF-16 code units as by code points,
integers print the same, and the string escaping is ECMAScript
``JSON.stringify``'s: quote, backslash, backspace, form feed, newline,
carriage return and tab as two-character escapes, the other controls
U+0000-U+001F as six-character escapes with lowercase hex, everything else
(U+007F and U+2028/U+2029 included) as raw UTF-8; lone surrogates never get
that far (validation refuses them). ``rfc8785`` is the oracle, not a second
encoder: the equivalence is checked at import (importing fails if it ever
does not hold) and property-tested.

ONE parser: :func:`parse_entry` reads the bytes with one strict JSON decoder
(no duplicate keys, no NaN or Infinity) and then requires them to be exactly
the canonical encoding of a valid entry. :func:`entries_clean` is not a
parser: it answers only "clean" (these bytes are entries ``parse_entry``
accepts, saying what the caller expects) or "don't know", from one regular
expression per entry; ``parse_entry`` uses it to skip the full check, and
the auditor's accelerator to vouch for whole ranges of entries at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str  # C version when available

import rfc8785

from axid._json import strict_loads
from axid.audit._entry_clean import entries_clean
from axid.audit._entry_format import (
    _DECISION_FIELDS,
    _DECISION_KEYS,
    _DECISIONS,
    _ENTRY_KEYS,
    _HEX64_RE,
    _LOG_FIELDS,
    _MAX_SEQ,
    _MAX_TS_MS,
    _OPTIONAL_STR,
    _REASON_RE,
    _RESERVED_LOG_LEN,
    _SORTED_FIELDS,
    ENTRY_FIELDS,
    ENTRY_VERSION,
    MAX_CHAIN,
    MAX_ENTRY_SIZE,
    MAX_NOTE,
    MAX_STR_LEN,
    ZERO_HASH_HEX,
    EntryError,
    _parse_ts_cached,
    format_ts,
    parse_ts,
)

__all__ = [
    "ENTRY_FIELDS",
    "ENTRY_VERSION",
    "MAX_CHAIN",
    "MAX_ENTRY_SIZE",
    "MAX_NOTE",
    "MAX_STR_LEN",
    "ZERO_HASH_HEX",
    "DecisionFields",
    "EntryError",
    "canonical_entry",
    "encode_entry",
    "entries_clean",
    "format_ts",
    "parse_entry",
    "parse_ts",
]


# --------------------------------------------------------------------------- validation


def _exact_str(value: str) -> str:
    # A str subclass (e.g. a StrEnum member) becomes the plain str of its
    # characters: what is checked is what gets encoded, whatever its methods do.
    return value if type(value) is str else str.__str__(value)


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise EntryError(f"field {name!r} must be str, got {type(value).__name__}")
    value = _exact_str(value)
    if len(value) > MAX_STR_LEN:
        raise EntryError(f"field {name!r} longer than {MAX_STR_LEN} characters")
    if not value.isascii():  # isascii() is O(1); only non-ASCII text can hold a surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EntryError(f"field {name!r} is not valid Unicode") from e
    return value


def _check_opt_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EntryError(f"field {name!r} must be str or None, got {type(value).__name__}")
    return _check_str(name, value)


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EntryError(f"field {name!r} must be an int, got {type(value).__name__}")
    value = int(value)  # an int subclass becomes a plain int
    if not lo <= value <= hi:
        raise EntryError(f"field {name!r} out of range: {value}")
    return value


# Positions in DecisionFields' values (the _DECISION_FIELDS order).
_OPTIONAL_IDX = tuple((_DECISION_FIELDS.index(f), f) for f in _OPTIONAL_STR)
_CHAIN_IDX = _DECISION_FIELDS.index("chain")


def _checked_values(values: Sequence[object]) -> list[object]:
    """The caller's values (the _DECISION_FIELDS order) checked and normalised:
    plain ``str``/``None``, ``chain`` a tuple of plain ``str``."""
    out = list(values)
    decision, reason = out[0], out[1]
    if not isinstance(decision, str) or _exact_str(decision) not in _DECISIONS:
        raise EntryError(f"field 'decision' must be 'allow' or 'deny', got {decision!r}")
    out[0] = _exact_str(decision)
    if not isinstance(reason, str) or not _REASON_RE.fullmatch(_exact_str(reason)):
        raise EntryError(f"field 'reason' is not a reason code: {reason!r}")
    out[1] = _exact_str(reason)
    for i, name in _OPTIONAL_IDX:
        value = out[i]
        # Fast path for the usual None or plain ASCII str (isascii() is O(1)).
        if value is not None and (
            type(value) is not str or not value.isascii() or len(value) > MAX_STR_LEN
        ):
            out[i] = _check_opt_str(name, value)
    chain = out[_CHAIN_IDX]
    if not isinstance(chain, list | tuple):
        raise EntryError(f"field 'chain' must be a list, got {type(chain).__name__}")
    if len(chain) > MAX_CHAIN:
        raise EntryError(f"field 'chain' has more than {MAX_CHAIN} items")
    out[_CHAIN_IDX] = tuple([_check_str(f"chain[{i}]", run) for i, run in enumerate(chain)])
    return out


def _given(fields: Mapping[str, object]) -> dict[str, object]:
    """A private copy of a caller's mapping; unknown, log-set and missing required
    fields refused."""
    if type(fields) is dict:
        given = fields.copy()
    elif isinstance(fields, Mapping):
        given = dict(fields.items())  # the caller's mapping is read once
    else:
        raise EntryError("fields must be a mapping")
    if not given.keys() <= _DECISION_KEYS:
        for key in given:  # name the first offender
            if not isinstance(key, str) or key not in _ENTRY_KEYS:
                raise EntryError(f"unknown entry field {key!r}")
            if key in _LOG_FIELDS:
                raise EntryError(f"field {key!r} is set by the log, not by the caller")
    missing = [k for k in ("decision", "reason") if k not in given]
    if missing:
        raise EntryError(f"missing required field(s): {', '.join(missing)}")
    return given


# --------------------------------------------------------------------------- the caller's fields

_set = object.__setattr__  # DecisionFields is frozen: its fields are set once, in _setup
# Every caller field with its default, in DecisionFields' order (a mapping's
# values, merged over these, come out in that order).
_DEFAULTS: dict[str, object] = {**dict.fromkeys(_DECISION_FIELDS), "chain": ()}


@dataclass(frozen=True, slots=True, init=False)
class DecisionFields:
    """One decision as the log records it: exactly the caller's part of an entry.

    Typed, validated and immutable: the constructor checks every field with the
    entry format's rules (the module docstring) and raises :class:`EntryError`;
    ``decision`` and ``reason`` are required, the others default to ``None``
    (``chain`` to ``()``). What it holds is what gets encoded: plain ``str``
    (a ``str`` subclass becomes the plain string of its characters) or
    ``None``, and ``chain`` a tuple of plain ``str`` (a list is accepted). It
    also guarantees the entry fits :data:`MAX_ENTRY_SIZE` for any log name of
    up to 64 ASCII characters (every name the store accepts). The log adds its
    own fields (``v``, ``seq``, ``ts``, ``log``, ``prev``) when it commits
    (:func:`encode_entry`).

    It keeps its values' JSON text, in canonical order, for the encoder: a
    commit batch only fills in the log's fields.
    """

    decision: str
    reason: str
    method: str | None = None
    path: str | None = None
    service: str | None = None
    peer: str | None = None
    peer_cert: str | None = None
    kid: str | None = None
    jti: str | None = None
    iss: str | None = None
    tenant: str | None = None
    agent: str | None = None
    run: str | None = None
    spawn_parent: str | None = None
    chain: tuple[str, ...] = ()
    scope_required: str | None = None
    rule: str | None = None
    note: str | None = None
    _json: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        decision: str,
        reason: str,
        method: str | None = None,
        path: str | None = None,
        service: str | None = None,
        peer: str | None = None,
        peer_cert: str | None = None,
        kid: str | None = None,
        jti: str | None = None,
        iss: str | None = None,
        tenant: str | None = None,
        agent: str | None = None,
        run: str | None = None,
        spawn_parent: str | None = None,
        chain: Sequence[str] = (),
        scope_required: str | None = None,
        rule: str | None = None,
        note: str | None = None,
    ) -> None:
        values = (decision, reason, method, path, service, peer, peer_cert, kid, jti, iss)
        _setup(
            self,
            (*values, tenant, agent, run, spawn_parent, chain, scope_required, rule, note),
            size_check=True,
        )

    def __init_subclass__(cls, **kwargs: object) -> None:
        # The encoder trusts what a DecisionFields holds: no subclass may change that.
        raise TypeError("DecisionFields cannot be subclassed")

    @classmethod
    def from_mapping(cls, fields: Mapping[str, object]) -> DecisionFields:
        """A decision given as a mapping of exactly the entry's field names (for
        callers outside AXID): ``decision`` and ``reason`` required, the log's
        own fields refused; :class:`EntryError` otherwise. The mapping is read
        once: later changes to it cannot reach the result."""
        obj = object.__new__(cls)
        _setup(obj, list({**_DEFAULTS, **_given(fields)}.values()), size_check=True)
        return obj

    @staticmethod
    def cut_note(note: str | None) -> str | None:
        """``note`` cut to :data:`MAX_NOTE` characters, ending in ``...`` when cut:
        the one rule for the notes AXID's own services write."""
        if note is None or len(note) <= MAX_NOTE:
            return note
        return note[: MAX_NOTE - 3] + "..."


def _setup(obj: DecisionFields, values: Sequence[object], *, size_check: bool) -> None:
    """Check ``values`` (the _DECISION_FIELDS order), set them and their JSON text."""
    checked = _checked_values(values)
    for name, value in zip(_DECISION_FIELDS, checked, strict=False):  # same length, always
        _set(obj, name, value)
    parts = _parts(checked)
    # Exact, with the longest log fields the store allows.
    if size_check and _LONGEST_LOG_BYTES + sum(map(_utf8_len, parts)) > MAX_ENTRY_SIZE:
        raise EntryError(f"entry larger than {MAX_ENTRY_SIZE} bytes")
    _set(obj, "_json", parts)


def _unsized(values: Sequence[object]) -> DecisionFields:
    """A DecisionFields without the size guarantee (a stored entry: its exact size is known)."""
    obj = object.__new__(DecisionFields)
    _setup(obj, values, size_check=False)
    return obj


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# --------------------------------------------------------------------------- serialising

# Entries have one fixed set of ASCII keys, so their canonical order is fixed
# (_SORTED_FIELDS) and the skeleton can be a template; each value is encoded
# by the standard library's JSON string escaper (the one json.dumps uses;
# C-accelerated), "null" or the decimal int. The template is cut at the log's
# fields: a DecisionFields fills the caller's parts once (_parts), and every
# append only joins them with the log's values (_join). This is the hot path of every append.
#
# The log's fields in template order; _join spells this order out.
if tuple(f for f in _SORTED_FIELDS if f in _LOG_FIELDS) != ("log", "prev", "seq", "ts", "v"):
    raise RuntimeError("entry template: the log's fields out of order")  # pragma: no cover


# The whole template with the caller's values, in canonical order, as %s and
# each log field's value as a NUL: no JSON text of a value holds a raw NUL
# (the escaper writes \u0000), so splitting at them cuts exactly there.
_CALLER_TEMPLATE = (
    "{" + ",".join(f'"{k}":' + ("\x00" if k in _LOG_FIELDS else "%s") for k in _SORTED_FIELDS) + "}"
)
# Where each %s takes its value from, in DecisionFields' values: the str fields,
# then chain's place among them.
_CALLER_ORDER = tuple(_DECISION_FIELDS.index(k) for k in _SORTED_FIELDS if k not in _LOG_FIELDS)
_STR_ORDER = tuple(i for i in _CALLER_ORDER if i != _CHAIN_IDX)
_CHAIN_POS = _CALLER_ORDER.index(_CHAIN_IDX)


def _parts(values: list[object]) -> tuple[str, ...]:
    """The template's text around the log's fields, with these validated caller values."""
    texts = ["null" if v is None else _json_str(v) for v in map(values.__getitem__, _STR_ORDER)]
    chain: tuple[str, ...] = values[_CHAIN_IDX]  # type: ignore[assignment]  # validated
    texts.insert(_CHAIN_POS, "[" + ",".join(map(_json_str, chain)) + "]")
    return tuple((_CALLER_TEMPLATE % tuple(texts)).split("\x00"))


def _join(parts: tuple[str, ...], log: str, prev: str, seq: int, ts: str) -> str:
    """The entry's JCS text: the caller's parts and the log's checked values."""
    return (
        f'{parts[0]}{_json_str(log)}{parts[1]}"{prev}"{parts[2]}{seq}'
        f'{parts[3]}"{ts}"{parts[4]}{ENTRY_VERSION}{parts[5]}'
    )


# The log's own fields at their longest (the log name: the longest the store allows).
_LONGEST_LOG_BYTES = len(
    _join(
        ("",) * (len(_LOG_FIELDS) + 1),
        "x" * _RESERVED_LOG_LEN,
        "f" * 64,
        _MAX_SEQ,
        format_ts(_MAX_TS_MS),
    )
)


def _log_values(seq: object, prev: object, log: object, ts: object) -> tuple[int, str, str, str]:
    """The log's own fields checked, as plain types (``ts`` its canonical string)."""
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        seq = _check_int("seq", seq, 0, _MAX_SEQ)
    if type(ts) is str:
        _parse_ts_cached(ts)
    elif isinstance(ts, int) and not isinstance(ts, bool):
        ts = format_ts(ts)
    elif isinstance(ts, str):
        ts = _exact_str(ts)
        _parse_ts_cached(ts)
    else:
        raise EntryError(f"field 'ts' must be str, got {type(ts).__name__}")
    if type(log) is not str or not log.isascii() or len(log) > MAX_STR_LEN:
        log = _check_str("log", log)
    if not log:
        raise EntryError("field 'log' is empty")
    if not isinstance(prev, str) or not _HEX64_RE.fullmatch(prev):
        raise EntryError("field 'prev' must be 64 lowercase hex digits")
    prev = _exact_str(prev)
    # The chain starts at seq 0 and only there; an all-zero hash elsewhere
    # would be a forged chain start (SHA-256 never yields it in practice).
    if (seq == 0) != (prev == ZERO_HASH_HEX):
        raise EntryError("field 'prev' must be the zero hash exactly when seq is 0")
    return seq, prev, log, ts  # type: ignore[return-value]  # each checked above


def encode_entry(fields: DecisionFields, *, seq: int, prev: str, log: str, ts: int | str) -> bytes:
    """Canonical bytes of one entry: a :class:`DecisionFields` plus the log's fields.

    ``fields`` was checked when it was made, so the commit batch does not check
    a caller's fields a second time; ``seq``, ``prev``, ``log`` and ``ts``
    (Unix milliseconds or the canonical string) are checked here.
    """
    if type(fields) is not DecisionFields:
        raise EntryError("encode_entry takes a DecisionFields")
    seq, prev, log, ts = _log_values(seq, prev, log, ts)
    data = _join(fields._json, log, prev, seq, ts).encode("utf-8")  # validated: valid Unicode
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryError(f"entry larger than {MAX_ENTRY_SIZE} bytes")
    return data


def canonical_entry(
    fields: DecisionFields | Mapping[str, object],
    *,
    seq: int,
    prev: str,
    log: str,
    ts: int | str,
) -> bytes:
    """Build the canonical (JCS) bytes of one entry.

    ``fields`` is a :class:`DecisionFields`, or a mapping of the decision
    fields (``decision`` and ``reason`` required, the others optional,
    defaulting to ``None`` or ``[]`` for ``chain``) that becomes one;
    ``v``, ``seq``, ``ts``, ``log`` and ``prev`` come from the log, as keywords.
    ``ts`` is Unix milliseconds (int) or the canonical timestamp string.
    """
    if type(fields) is not DecisionFields:
        fields = DecisionFields.from_mapping(fields)  # type: ignore[arg-type]
    return encode_entry(fields, seq=seq, prev=prev, log=log, ts=ts)


def _encoder_matches_rfc8785() -> bool:
    """Whether the template yields the ``rfc8785`` bytes on this Python (checked at import)."""
    tricky: dict[str, object] = {
        "decision": "deny",
        "reason": "a.b:c-d_9",
        "note": "".join(map(chr, range(0x80))),  # every control char, DEL, quote, backslash
        "path": "\u0080\u00e9\u00ff\u0100\u07ff\u0800\u2028\u2029\ufeff\ufffd\uffff",
        "rule": "\U00010000\U0001f600\U0010ffff",
        "chain": ["", "a\u0000b\u001f", "\U0001f600", '"\\/'],
        "tenant": "",
    }
    log, ts, prev = "l\u2028\x00\U0001f600\\", "9999-12-31T23:59:59.999Z", "f" * 64
    own = {"v": ENTRY_VERSION, "seq": _MAX_SEQ, "prev": prev, "log": log, "ts": ts}
    sample = {**dict.fromkeys(ENTRY_FIELDS), **tricky, **own}
    try:
        data = canonical_entry(tricky, seq=_MAX_SEQ, prev=prev, log=log, ts=ts)
        return data == rfc8785.dumps(sample)
    except (ValueError, TypeError):  # pragma: no cover - defensive
        return False


if not _encoder_matches_rfc8785():  # pragma: no cover - CPython's escaper is ECMAScript's
    raise ImportError(
        "axid.audit.entry: this Python's JSON string escaper does not write RFC 8785 "
        "strings, so decision-log entries cannot be encoded here"
    )


# --------------------------------------------------------------------------- parsing


def parse_entry(data: bytes) -> dict[str, object]:
    """Parse entry bytes; they must be exactly the canonical form of a valid entry.

    One strict JSON reading makes the value. That the bytes are exactly the
    canonical encoding of a valid entry is then proven at once by
    :func:`entries_clean` for nearly every entry, and otherwise checked in
    full (validation, re-encoding, comparison), which names what is wrong.
    """
    obj = _decode_entry(data)
    if not entries_clean((data,)):
        _check_entry(obj, data)
    return obj  # type: ignore[return-value]  # a dict: entries_clean or _check_entry says so


def _decode_entry(data: bytes) -> object:
    """The JSON value of entry bytes (the one parser): strict, and bounded in size."""
    if not isinstance(data, bytes):
        raise TypeError(f"entry must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENTRY_SIZE:
        raise EntryError(f"entry larger than {MAX_ENTRY_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EntryError("entry is not valid UTF-8") from e
    try:
        return strict_loads(text)
    except (ValueError, RecursionError) as e:
        # strict_loads' messages name no member (they may be attacker-chosen).
        raise EntryError(f"entry is not strict JSON: {e}") from e


def _check_entry(obj: object, data: bytes) -> None:
    """The full check: ``obj`` (what ``data`` parsed to) is a valid entry and ``data``
    exactly its canonical encoding; precise errors."""
    if not isinstance(obj, dict):
        raise EntryError("entry is not a JSON object")
    if obj.keys() != _ENTRY_KEYS:
        extra = sorted(set(obj) - _ENTRY_KEYS)
        missing = sorted(_ENTRY_KEYS - set(obj))
        raise EntryError(f"entry fields differ: unknown {extra}, missing {missing}")
    # The same rules as for building an entry, then the bytes must be exactly
    # the canonical encoding of what they parse to.
    if type(obj["v"]) is not int or obj["v"] != ENTRY_VERSION:
        raise EntryError(f"unsupported entry version {obj['v']!r}")
    # No headroom check: the exact size is known, and was checked above.
    valid = _unsized([obj[k] for k in _DECISION_FIELDS])
    canonical = encode_entry(
        valid,
        seq=obj["seq"],
        prev=obj["prev"],
        log=obj["log"],
        ts=_ts_str(obj["ts"]),
    )
    if canonical != data:
        raise EntryError("entry is not in RFC 8785 canonical form")


def _ts_str(ts: object) -> str:
    # In a stored entry ts is the string form only (an int is the caller's shorthand).
    if not isinstance(ts, str):
        raise EntryError("field 'ts' must be str")
    return ts
