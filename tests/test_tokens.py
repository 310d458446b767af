"""mint/verify behaviour: round trips, claim types, audience, leeway, TTL, spawn chains."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from _tokens_helpers import (
    AUDIENCE,
    CNF,
    ISSUER,
    JTI,
    NOW,
    SUB,
    b64,
    forge,
    good_claims,
    good_header,
    keyset,
    new_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from axid import tokens
from axid.tokens import ActionClaims, TokenError

KEY = new_key()
KEYS = keyset(KEY)


def mint_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "key": KEY,
        "iss": ISSUER,
        "sub": SUB,
        "aud": AUDIENCE,
        "tenant": "acme",
        "agent": "planner",
        "run": "run-1",
        "spawn_parent": None,
        "chain": [],
        "scope": "payments:refund payments:read",
        "cnf_x5t_s256": CNF,
        "now": NOW,
    }
    args.update(changes)
    return args


def check(token: str | bytes, **kwargs: Any) -> ActionClaims:
    options: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "now": NOW + 1}
    options.update(kwargs)
    return tokens.verify(token, KEYS, **options)


def reason(token: str, **kwargs: Any) -> str:
    with pytest.raises(TokenError) as info:
        check(token, **kwargs)
    assert token not in str(info.value)
    return info.value.reason


def payload_of(token: str) -> dict[str, Any]:
    return json.loads(tokens._b64(token.split(".")[1]))


# ----------------------------------------------------------------- round trip


def test_round_trip() -> None:
    token = tokens.mint(**mint_args())
    claims = check(token)
    assert claims == check(token.encode("ascii"))
    assert claims.iss == ISSUER
    assert claims.sub == SUB
    assert claims.aud == (AUDIENCE,)
    assert (claims.iat, claims.nbf, claims.exp) == (NOW, NOW, NOW + 300)
    assert len(tokens._b64(claims.jti)) == 16
    assert (claims.tenant, claims.agent, claims.run) == ("acme", "planner", "run-1")
    assert claims.spawn_parent is None
    assert claims.chain == ()
    assert claims.scope == frozenset({"payments:refund", "payments:read"})
    assert claims.scope_str == "payments:read payments:refund"  # normalized: sorted
    assert claims.cnf_x5t_s256 == CNF
    assert claims.kid == KEY.kid
    assert claims.to_json() == payload_of(token)


def test_header_is_exactly_the_contract() -> None:
    token = tokens.mint(**mint_args())
    header = tokens._b64(token.split(".")[0])
    assert (
        header
        == json.dumps(
            {"alg": "EdDSA", "typ": "axid+jwt", "kid": KEY.kid}, separators=(",", ":")
        ).encode()
    )


def test_claim_names_are_exactly_the_contract() -> None:
    payload = payload_of(tokens.mint(**mint_args()))
    assert list(payload) == [
        "iss",
        "sub",
        "aud",
        "iat",
        "nbf",
        "exp",
        "jti",
        "tenant",
        "agent",
        "run",
        "spawn_parent",
        "chain",
        "scope",
        "cnf",
    ]
    assert payload["cnf"] == {"x5t#S256": CNF}


def test_jti_is_random_and_can_be_given() -> None:
    assert check(tokens.mint(**mint_args())).jti != check(tokens.mint(**mint_args())).jti
    assert check(tokens.mint(**mint_args(jti=JTI))).jti == JTI


def test_pyjwt_interoperates() -> None:
    # Our tokens decode with PyJWT's own full verifier ...
    token = tokens.mint(**mint_args(now=NOW))
    decoded = jwt.decode(
        token,
        KEY.public_key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert decoded == payload_of(token)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "axid+jwt", "kid": KEY.kid}
    # ... and tokens PyJWT encodes with our header verify here.
    other = jwt.encode(
        good_claims(),
        KEY.private_key,
        algorithm="EdDSA",
        headers={"typ": "axid+jwt", "kid": KEY.kid},
    )
    assert check(other).run == "run-2"


# ----------------------------------------------------------------- time


def test_expiry_boundaries_without_leeway() -> None:
    token = tokens.mint(**mint_args())
    assert check(token, now=NOW).exp == NOW + 300
    assert check(token, now=NOW + 299.999).exp == NOW + 300
    assert reason(token, now=NOW + 300) == "token_expired"
    assert reason(token, now=NOW - 0.001) == "token_not_yet_valid"


def test_leeway_widens_both_ends() -> None:
    token = tokens.mint(**mint_args())
    assert check(token, now=NOW + 329, leeway=30)
    assert reason(token, now=NOW + 330, leeway=30) == "token_expired"
    assert check(token, now=NOW - 30, leeway=30)
    assert reason(token, now=NOW - 31, leeway=30) == "token_not_yet_valid"


@pytest.mark.parametrize("leeway", [31, -1, 1.5, True, "5", None])
def test_leeway_bounds_are_programming_errors(leeway: object) -> None:
    token = tokens.mint(**mint_args())
    with pytest.raises(ValueError):
        check(token, leeway=leeway)


def test_now_defaults_to_the_wall_clock() -> None:
    token = tokens.mint(**mint_args())
    with pytest.raises(TokenError) as info:
        tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE)
    assert info.value.reason == "token_expired"  # NOW is in 2023


def test_nbf_in_the_future() -> None:
    token = tokens.mint(**mint_args(nbf=NOW + 100))
    assert reason(token, now=NOW + 50) == "token_not_yet_valid"
    assert check(token, now=NOW + 100).nbf == NOW + 100


def test_iat_in_the_future_is_not_yet_valid() -> None:
    token = forge(good_header(KEY.kid), good_claims(iat=NOW + 60, nbf=NOW + 60), KEY)
    assert reason(token, now=NOW) == "token_not_yet_valid"


def test_inconsistent_times_are_malformed() -> None:
    token = forge(good_header(KEY.kid), good_claims(nbf=NOW - 1), KEY)
    assert reason(token) == "token_malformed"
    token = forge(good_header(KEY.kid), good_claims(exp=NOW), KEY)
    assert reason(token) == "token_malformed"
    token = forge(good_header(KEY.kid), good_claims(exp=NOW - 10), KEY)
    assert reason(token) == "token_malformed"


def test_ttl_cap() -> None:
    assert check(tokens.mint(**mint_args(ttl=300))).exp == NOW + 300
    assert check(tokens.mint(**mint_args(ttl=1)), now=NOW).exp == NOW + 1
    for ttl in (301, 0, -5, 10.0, True):
        with pytest.raises(ValueError):
            tokens.mint(**mint_args(ttl=ttl))
    token = forge(good_header(KEY.kid), good_claims(exp=NOW + 301), KEY)
    assert reason(token) == "token_ttl_too_long"
    # TTL is judged before time: an over-long token is refused even while "valid".
    assert reason(token, now=NOW + 5) == "token_ttl_too_long"


@pytest.mark.parametrize(
    "changes",
    [{"iat": -1}, {"iat": 2**53}, {"nbf": 1.0 * NOW}, {"iat": True}, {"exp": "1"}],
)
def test_integer_claims(changes: dict[str, Any]) -> None:
    token = forge(good_header(KEY.kid), good_claims(**changes), KEY)
    assert reason(token) == "token_malformed"


# ----------------------------------------------------------------- issuer and audience


def test_wrong_issuer() -> None:
    token = tokens.mint(**mint_args())
    assert reason(token, issuer=ISSUER + "/") == "token_wrong_issuer"
    assert reason(token, issuer=ISSUER.upper()) == "token_wrong_issuer"


def test_audience_list() -> None:
    token = tokens.mint(**mint_args(aud=["payments", "ledger"]))
    assert payload_of(token)["aud"] == ["payments", "ledger"]
    assert check(token, audience="payments").aud == ("payments", "ledger")
    assert check(token, audience="ledger").aud == ("payments", "ledger")
    assert reason(token, audience="billing") == "token_wrong_audience"
    assert reason(token, audience="payment") == "token_wrong_audience"


def test_audience_single_string() -> None:
    token = tokens.mint(**mint_args(aud="payments"))
    assert payload_of(token)["aud"] == "payments"
    # No substring matching on a string aud.
    assert reason(token, audience="pay") == "token_wrong_audience"


def test_audience_cannot_be_skipped_by_accident() -> None:
    token = tokens.mint(**mint_args())
    for audience in (None, "", ["payments"]):
        with pytest.raises(TypeError):
            tokens.verify(token, KEYS, issuer=ISSUER, audience=audience, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tokens.verify(token, KEYS, issuer=ISSUER, now=NOW)  # type: ignore[call-arg]


def test_verify_parent_token_skips_only_the_audience() -> None:
    token = tokens.mint(**mint_args(aud="some-other-service"))
    claims = tokens.verify_parent_token(token, KEYS, issuer=ISSUER, now=NOW + 1)
    assert claims.aud == ("some-other-service",)
    with pytest.raises(TokenError) as info:
        tokens.verify_parent_token(token, KEYS, issuer=ISSUER, now=NOW + 300)
    assert info.value.reason == "token_expired"
    with pytest.raises(TokenError) as info:
        tokens.verify_parent_token(token, KEYS, issuer="https://evil", now=NOW + 1)
    assert info.value.reason == "token_wrong_issuer"


@pytest.mark.parametrize("aud", [[], [""], ["ok", 1], "", 5, {"a": 1}])
def test_bad_aud_claims(aud: object) -> None:
    token = forge(good_header(KEY.kid), good_claims(aud=aud), KEY)
    assert reason(token) == "token_malformed"


# ----------------------------------------------------------------- claim types


@pytest.mark.parametrize(
    "changes",
    [
        {"iss": ""},
        {"iss": 1},
        {"tenant": ""},
        {"tenant": "ac\nme"},
        {"agent": None},
        {"run": ["run"]},
        {"jti": "AAAA"},
        {"jti": JTI[:-1] + "B"},  # non-canonical trailing bits
        {"jti": JTI + "A"},
        {"scope": ""},
        {"scope": "a  b"},
        {"scope": " a"},
        {"scope": "a b a"},
        {"scope": 'a "b"'},
        {"scope": ["a"]},
        {"cnf": {"x5t#S256": CNF[:-1]}},
        {"cnf": {"x5t#S256": CNF, "jkt": "x"}},
        {"cnf": "x"},
        {"cnf": {"x5t#S256": 1}},
        {"tenant": "\ud800"},
    ],
)
def test_wrong_claim_types_are_malformed(changes: dict[str, Any]) -> None:
    token = forge(good_header(KEY.kid), good_claims(**changes), KEY)
    assert reason(token) == "token_malformed"


@pytest.mark.parametrize(
    "changes",
    [
        {"iss": ""},
        {"tenant": 1},
        {"agent": "a\tb"},
        {"sub": "spiffe://example.org"},
        {"sub": "spiffe://EXAMPLE.org/x"},
        {"aud": []},
        {"aud": [""]},
        {"scope": ""},
        {"scope": []},
        {"scope": ["a b"]},
        {"cnf_x5t_s256": "abc"},
        {"jti": "short"},
        {"now": -1},
        {"now": 1.5},
        {"nbf": NOW - 1},
        {"nbf": NOW + 300},
    ],
)
def test_mint_refuses_what_verify_would_refuse(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        tokens.mint(**mint_args(**changes))


def test_mint_scope_forms() -> None:
    as_list = check(tokens.mint(**mint_args(scope=["b:x", "a:y", "b:x"])))
    assert as_list.scope_str == "a:y b:x"
    assert as_list.scope == frozenset({"a:y", "b:x"})
    assert check(tokens.mint(**mint_args(scope="one"))).scope_str == "one"


def test_mint_refuses_a_string_chain() -> None:
    with pytest.raises(ValueError, match="string"):
        tokens.mint(**mint_args(run="run-2", spawn_parent="1", chain="run-1"))


def test_mint_needs_a_signing_key() -> None:
    with pytest.raises(TypeError):
        tokens.mint(**mint_args(key=KEY.private_key))


def test_mint_refuses_oversized_tokens() -> None:
    with pytest.raises(ValueError, match="larger"):
        tokens.mint(**mint_args(tenant="t" * 7000))


# ----------------------------------------------------------------- spawn chain


def test_child_chain_round_trip() -> None:
    token = tokens.mint(**mint_args(run="run-2", spawn_parent="run-1", chain=["run-0", "run-1"]))
    claims = check(token)
    assert claims.spawn_parent == "run-1"
    assert claims.chain == ("run-0", "run-1")


def test_chain_depth_limit() -> None:
    chain = [f"run-{i}" for i in range(tokens.MAX_CHAIN_DEPTH)]
    claims = check(tokens.mint(**mint_args(run="leaf", spawn_parent=chain[-1], chain=chain)))
    assert len(claims.chain) == tokens.MAX_CHAIN_DEPTH
    deeper = [*chain, "run-x"]
    with pytest.raises(ValueError):
        tokens.mint(**mint_args(run="leaf", spawn_parent="run-x", chain=deeper))
    forged = forge(
        good_header(KEY.kid), good_claims(run="leaf", spawn_parent="run-x", chain=deeper), KEY
    )
    assert reason(forged) == "token_malformed"


@pytest.mark.parametrize(
    ("spawn_parent", "chain", "run"),
    [
        (None, ["run-0"], "run-1"),  # root with ancestors
        ("run-0", [], "run-1"),  # child without chain
        ("run-0", ["run-0", "run-1"], "run-2"),  # parent is not chain[-1]
        ("run-1", ["run-1", "run-1"], "run-2"),  # repeated run id
        ("run-1", ["run-1"], "run-1"),  # own parent
        ("run-1", ["run-2", "run-1"], "run-2"),  # own ancestor
        ("", [""], "run-2"),  # empty ids
        (1, [1], "run-2"),
        ("run-1", "run-1", "run-2"),  # chain not a list
    ],
)
def test_inconsistent_chains(spawn_parent: object, chain: object, run: str) -> None:
    forged = forge(
        good_header(KEY.kid), good_claims(spawn_parent=spawn_parent, chain=chain, run=run), KEY
    )
    assert reason(forged) == "token_malformed"
    with pytest.raises((ValueError, TypeError)):
        tokens.mint(**mint_args(spawn_parent=spawn_parent, chain=chain, run=run))


# ----------------------------------------------------------------- errors


def test_token_error_carries_reason_and_message() -> None:
    err = TokenError("token_expired", "token has expired")
    assert err.reason == "token_expired"
    assert err.message == "token has expired"
    assert str(err) == "token_expired: token has expired"
    assert {
        "token_missing",
        "token_malformed",
        "token_too_large",
        "token_bad_alg",
        "token_bad_type",
        "token_unknown_kid",
        "token_bad_signature",
        "token_expired",
        "token_not_yet_valid",
        "token_ttl_too_long",
        "token_wrong_issuer",
        "token_wrong_audience",
        "token_missing_claim",
    } == tokens.REASONS


def test_wrong_key_set_type_is_a_programming_error() -> None:
    token = tokens.mint(**mint_args())
    with pytest.raises(TypeError):
        tokens.verify(token, {KEY.kid: KEY.public_key}, issuer=ISSUER, audience=AUDIENCE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tokens.verify(12345, KEYS, issuer=ISSUER, audience=AUDIENCE)  # type: ignore[arg-type]


_slug = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_scope_item = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:._", min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(
    tenant=_slug,
    agent=_slug,
    runs=st.lists(_slug, min_size=1, max_size=tokens.MAX_CHAIN_DEPTH + 1, unique=True),
    auds=st.lists(_slug, min_size=1, max_size=3),
    scopes=st.lists(_scope_item, min_size=1, max_size=5),
    ttl=st.integers(min_value=1, max_value=tokens.MAX_TTL),
    offset=st.integers(min_value=0, max_value=tokens.MAX_TTL),
)
def test_mint_verify_property(
    tenant: str,
    agent: str,
    runs: list[str],
    auds: list[str],
    scopes: list[str],
    ttl: int,
    offset: int,
) -> None:
    *chain, run = runs
    token = tokens.mint(
        **mint_args(
            tenant=tenant,
            agent=agent,
            run=run,
            chain=chain,
            spawn_parent=chain[-1] if chain else None,
            aud=auds,
            scope=scopes,
            ttl=ttl,
        )
    )
    if offset < ttl:
        claims = check(token, now=NOW + offset, audience=auds[-1])
        assert claims.chain == tuple(chain)
        assert claims.scope == frozenset(scopes)
        assert claims.exp - claims.iat == ttl
    else:
        assert reason(token, now=NOW + offset, audience=auds[-1]) == "token_expired"


def test_b64_helper_sanity() -> None:
    assert b64(b"\x00" * 16) == "A" * 22
