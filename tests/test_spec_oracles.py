"""The spec oracles (tests/_spec_rfc9162.py, tests/_spec_rfc8941.py) are known-good.

RFC 9162: against every transparency-dev/merkle vector in tests/vectors/merkle
(the same files the project's own conformance test reads). RFC 8941: against
the RFC's own examples, the cases its algorithms spell out, and, over
generated dictionaries, against ``http_sfv`` (an independent implementation by
the RFC's editor) wherever both parse.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import http_sfv
import pytest
from _spec_rfc8941 import ParseError, Unsupported, parse_dictionary, serialize_dictionary
from _spec_rfc9162 import (
    HASH,
    leaf_hash,
    mth,
    mth_of_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from hypothesis import given
from hypothesis import strategies as st

VECTORS = Path(__file__).parent / "vectors" / "merkle"
INCLUSION = sorted((VECTORS / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((VECTORS / "consistency").rglob("*.json"))
REFERENCE = json.loads((VECTORS / "reference_tree.json").read_text())


def _b64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def _id(p: Path) -> str:
    return str(p.relative_to(VECTORS))


# --------------------------------------------------------------------------- RFC 9162


def test_vector_counts() -> None:
    assert len(INCLUSION) == 98
    assert len(CONSISTENCY) == 98


def test_hashing_known_answers() -> None:
    hv = REFERENCE["hasher_vectors"]
    assert HASH(b"").hex() == hv["empty_tree"]
    assert leaf_hash(b"").hex() == hv["leaf_hash_of_empty"]
    assert leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )


@pytest.mark.parametrize("size", range(9))
def test_reference_tree_roots(size: int) -> None:
    entries = [bytes.fromhex(x) for x in REFERENCE["leaf_inputs_hex"][:size]]
    want = bytes.fromhex(REFERENCE["root_hex_by_size"][size])
    assert mth(entries) == want
    assert mth_of_leaf_hashes([leaf_hash(e) for e in entries]) == want


@pytest.mark.parametrize("path", INCLUSION, ids=_id)
def test_inclusion_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    got = verify_inclusion(
        v["leafIdx"],
        v["treeSize"],
        _b64(v["leafHash"]),
        [_b64(p) for p in v["proof"] or []],
        _b64(v["root"]),
    )
    assert got is not v["wantErr"]


# The vector that expects two 12-byte "roots" to be accepted for equal sizes:
# the oracle, like the project (tests/vectors/README.md), takes only 32-byte hashes.
EXPECTED_DIFFERENCE = "consistency/additional/sizes-are-equal-one-and-proof-is-empty.json"


@pytest.mark.parametrize("path", CONSISTENCY, ids=_id)
def test_consistency_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    want_err = v["wantErr"] or _id(path) == EXPECTED_DIFFERENCE
    got = verify_consistency(
        v["size1"],
        v["size2"],
        _b64(v["root1"]),
        _b64(v["root2"]),
        [_b64(p) for p in v["proof"] or []],
    )
    assert got is not want_err


# --------------------------------------------------------------------------- RFC 8941


def test_rfc8941_examples() -> None:
    # RFC 8941 3.3.5 (Byte Sequences) and 3.3.1 (Integers), as dictionary members.
    assert parse_dictionary(b"b=:cHJldGVuZCB0aGlzIGlzIGJpbmFyeSBjb250ZW50Lg==:, i=42") == {
        "b": b"pretend this is binary content.",
        "i": 42,
    }
    # 3.2: a Dictionary's String member is valid RFC 8941 the oracle does not parse.
    with pytest.raises(Unsupported):
        parse_dictionary(b'en="Applepie", da=:w4ZibGV0w6ZydGU=:')


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"", {}),
        (b"a=1", {"a": 1}),
        (b"   a=1", {"a": 1}),  # 4.2 step 2: leading SP
        (b"a=1   ", {"a": 1}),  # 4.2 step 4: trailing SP
        (b"a=1 ,\t b=2", {"a": 1, "b": 2}),  # 4.2.2 steps 6 and 9: OWS around ","
        (b"a=1, a=2", {"a": 2}),  # 4.2.2 step 4: a later member overwrites
        (b"a=007", {"a": 7}),  # 4.2.4: leading zeros are digits like any other
        (b"a=-0", {"a": 0}),
        (b"a=999999999999999", {"a": 999999999999999}),  # 15 digits
        (b"a=::", {"a": b""}),  # an empty byte sequence
        (b"a=:AAA:", {"a": b"\x00\x00"}),  # 4.2.7: padding synthesized
        (b"a=:AB==:", {"a": b"\x00"}),  # 4.2.7: non-zero pad bits tolerated
        (b"*k.-_9=1", {"*k.-_9": 1}),  # 4.2.3.3: key characters
    ],
)
def test_rfc8941_parses(raw: bytes, want: dict[str, object]) -> None:
    assert parse_dictionary(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"\ta=1",  # 4.2 step 2 discards SP only
        b"a=1,",  # 4.2.2 step 10: trailing comma
        b"a=1 b=2",  # 4.2.2 step 8: "," required
        b"A=1",  # 4.2.3.3 step 1: lowercase key
        b"a =1",
        b"a= 1",  # 4.2.3.1 step 6: a space is no item type
        b"a=1234567890123456",  # 4.2.4: more than 15 digits
        b"a=-",
        b"a=-x",
        b"a=:AAA",  # 4.2.7 step 3: unterminated
        b"a=:AA!A:",  # 4.2.7 step 6
        b"a=:A:",  # 4.2.7 step 7: not base64
        b"a=:AA==AA==:",  # 4.2.7 step 7: data after the padding
        "a=:\u00e9:".encode(),  # 4.2 step 1: not ASCII
    ],
)
def test_rfc8941_fails(raw: bytes) -> None:
    with pytest.raises(ParseError) as failed:
        parse_dictionary(raw)
    assert not isinstance(failed.value, Unsupported)


@pytest.mark.parametrize(
    "raw", [b"a", b"a=?1", b'a="x"', b"a=tok", b"a=1.5", b"a=(1 2)", b"a=1;p=2", b"a=:AA==:;p"]
)
def test_rfc8941_unsupported(raw: bytes) -> None:
    with pytest.raises(Unsupported):
        parse_dictionary(raw)


_keys = st.from_regex(r"[a-z*][a-z0-9_.*-]{0,5}", fullmatch=True)
_values = st.one_of(st.integers(-(10**15) + 1, 10**15 - 1), st.binary(max_size=40))


@given(st.dictionaries(_keys, _values, max_size=6))
def test_rfc8941_round_trip(members: dict[str, int | bytes]) -> None:
    assert parse_dictionary(serialize_dictionary(members).encode()) == members


def _sfv(raw: bytes) -> dict[str, object] | None:
    d = http_sfv.Dictionary()
    try:
        d.parse(raw)
    except ValueError:
        return None
    return {k: v.value for k, v in d.items()}


_pieces = st.sampled_from(
    ["a", "b", "=", ",", " ", "\t", ":", "AA", "AA==", "A", "=", "-", "0", "7", "x", "*", ";"]
)


@given(st.lists(_pieces, max_size=14).map("".join))
def test_rfc8941_agrees_with_http_sfv(text: str) -> None:
    # Wherever the oracle parses, http_sfv gives the same members, except where
    # http_sfv is stricter than the RFC asks (unpadded base64, which the RFC
    # says a parser SHOULD NOT reject; an empty field value, which RFC 8941
    # parses as an empty dictionary and http_sfv treats as no field) or laxer
    # (what follows base64 padding).
    raw = text.encode()
    if not raw.strip(b" "):
        assert parse_dictionary(raw) == {} and _sfv(raw) is None
        return
    try:
        ours = parse_dictionary(raw)
    except Unsupported:
        return
    except ParseError:
        theirs = _sfv(raw)
        assert theirs is None or _lax_b64(raw), (raw, theirs)
        return
    theirs = _sfv(raw)
    assert theirs == ours or (theirs is None and _unpadded(raw)), (raw, ours, theirs)


def _b64_runs(raw: bytes) -> list[bytes]:
    return raw.split(b":")[1::2]


def _unpadded(raw: bytes) -> bool:
    return any(len(run) % 4 for run in _b64_runs(raw))


def _lax_b64(raw: bytes) -> bool:
    return any(b"=" in run.rstrip(b"=") for run in _b64_runs(raw))
