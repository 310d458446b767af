"""Route rules: glob semantics, first match wins, strict parsing (with hypothesis)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.errors import ConfigError
from verifier.rules import RouteRule, RuleSet, compile_glob, parse_scope


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/payments/*", "/payments/p1", True),
        ("/payments/*", "/payments/", False),
        ("/payments/*", "/payments", False),
        ("/payments/*", "/payments/p1/refund", False),
        ("/payments/*/refund", "/payments/p1/refund", True),
        ("/payments/*/refund", "/payments//refund", False),
        ("/admin/**", "/admin", True),
        ("/admin/**", "/admin/", True),
        ("/admin/**", "/admin/a/b/c", True),
        ("/admin/**", "/administrator", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/y", False),
        ("/files/*.pdf", "/files/report.pdf", True),
        ("/files/*.pdf", "/files/.pdf", True),
        ("/files/*.pdf", "/files/a/b.pdf", False),
        ("/healthz", "/healthz", True),
        ("/healthz", "/healthz/", False),
        ("/healthz", "/HEALTHZ", False),
        ("/v1.0/x", "/v1a0/x", False),  # '.' is literal, not a regex wildcard
        ("/a+b", "/a+b", True),
        ("/a+b", "/aab", False),
    ],
)
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert (compile_glob(pattern).fullmatch(path) is not None) is expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("payments", "start with '/'"),
        ("/a?b", "unsupported glob"),
        ("/a[bc]", "unsupported glob"),
        ("/{id}", "unsupported glob"),
        ("/a b", "printable ASCII"),
        ("/caf\u00e9", "printable ASCII"),
        ("/a**", "whole path segment"),
        ("/***", "whole path segment"),
        ("", "non-empty"),
    ],
)
def test_glob_refuses(pattern: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        compile_glob(pattern)
    assert info.value.key == "path"


def test_first_match_wins_and_head_follows_get() -> None:
    rules = RuleSet(
        [
            RouteRule("/healthz", governed=False),
            RouteRule("/payments/*", methods=["GET"], scope="payments:read"),
            RouteRule("/payments/*", methods="DELETE", scope="payments:delete", name="del"),
            RouteRule("/**"),
        ]
    )
    assert rules.match("GET", "/healthz") is rules.rules[0]
    assert rules.match("POST", "/healthz") is rules.rules[0]
    assert rules.match("GET", "/payments/1") is rules.rules[1]
    # HEAD is answered by the GET handler: it must meet the GET rule, not the catch-all.
    assert rules.match("HEAD", "/payments/1") is rules.rules[1]
    assert rules.match("DELETE", "/payments/1") is rules.rules[2]
    assert rules.match("PUT", "/payments/1") is rules.rules[3]
    assert rules.rules[1].label == "GET /payments/*"
    assert rules.rules[2].label == "del"
    assert rules.rules[3].label == "* /**"
    assert rules.rules[1].scope_required == "payments:read"
    assert rules.rules[3].scope_required is None
    assert RuleSet([RouteRule("/x")]).match("GET", "/y") is None


def test_rule_from_dict() -> None:
    rule = RouteRule.from_dict(
        {
            "methods": ["POST"],
            "path": "/payments/*/refund",
            "scope": "payments:refund payments:read",
            "agents": ["planner", "worker"],
            "tenants": ["acme"],
            "single_use": True,
        }
    )
    assert rule.methods == frozenset({"POST"})
    assert rule.scope == frozenset({"payments:refund", "payments:read"})
    assert rule.agents == frozenset({"planner", "worker"})
    assert rule.single_use and rule.governed
    assert rule.scope_required == "payments:read payments:refund"
    assert RouteRule.from_dict({"path": "/x", "methods": "*"}).methods is None
    assert RouteRule.from_dict({"path": "/x", "scope": ["a:b", "c"]}).scope == {"a:b", "c"}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"path": "/x", "scopes": "a"}, "scopes"),
        ({"methods": ["GET"]}, "path"),
        ({"path": "/x", "methods": ["get"]}, "methods"),
        ({"path": "/x", "methods": ["GET", "GET"]}, "methods"),
        ({"path": "/x", "methods": ["GET", "*"]}, "methods"),
        ({"path": "/x", "methods": []}, "methods"),
        ({"path": "/x", "scope": "a  b"}, "scope"),
        ({"path": "/x", "scope": "a a"}, "scope"),
        ({"path": "/x", "scope": 'a"b'}, "scope"),
        ({"path": "/x", "scope": None}, "scope"),
        ({"path": "/x", "agents": "planner"}, "agents"),
        ({"path": "/x", "agents": []}, "agents"),
        ({"path": "/x", "agents": ["Planner"]}, "agents"),
        ({"path": "/x", "tenants": ["acme", "acme"]}, "tenants"),
        ({"path": "/x", "single_use": "yes"}, "single_use"),
        ({"path": "/x", "governed": 0}, "governed"),
        ({"path": "/x", "governed": False, "scope": "a"}, "governed"),
        ({"path": "/x", "governed": False, "single_use": True}, "single_use"),
        ({"path": "/x", "name": ""}, "name"),
    ],
)
def test_rule_refuses(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouteRule.from_dict(doc)
    assert info.value.key == key


def test_parse_scope() -> None:
    assert parse_scope("") == frozenset()
    assert parse_scope("a b") == {"a", "b"}
    with pytest.raises(ConfigError):
        parse_scope(5)


# --------------------------------------------------------------------------- properties


def _reference(pattern: str, path: str) -> bool:
    """An independent, recursive matcher of the documented glob semantics."""
    want = pattern[1:].split("/")
    have = path[1:].split("/") if path.startswith("/") else None
    if have is None:
        return False

    def seg(p: str, s: str) -> bool:
        if p == "*":
            return s != ""
        parts = p.split("*")
        if len(parts) == 1:
            return p == s
        if not s.startswith(parts[0]) or not s.endswith(parts[-1]):
            return False
        if len(parts[0]) + len(parts[-1]) > len(s):
            return False
        pos = len(parts[0])
        end = len(s) - len(parts[-1])
        for middle in parts[1:-1]:
            found = s.find(middle, pos, end)
            if found < 0:
                return False
            pos = found + len(middle)
        return True

    def go(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "**":
            return any(go(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and seg(want[i], have[j]) and go(i + 1, j + 1)

    return go(0, 0)


_SEGMENT_CHARS = st.sampled_from(["a", "b", ".", "-", "*"])
_segment = st.lists(_SEGMENT_CHARS, min_size=0, max_size=3).map("".join)
_pattern_segment = st.one_of(st.just("**"), st.just("*"), _segment.filter(lambda s: "**" not in s))
_patterns = st.lists(_pattern_segment, min_size=1, max_size=4).map(lambda ss: "/" + "/".join(ss))
_paths = st.lists(
    st.lists(st.sampled_from(["a", "b", ".", "-"]), max_size=3).map("".join),
    min_size=1,
    max_size=5,
).map(lambda ss: "/" + "/".join(ss))


@settings(max_examples=400, deadline=None)
@given(_patterns, _paths)
def test_glob_matches_reference(pattern: str, path: str) -> None:
    assert (compile_glob(pattern).fullmatch(path) is not None) == _reference(pattern, path)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_rule_keys = st.sampled_from(
    ["name", "methods", "path", "scope", "agents", "tenants", "single_use", "governed", "extra"]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_rule_keys, _json_values | st.sampled_from(["/x/*", "GET", "a:b"])))
def test_rule_parser_fails_only_with_config_error(doc: dict[str, Any]) -> None:
    try:
        rule = RouteRule.from_dict(doc)
    except ConfigError as exc:
        # An unknown key is always named.
        if "extra" in doc:
            assert exc.key is not None
        return
    assert "extra" not in doc
    assert isinstance(rule.path, str) and rule.path.startswith("/")
    assert rule.matches("GET", rule.path) in (True, False)
