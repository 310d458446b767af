"""Decision-log entries: canonical (RFC 8785) form, field checks, strict parsing."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import re

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from axid.audit import entry as entry_mod
from axid.audit.entry import (
    ENTRY_FIELDS,
    MAX_CHAIN,
    MAX_STR_LEN,
    ZERO_HASH_HEX,
    DecisionFields,
    EntryError,
    canonical_entry,
    encode_entry,
    entries_clean,
    format_ts,
    parse_entry,
    parse_ts,
)

PREV = "ab" * 32
TS_MS = 1700000000123
TS = "2023-11-14T22:13:20.123Z"

FULL: dict[str, object] = {
    "decision": "deny",
    "reason": "scope_insufficient",
    "method": "POST",
    "path": "/payments/42/refund",
    "service": "payments",
    "peer": "spiffe://example.org/agent/worker",
    "peer_cert": "x5t-hash",
    "kid": "kid-1",
    "jti": "jti-1",
    "iss": "https://issuer.example",
    "tenant": "acme",
    "agent": "worker",
    "run": "run-2",
    "spawn_parent": "run-1",
    "chain": ["run-1"],
    "scope_required": "payments:refund",
    "rule": "POST /payments/*/refund",
    "note": 'caf\u00e9 \U0001f600 "quoted" \\ \n',
}


def _entry(fields: dict[str, object] | None = None, **kw: object) -> bytes:
    args: dict[str, object] = {"seq": 1, "prev": PREV, "log": "payments", "ts": TS_MS}
    args.update(kw)
    return canonical_entry(
        {"decision": "allow", "reason": "ok"} if fields is None else fields,
        **args,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- canonical form


def test_minimal_entry_exact_bytes() -> None:
    data = canonical_entry(
        {"decision": "allow", "reason": "ok"}, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0
    )
    assert data == (
        b'{"agent":null,"chain":[],"decision":"allow","iss":null,"jti":null,"kid":null,'
        b'"log":"l","method":null,"note":null,"path":null,"peer":null,"peer_cert":null,'
        b'"prev":"' + ZERO_HASH_HEX.encode() + b'","reason":"ok","rule":null,"run":null,'
        b'"scope_required":null,"seq":0,"service":null,"spawn_parent":null,"tenant":null,'
        b'"ts":"1970-01-01T00:00:00.000Z","v":1}'
    )
    assert parse_entry(data)["v"] == 1


def test_full_entry_round_trip() -> None:
    data = _entry(FULL)
    obj = parse_entry(data)
    assert tuple(sorted(obj)) == tuple(sorted(ENTRY_FIELDS))
    assert {k: obj[k] for k in FULL} == FULL
    assert obj["seq"] == 1 and obj["prev"] == PREV and obj["ts"] == TS and obj["log"] == "payments"
    assert rfc8785.dumps(obj) == data
    # Non-ASCII is raw UTF-8 in JCS, control characters are escaped: one line.
    assert "caf\u00e9".encode() in data and b"\n" not in data


def test_ts_int_and_str_agree() -> None:
    assert _entry(ts=TS_MS) == _entry(ts=TS)
    assert format_ts(TS_MS) == TS
    assert parse_ts(TS) == TS_MS
    for ms in (0, 1, 999, 1000, 951782400000, 253402300799999):
        assert parse_ts(format_ts(ms)) == ms


def test_chain_tuple_accepted() -> None:
    assert _entry({**FULL, "chain": ("run-1",)}) == _entry(FULL)


# --------------------------------------------------------------------------- field checks

BAD_FIELDS: list[tuple[str, dict[str, object]]] = [
    ("unknown field", {"decision": "allow", "reason": "ok", "extra": 1}),
    ("log field from caller", {"decision": "allow", "reason": "ok", "seq": 3}),
    ("prev from caller", {"decision": "allow", "reason": "ok", "prev": PREV}),
    ("missing decision", {"reason": "ok"}),
    ("missing reason", {"decision": "allow"}),
    ("bad decision", {"decision": "maybe", "reason": "ok"}),
    ("decision case", {"decision": "Allow", "reason": "ok"}),
    ("decision bool", {"decision": True, "reason": "ok"}),
    ("empty reason", {"decision": "allow", "reason": ""}),
    ("reason with space", {"decision": "deny", "reason": "not ok"}),
    ("reason uppercase", {"decision": "deny", "reason": "OK"}),
    ("reason int", {"decision": "deny", "reason": 1}),
    ("str field int", {"decision": "deny", "reason": "ok", "tenant": 5}),
    ("str field list", {"decision": "deny", "reason": "ok", "scope_required": ["a"]}),
    ("chain str", {"decision": "deny", "reason": "ok", "chain": "run-1"}),
    ("chain None", {"decision": "deny", "reason": "ok", "chain": None}),
    ("chain item int", {"decision": "deny", "reason": "ok", "chain": [1]}),
    ("chain item None", {"decision": "deny", "reason": "ok", "chain": [None]}),
    ("chain too long", {"decision": "deny", "reason": "ok", "chain": ["r"] * (MAX_CHAIN + 1)}),
    ("string too long", {"decision": "deny", "reason": "ok", "path": "/" * (MAX_STR_LEN + 1)}),
    ("lone surrogate", {"decision": "deny", "reason": "ok", "note": "\ud800"}),
    ("non-str key", {"decision": "deny", "reason": "ok", 1: "x"}),
]


@pytest.mark.parametrize(("desc", "fields"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_bad_fields(desc: str, fields: dict[str, object]) -> None:
    with pytest.raises(EntryError):
        _entry(fields)


BAD_LOG_ARGS: list[tuple[str, dict[str, object]]] = [
    ("seq negative", {"seq": -1}),
    ("seq bool", {"seq": True}),
    ("seq float", {"seq": 1.0}),
    ("seq over JCS range", {"seq": 2**53}),
    ("seq 0 with non-zero prev", {"seq": 0, "prev": PREV}),
    ("seq 1 with zero prev", {"seq": 1, "prev": ZERO_HASH_HEX}),
    ("prev uppercase", {"prev": PREV.upper()}),
    ("prev short", {"prev": PREV[:-2]}),
    ("prev bytes", {"prev": bytes(32)}),
    ("log empty", {"log": ""}),
    ("log None", {"log": None}),
    ("ts negative", {"ts": -1}),
    ("ts bool", {"ts": True}),
    ("ts float", {"ts": 1.5}),
    ("ts no millis", {"ts": "2023-11-14T22:13:20Z"}),
    ("ts micros", {"ts": "2023-11-14T22:13:20.123456Z"}),
    ("ts offset", {"ts": "2023-11-14T22:13:20.123+00:00"}),
    ("ts lowercase", {"ts": "2023-11-14t22:13:20.123z"}),
    ("ts space", {"ts": "2023-11-14 22:13:20.123Z"}),
    ("ts impossible date", {"ts": "2023-02-30T00:00:00.000Z"}),
    ("ts leap second", {"ts": "2016-12-31T23:59:60.000Z"}),
    ("ts before epoch", {"ts": "1969-12-31T23:59:59.999Z"}),
    ("ts unicode digits", {"ts": "\u0662023-11-14T22:13:20.123Z"}),
]


@pytest.mark.parametrize(("desc", "kw"), BAD_LOG_ARGS, ids=[b[0] for b in BAD_LOG_ARGS])
def test_bad_log_args(desc: str, kw: dict[str, object]) -> None:
    with pytest.raises(EntryError):
        _entry(**kw)


# --------------------------------------------------------------------------- parse strictness

GOOD = _entry(FULL)
GOOD_OBJ = json.loads(GOOD)


def _dumps(obj: object, **kw: object) -> bytes:
    return json.dumps(obj, **kw).encode()  # type: ignore[arg-type]


BAD_BYTES: list[tuple[str, bytes]] = [
    ("pretty printed", _dumps(GOOD_OBJ, indent=1, sort_keys=True, ensure_ascii=False)),
    ("spaces after separators", _dumps(GOOD_OBJ, sort_keys=True, ensure_ascii=False)),
    ("unsorted keys", _dumps(dict(reversed(GOOD_OBJ.items())), separators=(",", ":"))),
    ("ascii escapes", _dumps(GOOD_OBJ, sort_keys=True, separators=(",", ":"))),
    ("trailing newline", GOOD + b"\n"),
    ("leading space", b" " + GOOD),
    ("BOM", b"\xef\xbb\xbf" + GOOD),
    ("duplicate key", GOOD[:-1] + b',"v":1}'),
    (
        "duplicate key canonical-looking",
        b'{"agent":null,"agent":null' + GOOD[len(b'{"agent":null') :],
    ),
    ("missing field", rfc8785.dumps({k: v for k, v in GOOD_OBJ.items() if k != "note"})),
    ("extra field", rfc8785.dumps({**GOOD_OBJ, "zzz": None})),
    ("version 2", rfc8785.dumps({**GOOD_OBJ, "v": 2})),
    ("version float", GOOD.replace(b'"v":1}', b'"v":1.0}')),
    ("version true", rfc8785.dumps({**GOOD_OBJ, "v": True})),
    ("seq float", GOOD.replace(b'"seq":1,', b'"seq":1.0,')),
    ("seq exponent", GOOD.replace(b'"seq":1,', b'"seq":1e0,')),
    ("NaN", GOOD.replace(b'"seq":1,', b'"seq":NaN,')),
    ("bad decision", rfc8785.dumps({**GOOD_OBJ, "decision": "maybe"})),
    ("bad prev", rfc8785.dumps({**GOOD_OBJ, "prev": ZERO_HASH_HEX})),
    ("bad ts", rfc8785.dumps({**GOOD_OBJ, "ts": "2023-11-14T22:13:20Z"})),
    ("chain null", rfc8785.dumps({**GOOD_OBJ, "chain": None})),
    ("unicode escape of plain char", GOOD.replace(b'"deny"', b'"\\u0064eny"')),
    ("array", b"[]"),
    ("string", b'"x"'),
    ("empty", b""),
    ("invalid UTF-8", GOOD.replace(b"caf\xc3\xa9", b"caf\xe9")),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
    ("too large", b'{"a":"' + b"x" * 300_000 + b'"}'),
]


@pytest.mark.parametrize(("desc", "data"), BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_parse_rejects(desc: str, data: bytes) -> None:
    assert data != GOOD
    with pytest.raises(EntryError):
        parse_entry(data)


def test_parse_type_error_for_str() -> None:
    with pytest.raises(TypeError):
        parse_entry(GOOD.decode())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hypothesis

_opt_str = st.one_of(st.none(), st.text(max_size=40))
_fields = st.fixed_dictionaries(
    {
        "decision": st.sampled_from(["allow", "deny"]),
        "reason": st.from_regex(r"[a-z0-9][a-z0-9_]{0,19}", fullmatch=True),
    },
    optional={
        **{
            k: _opt_str
            for k in ENTRY_FIELDS
            if k not in {"v", "seq", "ts", "log", "prev", "decision", "reason", "chain"}
        },
        "chain": st.lists(st.text(max_size=20), max_size=8),
    },
)


@settings(max_examples=200, deadline=None)
@given(
    _fields,
    st.integers(0, 2**53 - 1),
    st.integers(0, 253402300799999),
    st.text(min_size=1, max_size=30),
    st.binary(min_size=32, max_size=32),
)
def test_canonical_entry_round_trips(
    fields: dict[str, object], seq: int, ts: int, log: str, prev_raw: bytes
) -> None:
    prev = ZERO_HASH_HEX if seq == 0 else (prev_raw.hex() if any(prev_raw) else PREV)
    data = canonical_entry(fields, seq=seq, prev=prev, log=log, ts=ts)
    obj = parse_entry(data)
    assert obj["seq"] == seq and obj["prev"] == prev and obj["ts"] == format_ts(ts)
    for k, v in fields.items():
        assert obj[k] == v
    assert b"\n" not in data  # one entry per line in entries.jsonl


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parse_entry_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(EntryError):
        parse_entry(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_parse_entry_single_byte_change(pos: int, delta: int) -> None:
    # Any change either breaks the entry or yields a different, still-canonical
    # entry (e.g. a changed letter in a string): never the same parse.
    data = bytearray(GOOD)
    data[pos] = (data[pos] + delta) % 256
    try:
        obj = parse_entry(bytes(data))
    except EntryError:
        return
    assert obj != GOOD_OBJ


_json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*ENTRY_FIELDS, "x"]), _json_value, max_size=25))
def test_canonical_entry_arbitrary_fields(fields: dict[str, object]) -> None:
    with contextlib.suppress(EntryError):
        parse_entry(_entry(fields))


# --------------------------------------------------------------------------- fast path
# DecisionFields / encode_entry are the appender's hot path; the fast
# serialiser must give exactly rfc8785's bytes for everything validation accepts.

_OPTIONAL_STR_FIELDS = [
    k
    for k in ENTRY_FIELDS
    if k not in {"v", "seq", "ts", "log", "prev", "decision", "reason", "chain"}
]
# Every code point, lone surrogates included: validation must refuse those.
_any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()))
_edge_text = st.sampled_from(
    [
        "".join(map(chr, range(0x80))),  # all controls, DEL, quote, backslash, slash
        "\u2028\u2029",  # JSON.stringify leaves them raw (ES2019)
        "\x7f\x80\x9f\xa0\xad",
        "\ufeff\ufffe\uffff",
        "\U0001f600\U00010000\U0010ffff",  # astral: one char, two UTF-16 units
        "\ud800",
        "a\udfffb",
        "",
    ]
)
_str = st.one_of(_any_text, _edge_text)


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


_fast_fields = st.fixed_dictionaries(
    {
        "decision": st.sampled_from(["allow", "deny"]),
        "reason": st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,63}", fullmatch=True),
    },
    optional={
        **{k: st.one_of(st.none(), _str) for k in _OPTIONAL_STR_FIELDS},
        "chain": st.lists(_str, max_size=MAX_CHAIN),
    },
)


def _strings(fields: dict[str, object]) -> list[str]:
    out = [v for v in fields.values() if isinstance(v, str)]
    return out + list(fields.get("chain", []))  # type: ignore[call-overload]


@settings(max_examples=400, deadline=None)
@given(
    _fast_fields,
    st.integers(0, 2**53 - 1),
    st.integers(0, 253402300799999),
    st.one_of(st.text(min_size=1, max_size=64), _edge_text.filter(bool)),
)
def test_fast_serialiser_matches_rfc8785(
    fields: dict[str, object], seq: int, ts: int, log: str
) -> None:
    prev = ZERO_HASH_HEX if seq == 0 else PREV
    if any(_has_surrogate(s) for s in [*_strings(fields), log]):
        with pytest.raises(EntryError):
            canonical_entry(fields, seq=seq, prev=prev, log=log, ts=ts)
        return
    data = canonical_entry(fields, seq=seq, prev=prev, log=log, ts=ts)
    full: dict[str, object] = {k: None for k in ENTRY_FIELDS}
    full["chain"] = []
    full.update(fields)
    full.update(v=1, seq=seq, prev=prev, log=log, ts=format_ts(ts))
    assert data == rfc8785.dumps(full)
    assert parse_entry(data) == full
    assert b"\n" not in data


def test_fast_serialiser_edge_strings() -> None:
    # The ECMAScript JSON.stringify rules RFC 8785 adopts, spelled out.
    cases = {
        "\x00": b'"\\u0000"',
        "\x1f": b'"\\u001f"',
        "\x0b": b'"\\u000b"',  # vertical tab: no short escape in JSON
        "\b\f\n\r\t": b'"\\b\\f\\n\\r\\t"',
        '"\\/': b'"\\"\\\\/"',  # solidus is not escaped
        "\x7f": b'"\x7f"',  # DEL is not escaped
        "\u2028\u2029": '"\u2028\u2029"'.encode(),
        "\u00e9\U0001f600": '"\u00e9\U0001f600"'.encode(),
        "\x1a": b'"\\u001a"',  # lowercase hex
    }
    for s, want in cases.items():
        data = _entry({"decision": "allow", "reason": "ok", "note": s})
        assert b'"note":' + want + b"," in data, s
        assert data == rfc8785.dumps(json.loads(data))


def test_encoder_self_check() -> None:
    """The one encoder's import-time check against rfc8785 (importing fails without it)."""
    assert entry_mod._encoder_matches_rfc8785()  # CPython's json escaper agrees here
    data = _entry(FULL)
    assert data == rfc8785.dumps(json.loads(data))
    assert parse_entry(data)["note"] == FULL["note"]


def test_decision_fields_from_mapping_is_complete_and_private() -> None:
    chain = ["run-1"]
    f: dict[str, object] = {"decision": "deny", "reason": "ok", "chain": chain, "tenant": "t"}
    v = DecisionFields.from_mapping(f)
    names = [x.name for x in dataclasses.fields(v) if x.init]
    assert names == [k for k in ENTRY_FIELDS if k not in {"v", "seq", "ts", "log", "prev"}]
    assert v.chain == ("run-1",)
    assert v.path is None and v.tenant == "t"
    chain.append("x")
    f["decision"] = "allow"
    assert v.decision == "deny" and v.chain == ("run-1",)
    assert v == DecisionFields("deny", "ok", chain=["run-1"], tenant="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.note = "x"  # type: ignore[misc]
    with pytest.raises(EntryError):
        dataclasses.replace(v, note="\ud800")
    with pytest.raises(TypeError):
        type("Sub", (DecisionFields,), {})


def test_cut_note_is_one_rule() -> None:
    assert entry_mod.MAX_NOTE == 2000
    assert DecisionFields.cut_note(None) is None
    assert DecisionFields.cut_note("n" * 2000) == "n" * 2000
    cut = DecisionFields.cut_note("n" * 2001)
    assert cut == "n" * 1997 + "..." and len(cut) == 2000


def test_decision_fields_normalise_str_subclasses() -> None:
    class Decision(enum.StrEnum):
        ALLOW = "allow"

    class Sneaky(str):
        def __str__(self) -> str:
            return "something else"

    v = DecisionFields.from_mapping(
        {"decision": Decision.ALLOW, "reason": "ok", "note": Sneaky("n")}
    )
    assert type(v.decision) is str and v.decision == "allow"
    assert type(v.note) is str and v.note == "n"
    assert DecisionFields(Decision.ALLOW, "ok", note=Sneaky("n")) == v
    data = encode_entry(v, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0)
    assert b'"decision":"allow"' in data and b'"note":"n"' in data


@pytest.mark.parametrize(("desc", "fields"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_decision_fields_reject(desc: str, fields: dict[str, object]) -> None:
    with pytest.raises(EntryError):
        DecisionFields.from_mapping(fields)


def test_decision_fields_size_limit() -> None:
    big = "\x01" * MAX_STR_LEN  # 6 bytes each once escaped
    ok = {"decision": "allow", "reason": "ok", "note": big, "path": big}
    data = canonical_entry(ok, seq=1, prev=PREV, log="x" * 64, ts=TS_MS)
    assert len(data) <= entry_mod.MAX_ENTRY_SIZE
    too_big = {**ok, **{k: big for k in _OPTIONAL_STR_FIELDS}}
    with pytest.raises(EntryError, match="larger than"):
        DecisionFields.from_mapping(too_big)


def test_encode_entry_takes_only_decision_fields() -> None:
    v = DecisionFields.from_mapping({"decision": "allow", "reason": "ok"})
    assert encode_entry(v, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0) == canonical_entry(
        {"decision": "allow", "reason": "ok"}, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0
    )
    assert canonical_entry(v, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0) == encode_entry(
        v, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0
    )
    for bad in (
        {"decision": "allow", "reason": "ok"},  # raw caller fields
        {f: getattr(v, f) for f in ("decision", "reason")},
    ):
        with pytest.raises(EntryError):
            encode_entry(bad, seq=0, prev=ZERO_HASH_HEX, log="l", ts=0)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 253402300799999))
def test_parse_ts_round_trips(ms: int) -> None:
    ts = format_ts(ms)
    assert parse_ts(ts) == ms
    # The strptime reading it replaces agrees.
    from datetime import UTC, datetime

    dt = datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    assert int(dt.timestamp()) * 1000 + int(ts[20:23]) == ms


# --------------------------------------------------------------------------- entries_clean
# The "clean or don't know" check (the verifier's batch fast path, and
# parse_entry's shortcut). It may decline anything (the caller then uses
# parse_entry), but what it calls clean parse_entry's full route must accept
# too, with the seq, log and prev it was told to expect.


def _strict(data: bytes) -> dict[str, object]:
    """parse_entry's full route: the one parser, then the full check (no shortcut)."""
    obj = entry_mod._decode_entry(data)
    entry_mod._check_entry(obj, data)
    assert isinstance(obj, dict)
    return obj


def _scan_sound(datas: list[bytes]) -> bool:
    """entries_clean(datas) is False, or every entry parses strictly, and the check
    accepts exactly what they say (seq, log, prev) as expectations."""
    if not entries_clean(datas):
        return False
    objs = [_strict(data) for data in datas]  # must not raise
    start = objs[0]["seq"]
    assert isinstance(start, int)
    log = str(objs[0]["log"])
    prevs = b"".join(str(o["prev"]).encode() for o in objs)
    said = [(o["seq"], o["log"]) for o in objs]
    if said == [(start + i, log) for i in range(len(objs))]:
        assert entries_clean(datas, start=start, log=log, prevs=prevs)
    else:
        assert not entries_clean(datas, start=start, log=log)
    # Anything else expected: not clean.
    assert not entries_clean(datas, start=start + 1)
    assert not entries_clean(datas, log=log + "x")
    other = (b"1" if prevs[:1] == b"0" else b"0") + prevs[1:]
    assert not entries_clean(datas, prevs=other)
    assert not entries_clean(datas, prevs=prevs[:-64])
    return True


def _same_parse(data: bytes) -> None:
    """parse_entry (fast route first) and the full route agree: same dict or both refuse."""
    try:
        want = _strict(data)
    except EntryError:
        with pytest.raises(EntryError):
            parse_entry(data)
        return
    got = parse_entry(data)
    assert got == want and list(got) == list(want)  # same values, same key order


def _needs_escape(s: str) -> bool:
    return any(c in '"\\' or c < " " for c in s)


@settings(max_examples=400, deadline=None)
@given(
    _fast_fields,
    st.integers(0, 2**53 - 1),
    st.integers(0, 253402300799999),
    st.one_of(st.text(min_size=1, max_size=64), _edge_text.filter(bool)),
)
def test_scan_accepts_valid_entries(fields: dict[str, object], seq: int, ts: int, log: str) -> None:
    if any(_has_surrogate(s) for s in [*_strings(fields), log]):
        return
    prev = ZERO_HASH_HEX if seq == 0 else PREV
    data = canonical_entry(fields, seq=seq, prev=prev, log=log, ts=ts)
    # Declined only where documented: a long entry, an escape in the log name.
    expect = len(data) <= MAX_STR_LEN and not _needs_escape(log)
    assert _scan_sound([data]) is expect
    _same_parse(data)


_ESCAPED = _entry(
    {
        "decision": "allow",
        "reason": "ok",
        "note": "".join(map(chr, range(0x80))),
        "path": "caf\u00e9 \u2028 \U0001f600",
        "chain": ['"', "\\", "\x7f"],
    }
)
_MUTATE_BASES = [GOOD, _ESCAPED, _entry(seq=0, prev=ZERO_HASH_HEX)]


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(_MUTATE_BASES),
    st.integers(0, 10_000),
    st.sampled_from(["replace", "insert", "delete"]),
    st.binary(min_size=1, max_size=3),
)
def test_scan_never_accepts_what_parse_refuses(
    base: bytes, where: int, how: str, blob: bytes
) -> None:
    pos = where % len(base)
    if how == "replace":
        data = base[:pos] + blob + base[pos + len(blob) :]
    elif how == "insert":
        data = base[:pos] + blob + base[pos:]
    else:
        data = base[:pos] + base[pos + len(blob) :]
    _scan_sound([data])
    _same_parse(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_scan_arbitrary_bytes(data: bytes) -> None:
    _scan_sound([data])


def _with(**changes: bytes) -> bytes:
    """GOOD with raw JSON values substituted (for entries no encoder would write)."""
    data = GOOD
    for key, raw in changes.items():
        value = re.compile(rb'"%s":(null|"(?:[^"\\]|\\.)*"|[^,}]*)' % key.encode())
        data = value.sub(lambda _m, k=key, r=raw: b'"%s":%s' % (k.encode(), r), data, count=1)
    return data


# Canonical-looking entries that are not: the scan must decline each one (and
# parse_entry refuse it), whatever grammar shortcut it takes.
SCAN_NEAR_MISSES: list[tuple[str, bytes]] = [
    ("escaped solidus", _with(path=b'"\\/p"')),
    ("escaped DEL", _with(note=b'"\\u007f"')),
    ("uppercase hex escape", _with(note=b'"\\u001F"')),
    ("long escape for backspace", _with(note=b'"\\u0008"')),
    ("escaped non-ASCII", _with(note=b'"caf\\u00e9"')),
    ("escaped surrogate pair", _with(note=b'"\\ud83d\\ude00"')),
    ("raw control character", _with(note=b'"a\x01b"')),
    ("raw newline", _with(note=b'"a\nb"')),
    ("raw tab", _with(note=b'"a\tb"')),
    ("encoded surrogate", _with(note=b'"\xed\xa0\x80"')),
    ("overlong UTF-8", _with(note=b'"\xc0\xaf"')),
    ("truncated UTF-8", _with(note=b'"\xe2\x82"')),
    ("seq leading zero", _with(seq=b"01")),
    ("seq negative zero", _with(seq=b"-0")),
    ("seq negative", _with(seq=b"-1")),
    ("seq float", _with(seq=b"1.0")),
    ("seq too large", _with(seq=b"9007199254740992")),
    ("seq as string", _with(seq=b'"1"')),
    ("v 2", _with(v=b"2")),
    ("v float", _with(v=b"1.0")),
    ("decision case", _with(decision=b'"Allow"')),
    ("reason too long", _with(reason=b'"' + b"a" * 65 + b'"')),
    ("reason uppercase", _with(reason=b'"OK"')),
    ("reason null", _with(reason=b"null")),
    ("prev uppercase", _with(prev=b'"' + PREV.upper().encode() + b'"')),
    ("prev short", _with(prev=b'"' + PREV[:-2].encode() + b'"')),
    ("prev zero at seq 1", _with(prev=b'"' + ZERO_HASH_HEX.encode() + b'"')),
    ("prev not zero at seq 0", _with(seq=b"0")),
    ("ts not a date", _with(ts=b'"2023-02-30T00:00:00.000Z"')),
    ("ts 24:00", _with(ts=b'"2023-11-14T24:00:00.000Z"')),
    ("ts leap second", _with(ts=b'"2016-12-31T23:59:60.000Z"')),
    ("ts before 1970", _with(ts=b'"1969-12-31T23:59:59.999Z"')),
    ("ts no millis", _with(ts=b'"2023-11-14T22:13:20Z"')),
    ("log empty", _with(log=b'""')),
    ("log null", _with(log=b"null")),
    ("chain null", _with(chain=b"null")),
    ("chain of null", _with(chain=b"[null]")),
    ("chain 65 items", _with(chain=b"[" + b",".join([b'"r"'] * 65) + b"]")),
    ("chain trailing comma", _with(chain=b'["r",]')),
    ("note number", _with(note=b"1")),
    ("note true", _with(note=b"true")),
    ("note object", _with(note=b"{}")),
    ("whitespace", GOOD.replace(b'"v":1', b'"v": 1')),
    ("duplicate key", b'{"agent":null,' + GOOD[1:]),
    ("trailing newline", GOOD + b"\n"),
    ("string too long", _with(note=b'"' + b"x" * (MAX_STR_LEN + 1) + b'"')),
]


@pytest.mark.parametrize(("desc", "data"), SCAN_NEAR_MISSES, ids=[m[0] for m in SCAN_NEAR_MISSES])
def test_scan_declines_near_misses(desc: str, data: bytes) -> None:
    assert data != GOOD, "the substitution did not apply"
    assert not entries_clean([data])
    assert not entries_clean([GOOD, data, GOOD])  # one bad entry spoils the batch
    with pytest.raises(EntryError):
        parse_entry(data)


def test_scan_batch() -> None:
    datas = [_entry(seq=i, prev=ZERO_HASH_HEX if i == 0 else PREV) for i in range(5)]
    prevs = ZERO_HASH_HEX.encode() + PREV.encode() * 4
    assert entries_clean(datas, start=0, log="payments", prevs=prevs)
    assert _scan_sound(datas)
    assert not entries_clean(datas, start=1)
    assert not entries_clean(datas, log="payment")
    assert not entries_clean(datas, prevs=PREV.encode() * 5)
    assert not entries_clean([datas[0], datas[2]], start=0)  # a gap
    assert entries_clean([])
    assert not entries_clean([GOOD.decode()])  # type: ignore[list-item]
    assert not entries_clean([bytearray(GOOD)])  # type: ignore[list-item]
    # Raw DEL, U+2028 and non-ASCII text need no escape: the fast grammar takes them.
    raw = _entry({"decision": "allow", "reason": "ok", "note": "\x7f\u2028\u00e9"})
    assert _scan_sound([raw])
    assert _scan_sound([_ESCAPED])
