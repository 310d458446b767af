"""Approval tokens (typ axid-approval+jwt): mint, the shared verification, strict claims,
and that an action token is never an approval token nor the reverse."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from _tokens_helpers import AUDIENCE, CNF, ISSUER, JTI, NOW, SUB, forge, keyset, new_key
from hypothesis import given, settings
from hypothesis import strategies as st

from axid import tokens
from axid._approval_claims import _approval_claims
from axid.tokens import ApprovalClaims, ApprovedRequest, TokenError

KEY = new_key()
KEYS = keyset(KEY)
APPROVER = "spiffe://example.org/human/admin"
APPROVAL_ID = "EBESExQVFhcYGRobHB0eHw"  # bytes 16..31
BODY = hashlib.sha256(b"").hexdigest()
REQ = ApprovedRequest("DELETE", "/payments/p-1?force=1", BODY)


def mint_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "key": KEY,
        "iss": ISSUER,
        "sub": SUB,
        "aud": AUDIENCE,
        "tenant": "acme",
        "run": "run-1",
        "approval": APPROVAL_ID,
        "approver": APPROVER,
        "req": REQ,
        "cnf_x5t_s256": CNF,
        "now": NOW,
    }
    args.update(changes)
    return args


def payload(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": SUB,
        "cnf": {"x5t#S256": CNF},
        "aud": AUDIENCE,
        "iat": NOW,
        "exp": NOW + 300,
        "jti": JTI,
        "approval": APPROVAL_ID,
        "approver": APPROVER,
        "tenant": "acme",
        "run": "run-1",
        "req": REQ.to_json(),
    }
    claims.update(changes)
    return claims


def approval_header() -> dict[str, str]:
    return {"alg": "EdDSA", "typ": "axid-approval+jwt", "kid": KEY.kid}


def check(token: str, **kwargs: Any) -> ApprovalClaims:
    options: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "now": NOW + 1}
    options.update(kwargs)
    return tokens.verify_approval(token, KEYS, **options)


def reason_of(call: Any) -> str:
    with pytest.raises(TokenError) as info:
        call()
    return info.value.reason


def action_token() -> str:
    return tokens.mint(
        key=KEY,
        iss=ISSUER,
        sub=SUB,
        aud=AUDIENCE,
        tenant="acme",
        agent="planner",
        run="run-1",
        spawn_parent=None,
        chain=[],
        scope="payments:delete",
        cnf_x5t_s256=CNF,
        now=NOW,
    )


def test_round_trip() -> None:
    token = tokens.mint_approval(**mint_args())
    claims = check(token)
    assert claims.approval == APPROVAL_ID and claims.approver == APPROVER
    assert claims.req == REQ and claims.run == "run-1" and claims.tenant == "acme"
    assert claims.sub == SUB and claims.cnf_x5t_s256 == CNF and claims.kid == KEY.kid
    assert claims.exp - claims.iat == 300 and claims.nbf == claims.iat
    assert set(claims.to_json()) == set(payload())


def test_header_and_claim_names_are_the_contract() -> None:
    import base64
    import json

    header, body, _ = tokens.mint_approval(**mint_args()).split(".")
    decode = lambda s: json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))  # noqa: E731
    assert decode(header) == approval_header()
    assert set(decode(body)) == {
        "iss", "sub", "cnf", "aud", "iat", "exp", "jti",
        "approval", "approver", "tenant", "run", "req",
    }  # fmt: skip


def test_an_action_token_is_not_an_approval_token() -> None:
    token = action_token()
    assert reason_of(lambda: check(token)) == "token_bad_type"
    # ... and stays refused after the action verification cached its header.
    tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    assert reason_of(lambda: check(token)) == "token_bad_type"


def test_an_approval_token_is_not_an_action_token() -> None:
    token = tokens.mint_approval(**mint_args())
    check(token)  # its header is now cached as an approval header
    verify = lambda: tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)  # noqa: E731
    assert reason_of(verify) == "token_bad_type"
    parent = lambda: tokens.verify_parent_token(token, KEYS, issuer=ISSUER, now=NOW + 1)  # noqa: E731
    assert reason_of(parent) == "token_bad_type"


def test_action_claims_under_an_approval_header_are_refused() -> None:
    action_payload = {
        "iss": ISSUER, "sub": SUB, "aud": AUDIENCE, "iat": NOW, "nbf": NOW, "exp": NOW + 60,
        "jti": JTI, "tenant": "acme", "agent": "planner", "run": "run-1",
        "spawn_parent": None, "chain": [], "scope": "payments:delete",
        "cnf": {"x5t#S256": CNF},
    }  # fmt: skip
    token = forge(approval_header(), action_payload, KEY)
    assert reason_of(lambda: check(token)) == "token_missing_claim"
    # Approval claims under an action header: refused by the action parser.
    forged = forge({**approval_header(), "typ": "axid+jwt"}, payload(), KEY)
    verify = lambda: tokens.verify(forged, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)  # noqa: E731
    assert reason_of(verify) == "token_missing_claim"


def test_times() -> None:
    token = tokens.mint_approval(**mint_args(ttl=60))
    assert reason_of(lambda: check(token, now=NOW + 60)) == "token_expired"
    assert check(token, now=NOW + 59).exp == NOW + 60
    assert reason_of(lambda: check(token, now=NOW - 1)) == "token_not_yet_valid"
    long = forge(approval_header(), payload(exp=NOW + 301), KEY)
    assert reason_of(lambda: check(long)) == "token_ttl_too_long"
    backwards = forge(approval_header(), payload(exp=NOW), KEY)
    assert reason_of(lambda: check(backwards)) == "token_malformed"


def test_issuer_and_audience() -> None:
    token = tokens.mint_approval(**mint_args())
    assert reason_of(lambda: check(token, issuer="https://other")) == "token_wrong_issuer"
    assert reason_of(lambda: check(token, audience="ledger")) == "token_wrong_audience"


@pytest.mark.parametrize(
    "changes",
    [
        {"nbf": NOW},  # not in the approval claim set
        {"agent": "planner"},
        {"approval": "short"},
        {"approval": APPROVAL_ID + "A"},
        {"approver": "spiffe://example.org"},
        {"approver": "admin"},
        {"sub": "spiffe://Example.org/agent/planner"},
        {"run": ""},
        {"tenant": 7},
        {"iat": True},
        {"exp": float(NOW + 300)},
        {"req": {"method": "DELETE", "path": "/payments/p-1"}},
        {"req": {**REQ.to_json(), "extra": 1}},
        {"req": {**REQ.to_json(), "method": "DEL ETE"}},
        {"req": {**REQ.to_json(), "path": "payments/p-1"}},
        {"req": {**REQ.to_json(), "path": "/payments/p 1"}},
        {"req": {**REQ.to_json(), "body_sha256": BODY.upper()}},
        {"req": {**REQ.to_json(), "body_sha256": BODY[:-1]}},
        {"req": "DELETE /payments/p-1"},
        {"cnf": {"x5t#S256": CNF, "x5t": "x"}},
        {"aud": []},
    ],
)
def test_strict_claims(changes: dict[str, Any]) -> None:
    token = forge(approval_header(), payload(**changes), KEY)
    assert reason_of(lambda: check(token)) == "token_malformed"


@pytest.mark.parametrize("name", sorted(payload()))
def test_every_claim_is_required(name: str) -> None:
    doc = payload()
    del doc[name]
    token = forge(approval_header(), doc, KEY)
    assert reason_of(lambda: check(token)) == "token_missing_claim"


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": "spiffe://example.org"},
        {"approver": "nobody"},
        {"approval": "x"},
        {"ttl": 301},
        {"req": ApprovedRequest("DELETE", "no-slash", BODY)},
        {"req": ApprovedRequest("DELETE", "/p", "00")},
        {"cnf_x5t_s256": "abc"},
        {"run": ""},
    ],
)
def test_mint_refuses_what_verify_would_refuse(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        tokens.mint_approval(**mint_args(**changes))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(payload())),
    value=_JSON,
    drop=st.booleans(),
    extra=st.one_of(st.none(), st.text(min_size=1, max_size=8)),
)
def test_parser_property(name: str, value: Any, drop: bool, extra: str | None) -> None:
    """Any one claim replaced (or dropped), maybe one claim added: the parser either
    returns exactly the payload's values or raises TokenError (malformed / missing)."""
    doc = payload()
    if drop:
        del doc[name]
    else:
        doc[name] = value
    if extra is not None:
        doc.setdefault(extra, 1)
    try:
        claims = _approval_claims(doc, KEY.kid)
    except TokenError as exc:
        assert exc.reason in {"token_malformed", "token_missing_claim"}
        return
    assert claims.to_json() == {**doc, "aud": doc["aud"]}


@settings(max_examples=50, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PATCH"]),
    path=st.text(alphabet="abcdefghij0123456789/?=&%-._~", max_size=60).map(lambda p: "/" + p),
    body=st.binary(max_size=64),
    ttl=st.integers(min_value=1, max_value=300),
)
def test_mint_verify_property(method: str, path: str, body: bytes, ttl: int) -> None:
    req = ApprovedRequest(method, path, hashlib.sha256(body).hexdigest())
    claims = check(tokens.mint_approval(**mint_args(req=req, ttl=ttl)), now=NOW)
    assert claims.req == req and claims.exp - claims.iat == ttl
