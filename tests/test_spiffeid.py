"""Strict SPIFFE ID parsing (mtls.spiffeid): spec table, patterns, property tests."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtls.spiffeid import (
    SpiffeId,
    SpiffeIdError,
    SpiffeIdPattern,
    TrustDomain,
    parse_spiffe_id,
    parse_trust_domain,
)

TD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_ALPHABET = TD_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# An independent statement of the grammar: a segment is allowed characters with at least
# one non-dot, or three or more dots (so neither "." nor ".."). No lookarounds.
_REF_SEGMENT = r"(?:[-._a-zA-Z0-9]*[-_a-zA-Z0-9][-._a-zA-Z0-9]*|\.{3,})"
REFERENCE = re.compile(r"spiffe://([-._a-z0-9]+)((?:/" + _REF_SEGMENT + r")*)")


def reference_accepts(s: str) -> bool:
    m = REFERENCE.fullmatch(s)
    return (
        m is not None and len(s.encode("utf-8")) <= 2048 and len(m.group(1).encode("utf-8")) <= 255
    )


def _id_of_length(n: int) -> str:
    base = "spiffe://example.org"
    out = base
    while len(out) < n:
        room = n - len(out) - 1  # minus the "/"
        out += "/" + "a" * min(room, 200)
    assert len(out) == n
    return out


VALID = [
    "spiffe://example.org",
    "spiffe://example.org/workload",
    "spiffe://example.org/a/b/c",
    "spiffe://a",
    "spiffe://example.org/Mixed.Case_path-1",
    "spiffe://my-td_1.example/x",
    "spiffe://example.org/.../x",
    "spiffe://example.org/.hidden/x.",
    "spiffe://example.org/..a",
    "spiffe://1.2.3.4/x",
    "spiffe://acme.prod/agent/planner",
    "spiffe://example.org/" + "A" * 100,
    "spiffe://" + "a" * 255 + "/x",
    _id_of_length(2048),
]

INVALID = [
    # (value, rule)
    ("", "empty"),
    ("spiffe://Example.org/x", "trust_domain_chars"),
    ("spiffe://EXAMPLE.ORG", "trust_domain_chars"),
    ("SPIFFE://example.org/x", "scheme"),
    ("Spiffe://example.org/x", "scheme"),
    ("spiffe://example.org/a\n", "path_chars"),
    ("spiffe://example.org\n", "trust_domain_chars"),
    ("spiffe://example.org/a\r\n", "path_chars"),
    ("spiffe://example.org/%2e", "percent_encoding"),
    ("spiffe://example.org/a%2Fb", "percent_encoding"),
    ("spiffe://example.org/%2e%2e/x", "percent_encoding"),
    ("spiffe://example%2eorg/x", "percent_encoding"),
    ("spiffe://example.org/..", "dot_segment"),
    ("spiffe://example.org/a/../b", "dot_segment"),
    ("spiffe://example.org/.", "dot_segment"),
    ("spiffe://example.org/a/./b", "dot_segment"),
    ("spiffe://example.org//a", "empty_segment"),
    ("spiffe://example.org/a//b", "empty_segment"),
    ("spiffe://example.org/a/", "trailing_slash"),
    ("spiffe://example.org/", "trailing_slash"),
    ("spiffe://example.org:8443/x", "port"),
    ("spiffe://example.org:/x", "port"),
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://user:pw@example.org/x", "userinfo"),
    ("spiffe://example.org/x?a=b", "query"),
    ("spiffe://example.org?a", "query"),
    ("spiffe://example.org/x#frag", "fragment"),
    ("spiffe://example.org#", "fragment"),
    ("spiffe://", "empty_trust_domain"),
    ("spiffe:///x", "empty_trust_domain"),
    ("spiffe:/x", "scheme"),
    ("spiffe:example.org/x", "scheme"),
    ("http://example.org/x", "scheme"),
    ("https://example.org", "scheme"),
    ("example.org/x", "scheme"),
    ("//example.org/x", "scheme"),
    (_id_of_length(2049), "too_long"),
    ("spiffe://" + "a" * 256 + "/x", "trust_domain_too_long"),
    ("spiffe://[::1]/x", "trust_domain_chars"),
    ("spiffe://[::1]:8443/x", "trust_domain_chars"),
    ("spiffe://exämple.org/x", "non_ascii"),
    ("spiffe://example.org/wörk", "non_ascii"),
    ("spiffe://example.org/x\u200b", "non_ascii"),
    ("spiffe://example.org/\uff41", "non_ascii"),
    ("spiffe://example.org/a b", "path_chars"),
    (" spiffe://example.org/x", "scheme"),
    ("spiffe://example.org/x ", "path_chars"),
    ("spiffe://exa mple.org/x", "trust_domain_chars"),
    ("spiffe://example.org/a\tb", "path_chars"),
    ("spiffe://example.org\t/x", "trust_domain_chars"),
    ("spiffe://example.org/a\x00", "path_chars"),
    ("spiffe://example\x00.org", "trust_domain_chars"),
    ("spiffe://example.org/a$b", "path_chars"),
    ("spiffe://example.org/a:b", "path_chars"),
    ("spiffe://example.org/a+b", "path_chars"),
    ("spiffe://example.org/a*", "path_chars"),
    ("spiffe://example.org\\x", "trust_domain_chars"),
    ("spiffe://example.org/a\\b", "path_chars"),
    ("spiffe://exa+mple.org", "trust_domain_chars"),
]


@pytest.mark.parametrize("value", VALID, ids=lambda v: repr(v)[:60])
def test_valid_ids_round_trip(value: str) -> None:
    sid = SpiffeId.parse(value)
    assert str(sid) == value
    assert parse_spiffe_id(value) == sid
    assert reference_accepts(value)


@pytest.mark.parametrize(("value", "rule"), INVALID, ids=lambda v: repr(v)[:60])
def test_invalid_ids_name_their_rule(value: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(value)
    assert info.value.rule == rule
    # The message names the rule; the check is against the rule, not the wording.
    assert f"[{rule}]" in str(info.value)
    assert not reference_accepts(value)


def test_table_is_large_enough() -> None:
    assert len(VALID) + len(INVALID) >= 40


def test_boundary_lengths() -> None:
    assert len(str(SpiffeId.parse(_id_of_length(2048)))) == 2048
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(_id_of_length(2049))
    assert info.value.rule == "too_long"


@pytest.mark.parametrize("value", [None, b"spiffe://example.org/x", 42, ["spiffe://x"]])
def test_non_str_rejected(value: object) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(value)  # type: ignore[arg-type]
    assert info.value.rule == "type"


def test_error_is_value_error_and_message_names_the_part() -> None:
    with pytest.raises(ValueError, match=r"Example\.org"):
        SpiffeId.parse("spiffe://Example.org/x")
    with pytest.raises(SpiffeIdError, match=r"'\.\.'"):
        SpiffeId.parse("spiffe://example.org/a/..")


def test_accessors() -> None:
    sid = SpiffeId.parse("spiffe://example.org/agent/planner")
    assert sid.trust_domain == TrustDomain("example.org")
    assert sid.path == "/agent/planner"
    assert sid.segments == ("agent", "planner")
    assert sid.member_of(TrustDomain("example.org"))
    assert not sid.member_of(TrustDomain("example.com"))
    assert not sid.member_of(TrustDomain("example.org.evil"))
    td_id = SpiffeId.parse("spiffe://example.org")
    assert td_id.path == ""
    assert td_id.segments == ()
    assert td_id == TrustDomain("example.org").id()
    assert hash(sid) == hash(SpiffeId.parse(str(sid)))


def test_direct_construction_validates() -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId(TrustDomain("example.org"), "/a/")
    assert info.value.rule == "trailing_slash"
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId(TrustDomain("example.org"), "a")
    assert info.value.rule == "path_chars"
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId("example.org", "/a")  # type: ignore[arg-type]
    assert info.value.rule == "type"
    with pytest.raises(SpiffeIdError) as info:
        TrustDomain("Example.org")
    assert info.value.rule == "trust_domain_chars"


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("a", "a"),
        ("my_td-1.example", "my_td-1.example"),
    ],
)
def test_trust_domain_parse_valid(value: str, name: str) -> None:
    td = TrustDomain.parse(value)
    assert td.name == name
    assert str(td) == name
    assert parse_trust_domain(value) == td
    assert str(td.id()) == "spiffe://" + name


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "empty_trust_domain"),
        ("Example.org", "trust_domain_chars"),
        ("example.org\n", "trust_domain_chars"),
        ("example.org:443", "port"),
        ("user@example.org", "userinfo"),
        ("spiffe://example.org/x", "trust_domain_has_path"),
        ("spiffe://example.org/", "trust_domain_has_path"),
        ("SPIFFE://example.org", "scheme"),
        ("spiffe:/example.org", "scheme"),
        ("http://example.org", "scheme"),
        ("spiffe://", "empty_trust_domain"),
        ("example.org/x", "trust_domain_chars"),
        ("exämple.org", "non_ascii"),
        ("a" * 256, "trust_domain_too_long"),
        ("[::1]", "trust_domain_chars"),
    ],
)
def test_trust_domain_parse_invalid(value: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        TrustDomain.parse(value)
    assert info.value.rule == rule


def test_from_segments() -> None:
    assert str(SpiffeId.from_segments("example.org", "agent", "planner")) == (
        "spiffe://example.org/agent/planner"
    )
    assert str(SpiffeId.from_segments(TrustDomain("example.org"))) == "spiffe://example.org"
    assert SpiffeId.from_segments("spiffe://example.org", "x") == SpiffeId.parse(
        "spiffe://example.org/x"
    )
    for segments, rule in [
        (("a/b",), "path_chars"),
        (("",), "empty_segment"),
        ((".",), "dot_segment"),
        (("..",), "dot_segment"),
        (("a b",), "path_chars"),
        (("%2e",), "percent_encoding"),
        (("é",), "non_ascii"),
        (("a" * 2040,), "too_long"),
    ]:
        with pytest.raises(SpiffeIdError) as info:
            SpiffeId.from_segments("example.org", *segments)
        assert info.value.rule == rule, segments
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.from_segments("Example.org", "x")
    assert info.value.rule == "trust_domain_chars"


def test_from_py_spiffe_is_strict() -> None:
    from spiffe import SpiffeId as PySpiffeId

    ok = SpiffeId.from_py_spiffe(PySpiffeId("spiffe://example.org/agent/planner"))
    assert ok == SpiffeId.parse("spiffe://example.org/agent/planner")
    # py-spiffe keeps a trailing newline; we do not.
    lenient = PySpiffeId("spiffe://example.org/a\n")
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.from_py_spiffe(lenient)
    assert info.value.rule == "path_chars"


# --- patterns -------------------------------------------------------------------------

PATTERN_CASES = [
    # (pattern, id, matches)
    ("spiffe://acme.prod/agent/planner", "spiffe://acme.prod/agent/planner", True),
    ("spiffe://acme.prod/agent/planner", "spiffe://acme.prod/agent/planner2", False),
    ("spiffe://acme.prod/agent/planner", "spiffe://acme.prod/agent/Planner", False),
    ("spiffe://acme.prod/agent/planner", "spiffe://acme.prod/agent/planner/x", False),
    ("spiffe://acme.prod/agent/planner", "spiffe://acme.dev/agent/planner", False),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/agent/planner", True),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/agent/worker", True),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/agent", False),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/agent/a/b", False),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/svc/a", False),
    ("spiffe://acme.prod/*/planner", "spiffe://acme.prod/agent/planner", True),
    ("spiffe://acme.prod/*/planner", "spiffe://acme.prod/a/b/planner", False),
    ("spiffe://acme.prod/agent/**", "spiffe://acme.prod/agent/a", True),
    ("spiffe://acme.prod/agent/**", "spiffe://acme.prod/agent/a/b/c", True),
    ("spiffe://acme.prod/agent/**", "spiffe://acme.prod/agent", False),
    ("spiffe://acme.prod/agent/**", "spiffe://acme.prod/agents/a", False),
    ("spiffe://acme.prod/**", "spiffe://acme.prod/anything", True),
    ("spiffe://acme.prod/**", "spiffe://acme.prod/a/b", True),
    ("spiffe://acme.prod/**", "spiffe://acme.prod", False),
    ("spiffe://acme.prod/**", "spiffe://acme.prod.evil/a", False),
    ("spiffe://acme.prod/**", "spiffe://evil.acme.prod/a", False),
    ("spiffe://acme.prod", "spiffe://acme.prod", True),
    ("spiffe://acme.prod", "spiffe://acme.prod/a", False),
    ("spiffe://acme.prod/*/*", "spiffe://acme.prod/a/b", True),
    ("spiffe://acme.prod/*/**", "spiffe://acme.prod/a/b/c", True),
    ("spiffe://acme.prod/*/**", "spiffe://acme.prod/a", False),
    # Invalid IDs never match, even a catch-all pattern.
    ("spiffe://acme.prod/**", "spiffe://ACME.prod/a", False),
    ("spiffe://acme.prod/**", "spiffe://acme.prod/a\n", False),
    ("spiffe://acme.prod/**", "spiffe://acme.prod/a/", False),
    ("spiffe://acme.prod/**", "spiffe://acme.prod/%61", False),
    ("spiffe://acme.prod/agent/*", "spiffe://acme.prod/agent/..", False),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), PATTERN_CASES)
def test_pattern_matching(pattern: str, value: str, expected: bool) -> None:
    p = SpiffeIdPattern.parse(pattern)
    assert str(p) == pattern
    assert p.matches(value) is expected
    try:
        sid = SpiffeId.parse(value)
    except SpiffeIdError:
        return
    assert p.matches(sid) is expected


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("spiffe://*/agent", "wildcard_trust_domain"),
        ("spiffe://acme.*/agent", "wildcard_trust_domain"),
        ("spiffe://**", "wildcard_trust_domain"),
        ("spiffe://acme.prod/agent-*", "partial_wildcard"),
        ("spiffe://acme.prod/*agent", "partial_wildcard"),
        ("spiffe://acme.prod/***", "partial_wildcard"),
        ("spiffe://acme.prod/**/x", "wildcard_position"),
        ("spiffe://acme.prod/a/**/**", "wildcard_position"),
        ("spiffe://ACME.prod/*", "trust_domain_chars"),
        ("SPIFFE://acme.prod/*", "scheme"),
        ("spiffe://acme.prod/a/", "trailing_slash"),
        ("spiffe://acme.prod//*", "empty_segment"),
        ("spiffe://acme.prod/../*", "dot_segment"),
        ("spiffe://acme.prod/a?b", "query"),
        ("spiffe://acme.prod/*\n", "partial_wildcard"),
        ("spiffe://acme.prod/a\n", "path_chars"),
        ("spiffe://acme.prod:1/*", "port"),
        ("", "empty"),
    ],
)
def test_pattern_parse_errors(pattern: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeIdPattern.parse(pattern)
    assert info.value.rule == rule


def test_pattern_non_id_argument_does_not_match() -> None:
    p = SpiffeIdPattern.parse("spiffe://acme.prod/**")
    assert p.matches(None) is False  # type: ignore[arg-type]
    assert p.matches(b"spiffe://acme.prod/a") is False  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------

td_names = st.text(alphabet=TD_ALPHABET, min_size=1, max_size=40)
segments = st.text(alphabet=SEG_ALPHABET, min_size=1, max_size=15).filter(
    lambda s: s not in (".", "..")
)
segment_lists = st.lists(segments, min_size=0, max_size=6)


@given(td_names, segment_lists)
def test_prop_valid_ids_round_trip(td: str, segs: list[str]) -> None:
    s = "spiffe://" + td + "".join("/" + x for x in segs)
    sid = SpiffeId.parse(s)
    assert str(sid) == s
    assert sid.segments == tuple(segs)
    assert SpiffeId.from_segments(td, *segs) == sid
    assert reference_accepts(s)


# Text biased towards the interesting characters, with and without the scheme.
_NASTY = "spifE:/.%@?#[]-_aZ9 \t\n\r\x00\\é*"
nasty_text = st.text(alphabet=_NASTY, max_size=40)
id_like = st.one_of(
    st.text(max_size=60),
    nasty_text,
    st.builds(lambda x: "spiffe://" + x, nasty_text),
    st.builds(lambda x: "spiffe://" + x, st.text(max_size=40)),
    st.builds(
        lambda td, rest: "spiffe://" + td + rest,
        td_names,
        st.text(alphabet="/.aZ%\n ", max_size=20),
    ),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(id_like)
def test_prop_arbitrary_text_only_raises_spiffe_id_error(s: str) -> None:
    try:
        sid = SpiffeId.parse(s)
    except SpiffeIdError as e:
        assert e.rule
        assert not reference_accepts(s)
    else:
        # Accepted -> the independent reference grammar agrees, and it round-trips.
        assert reference_accepts(s)
        assert str(sid) == s


@settings(max_examples=300)
@given(id_like)
def test_prop_accepted_iff_reference_accepts(s: str) -> None:
    try:
        SpiffeId.parse(s)
        accepted = True
    except SpiffeIdError:
        accepted = False
    assert accepted == reference_accepts(s)


@given(id_like)
def test_prop_patterns_and_trust_domains_only_raise_spiffe_id_error(s: str) -> None:
    for fn in (SpiffeIdPattern.parse, TrustDomain.parse):
        with contextlib.suppress(SpiffeIdError):
            fn(s)
    assert SpiffeIdPattern.parse("spiffe://a/**").matches(s) in (True, False)


@given(td_names, segment_lists, st.lists(segments, min_size=1, max_size=5))
def test_prop_star_never_crosses_slash(td: str, prefix: list[str], rest: list[str]) -> None:
    base = "spiffe://" + td + "".join("/" + x for x in prefix)
    sid = SpiffeId.parse(base + "".join("/" + x for x in rest))
    one = SpiffeIdPattern.parse(base + "/*")
    many = SpiffeIdPattern.parse(base + "/**")
    assert one.matches(sid) is (len(rest) == 1)
    assert many.matches(sid) is True
    # '*' in every position matches exactly IDs of the same depth.
    stars = SpiffeIdPattern.parse("spiffe://" + td + "/*" * len(prefix + rest))
    assert stars.matches(sid)
    deeper = SpiffeIdPattern.parse("spiffe://" + td + "/*" * (len(prefix + rest) + 1))
    assert not deeper.matches(sid)
    # A different trust domain never matches.
    other = SpiffeIdPattern.parse("spiffe://" + td + "x/**")
    assert not other.matches(sid)


@given(td_names, segment_lists)
def test_prop_exact_pattern_matches_only_itself(td: str, segs: list[str]) -> None:
    s = "spiffe://" + td + "".join("/" + x for x in segs)
    p = SpiffeIdPattern.parse(s)
    assert p.matches(s)
    assert not p.matches(s + "/x")
    if segs:
        assert not p.matches(s[: s.rfind("/")])
