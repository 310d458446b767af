"""Attack battery against axid.tokens.verify; tokens are built by hand with cryptography.

Each case asserts the exact reason code. Where the order of checks decides the
code (e.g. ``alg: none`` with an empty signature fails the structure check before
the header is read), the test says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from _tokens_helpers import (
    AUDIENCE,
    DROP,
    ISSUER,
    NOW,
    b64,
    forge,
    good_claims,
    good_header,
    keyset,
    new_key,
    segment,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid import tokens
from axid.keys import KeySet, public_jwk
from axid.tokens import REASONS, TokenError

KEY = new_key()
OTHER = new_key()
KEYS = keyset(KEY)


def reason_of(token: object, keys: KeySet = KEYS, **kwargs: object) -> str:
    options: dict = {"issuer": ISSUER, "audience": AUDIENCE, "now": NOW + 1}
    options.update(kwargs)
    with pytest.raises(TokenError) as info:
        tokens.verify(token, keys, **options)  # type: ignore[arg-type]
    assert info.value.reason in REASONS
    return info.value.reason


def good_token() -> str:
    return forge(good_header(KEY.kid), good_claims(), KEY)


def test_good_token_verifies() -> None:
    claims = tokens.verify(good_token(), KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    assert claims.kid == KEY.kid
    assert claims.chain == ("run-0", "run-1")


# ----------------------------------------------------------------- algorithm attacks


def test_alg_none_without_signature_is_malformed() -> None:
    # "h.p." has an empty third segment: the structure check (step 3) fails first.
    header = {"alg": "none", "typ": "axid+jwt", "kid": KEY.kid}
    token = f"{segment(header)}.{segment(good_claims())}."
    assert reason_of(token) == "token_malformed"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_with_signature_is_bad_alg(alg: str) -> None:
    header = {"alg": alg, "typ": "axid+jwt", "kid": KEY.kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_alg"


@pytest.mark.parametrize(
    "secret",
    [
        KEY.public_key.public_bytes_raw(),
        KEY.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        json.dumps(public_jwk(KEY.public_key)).encode(),
        public_jwk(KEY.public_key)["x"].encode(),
    ],
    ids=["raw", "pem", "jwk-json", "x"],
)
def test_hs256_with_public_key_as_secret(secret: bytes) -> None:
    header = {"alg": "HS256", "typ": "axid+jwt", "kid": KEY.kid}
    signing_input = f"{segment(header)}.{segment(good_claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert reason_of(f"{signing_input}.{b64(mac)}") == "token_bad_alg"


def test_es256_signed_with_ec_key_under_our_kid_is_bad_alg() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "ES256", "typ": "axid+jwt", "kid": KEY.kid}
    signing_input = f"{segment(header)}.{segment(good_claims())}"
    der = ec_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    assert reason_of(f"{signing_input}.{b64(der)}") == "token_bad_alg"


@pytest.mark.parametrize("alg", ["Ed25519", "ED25519", "eddsa", "EdDSA ", "RS256", "ES256K"])
def test_other_alg_names_are_bad_alg(alg: str) -> None:
    header = {"alg": alg, "typ": "axid+jwt", "kid": KEY.kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_alg"


def test_alg_not_a_string_is_bad_alg() -> None:
    for alg in (None, 1, ["EdDSA"], {"EdDSA": 1}):
        header = {"alg": alg, "typ": "axid+jwt", "kid": KEY.kid}
        assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_alg"
    header = {"typ": "axid+jwt", "kid": KEY.kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_alg"


def test_eddsa_signed_by_another_ed25519_key_under_our_kid() -> None:
    assert reason_of(forge(good_header(KEY.kid), good_claims(), OTHER)) == "token_bad_signature"


def test_eddsa_header_with_ed448_signature() -> None:
    ed448 = Ed448PrivateKey.generate()
    signing_input = f"{segment(good_header(KEY.kid))}.{segment(good_claims())}"
    sig = ed448.sign(signing_input.encode())
    assert len(sig) == 114
    assert reason_of(f"{signing_input}.{b64(sig)}") == "token_bad_signature"


def test_truncated_and_extended_signatures() -> None:
    token = good_token()
    head, sig = token.rsplit(".", 1)
    raw = tokens._b64(sig)
    assert reason_of(f"{head}.{b64(raw[:63])}") == "token_bad_signature"
    longer = b64(raw + bytes(1))
    assert reason_of(f"{head}.{longer}") == "token_bad_signature"
    assert reason_of(f"{head}.{b64(bytes(64))}") == "token_bad_signature"


# ----------------------------------------------------------------- key-lookup attacks


@pytest.mark.parametrize(
    "member",
    [
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": ["MIIB"]},
        {"x5t#S256": "A" * 43},
    ],
    ids=["jku", "x5u", "x5c", "x5t"],
)
def test_key_url_headers_are_refused_even_when_validly_signed(member: dict) -> None:
    header = {**good_header(KEY.kid), **member}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_malformed"


def test_embedded_jwk_of_the_attacker_is_refused() -> None:
    # The attacker signs with its own key and embeds it; also with its own kid.
    header = {**good_header(OTHER.kid), "jwk": public_jwk(OTHER.public_key)}
    assert reason_of(forge(header, good_claims(), OTHER)) == "token_malformed"
    header = {**good_header(KEY.kid), "jwk": public_jwk(OTHER.public_key)}
    assert reason_of(forge(header, good_claims(), OTHER)) == "token_malformed"
    # Without the jwk member the attacker's kid is simply unknown.
    assert reason_of(forge(good_header(OTHER.kid), good_claims(), OTHER)) == "token_unknown_kid"


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["urn:unknown"], [], "exp"])
def test_crit_is_refused(crit: object) -> None:
    header = {**good_header(KEY.kid), "crit": crit}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_malformed"


def test_b64_false_is_refused() -> None:
    header = {**good_header(KEY.kid), "b64": False, "crit": ["b64"]}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_malformed"


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "../keys/" + "A" * 43,
        "/etc/shadow",
        "..\\..\\windows",
        "%2e%2e%2fkeyring.json",
        "keyring.json",
        "",
        "\x00",
        KEY.kid + "\n",
        KEY.kid.lower(),
        KEY.kid[:-1],
        "A" * 5000,
    ],
)
def test_kid_not_in_key_set(kid: str) -> None:
    header = {**good_header(KEY.kid), "kid": kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_unknown_kid"


@pytest.mark.parametrize("kid", [None, 1, ["x"], {"k": 1}, True])
def test_kid_not_a_string(kid: object) -> None:
    header = {**good_header(KEY.kid), "kid": kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_unknown_kid"


def test_missing_kid() -> None:
    header = {"alg": "EdDSA", "typ": "axid+jwt"}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_unknown_kid"


def test_header_cache_is_per_key_set() -> None:
    token = good_token()
    tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    assert reason_of(token, keys=keyset(OTHER)) == "token_unknown_kid"
    assert reason_of(token, keys=KeySet()) == "token_unknown_kid"


# ----------------------------------------------------------------- duplicate members


def test_duplicate_alg_in_header() -> None:
    raw = f'{{"alg":"HS256","alg":"EdDSA","typ":"axid+jwt","kid":"{KEY.kid}"}}'
    assert reason_of(forge(raw, good_claims(), KEY)) == "token_malformed"
    raw = f'{{"alg":"EdDSA","typ":"axid+jwt","kid":"{KEY.kid}","alg":"EdDSA"}}'
    assert reason_of(forge(raw, good_claims(), KEY)) == "token_malformed"


def test_duplicate_kid_and_typ_in_header() -> None:
    raw = f'{{"alg":"EdDSA","typ":"axid+jwt","kid":"{OTHER.kid}","kid":"{KEY.kid}"}}'
    assert reason_of(forge(raw, good_claims(), KEY)) == "token_malformed"
    raw = f'{{"alg":"EdDSA","typ":"JWT","typ":"axid+jwt","kid":"{KEY.kid}"}}'
    assert reason_of(forge(raw, good_claims(), KEY)) == "token_malformed"


def test_duplicate_sub_in_signed_payload() -> None:
    text = json.dumps(good_claims(), separators=(",", ":"))
    assert text.startswith('{"iss"')
    dup = '{"sub":"spiffe://example.org/agent/evil",' + text[1:]
    assert reason_of(forge(good_header(KEY.kid), dup, KEY)) == "token_malformed"


def test_duplicate_member_inside_cnf() -> None:
    text = json.dumps(good_claims(), separators=(",", ":"))
    cnf = json.dumps(good_claims()["cnf"], separators=(",", ":"))
    dup_cnf = cnf[:-1] + ',"x5t#S256":"' + "B" * 43 + '"}'
    payload = text.replace(cnf, dup_cnf)
    assert payload != text
    assert reason_of(forge(good_header(KEY.kid), payload, KEY)) == "token_malformed"


# ----------------------------------------------------------------- structure


def test_segment_counts() -> None:
    token = good_token()
    h, p, s = token.split(".")
    assert reason_of(f"{h}.{p}") == "token_malformed"
    assert reason_of(h) == "token_malformed"
    assert reason_of(f"{h}.{p}.{s}.{s}") == "token_malformed"
    assert reason_of(f"{h}.{p}.{s}.{s}.{s}") == "token_malformed"  # JWE shape
    assert reason_of(f"{h}..{s}") == "token_malformed"
    assert reason_of(f".{p}.{s}") == "token_malformed"
    assert reason_of(f"{h}.{p}.") == "token_malformed"
    assert reason_of(f"{h}.{p}.{s}.") == "token_malformed"
    assert reason_of(f"{h}.{p}..{s}") == "token_malformed"
    assert reason_of("..") == "token_malformed"


def test_padding_whitespace_and_alphabet() -> None:
    token = good_token()
    h, p, s = token.split(".")
    assert reason_of(f"{h}.{p}.{s}==") == "token_malformed"
    assert reason_of(f" {token}") == "token_malformed"
    assert reason_of(f"{token}\n") == "token_malformed"
    assert reason_of(f"Bearer {token}") == "token_malformed"
    standard = token.replace("-", "+").replace("_", "/")
    if standard != token:
        assert reason_of(standard) == "token_malformed"
    assert reason_of(token[:10] + "\u00e9" + token[11:]) == "token_malformed"
    assert reason_of(token.encode()[:10] + b"\xff" + token.encode()[11:]) == "token_malformed"


def test_non_canonical_base64_signature() -> None:
    # 86 chars = 2 trailing bits unused... 64 bytes -> 86 chars, last char carries 4 bits.
    token = good_token()
    head, sig = token.rsplit(".", 1)
    last = sig[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    value = alphabet.index(last)
    for low in range(1, 16):  # same decoded bytes, non-zero unused bits
        twin = alphabet[(value & ~0xF) | low]
        assert reason_of(f"{head}.{sig[:-1]}{twin}") == "token_malformed"


def test_header_and_payload_not_objects() -> None:
    for header in ([], "EdDSA", 1, None, b"\xff\xfe", b"{", b"\xef\xbb\xbf{}"):
        assert reason_of(forge(header, good_claims(), KEY)) == "token_malformed"
    for payload in ([], "x", 1, None, b"{", b"\xff", b'{"a":NaN}', b"[1]"):
        assert reason_of(forge(good_header(KEY.kid), payload, KEY)) == "token_malformed"


def test_utf16_header_is_not_json() -> None:
    raw = json.dumps(good_header(KEY.kid)).encode("utf-16")
    assert reason_of(forge(raw, good_claims(), KEY)) == "token_malformed"


def test_deeply_nested_payload() -> None:
    payload = "[" * 2900 + "]" * 2900
    token = forge(good_header(KEY.kid), payload, KEY)
    assert len(token) <= tokens.MAX_TOKEN_BYTES
    assert reason_of(token) == "token_malformed"


# ----------------------------------------------------------------- typ


@pytest.mark.parametrize("typ", ["JWT", "jwt", "AXID+JWT", "application/axid+jwt", "axid+jwt ", 1])
def test_wrong_typ(typ: object) -> None:
    header = {**good_header(KEY.kid), "typ": typ}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_type"


def test_missing_typ() -> None:
    header = {"alg": "EdDSA", "kid": KEY.kid}
    assert reason_of(forge(header, good_claims(), KEY)) == "token_bad_type"


# ----------------------------------------------------------------- claims


@pytest.mark.parametrize("exp", [str(NOW + 300), float(NOW + 300), NOW + 300.5, True, None, [1]])
def test_exp_of_the_wrong_type(exp: object) -> None:
    token = forge(good_header(KEY.kid), good_claims(exp=exp), KEY)
    assert reason_of(token) == "token_malformed"


@pytest.mark.parametrize("claim", ["exp", "aud", "jti", "iss", "sub", "cnf", "spawn_parent"])
def test_missing_claims(claim: str) -> None:
    token = forge(good_header(KEY.kid), good_claims(**{claim: DROP}), KEY)
    assert reason_of(token) == "token_missing_claim"


def test_missing_cnf_thumbprint() -> None:
    token = forge(good_header(KEY.kid), good_claims(cnf={}), KEY)
    assert reason_of(token) == "token_missing_claim"
    token = forge(good_header(KEY.kid), good_claims(cnf={"x5t": "A" * 27}), KEY)
    assert reason_of(token) == "token_missing_claim"


def test_exp_a_year_out() -> None:
    token = forge(good_header(KEY.kid), good_claims(exp=NOW + 365 * 86400), KEY)
    assert reason_of(token) == "token_ttl_too_long"


def test_ttl_one_second_over() -> None:
    token = forge(good_header(KEY.kid), good_claims(exp=NOW + 301), KEY)
    assert reason_of(token) == "token_ttl_too_long"


def test_extra_claim_is_refused() -> None:
    token = forge(good_header(KEY.kid), good_claims(admin=True), KEY)
    assert reason_of(token) == "token_malformed"


def test_sub_must_be_a_strict_spiffe_workload_id() -> None:
    for sub in (
        "spiffe://Example.org/agent",
        "spiffe://example.org",
        "spiffe://example.org/agent/",
        "spiffe://example.org/../agent",
        "https://example.org/agent",
        "spiffe://example.org/agent\n",
        "",
        7,
    ):
        token = forge(good_header(KEY.kid), good_claims(sub=sub), KEY)
        assert reason_of(token) == "token_malformed"


# ----------------------------------------------------------------- size


def test_9_kib_token_is_too_large() -> None:
    filler = "x" * 9 * 1024
    token = forge(good_header(KEY.kid), good_claims(tenant=filler), KEY)
    assert len(token) > 9 * 1024
    assert reason_of(token) == "token_too_large"
    assert reason_of(token.encode()) == "token_too_large"


def test_size_is_checked_before_any_decoding() -> None:
    assert reason_of("!" * (tokens.MAX_TOKEN_BYTES + 1)) == "token_too_large"
    assert reason_of(b"\xff" * (tokens.MAX_TOKEN_BYTES + 1)) == "token_too_large"
    assert reason_of("\u00e9" * (tokens.MAX_TOKEN_BYTES // 2 + 1)) == "token_too_large"
    assert reason_of("!" * tokens.MAX_TOKEN_BYTES) == "token_malformed"


def test_token_of_exactly_the_limit_is_not_too_large() -> None:
    base = forge(good_header(KEY.kid), good_claims(tenant="t"), KEY)
    pad = tokens.MAX_TOKEN_BYTES - len(base)
    # Grow the tenant until the token is exactly MAX_TOKEN_BYTES long (b64 grows 4/3).
    for extra in range(pad * 3 // 4 - 4, pad * 3 // 4 + 4):
        token = forge(good_header(KEY.kid), good_claims(tenant="t" * (1 + extra)), KEY)
        if len(token) == tokens.MAX_TOKEN_BYTES:
            claims = tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
            assert len(claims.tenant) == 1 + extra
            return
    pytest.fail("no tenant length gave a token of exactly MAX_TOKEN_BYTES")


def test_missing() -> None:
    assert reason_of(None) == "token_missing"
    assert reason_of("") == "token_missing"
    assert reason_of(b"") == "token_missing"


# ----------------------------------------------------------------- mutations


def _mutations(token: str) -> set[str]:
    out: set[str] = set()
    for i, ch in enumerate(token):
        out.add(token[:i] + token[i + 1 :])  # deletion
        for repl in "AQgw_-.9":
            if repl != ch:
                out.add(token[:i] + repl + token[i + 1 :])
        # the neighbouring alphabet letter (flips the lowest bit of a 6-bit group)
        if ch.isalpha():
            out.add(token[:i] + chr(ord(ch) ^ 1) + token[i + 1 :])
    out.discard(token)
    return out


def test_every_single_byte_mutation_fails() -> None:
    token = good_token()
    mutations = _mutations(token)
    assert len(mutations) > 5 * len(token)
    seen: dict[str, int] = {}
    for mutated in mutations:
        with pytest.raises(TokenError) as info:
            tokens.verify(mutated, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
        seen[info.value.reason] = seen.get(info.value.reason, 0) + 1
    # Mutations are caught by structure, header or signature checks only.
    assert set(seen) <= {
        "token_malformed",
        "token_bad_signature",
        "token_bad_alg",
        "token_bad_type",
        "token_unknown_kid",
    }
    assert seen["token_bad_signature"] > 0


# ----------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=600), st.binary(max_size=600)))
def test_arbitrary_input_raises_only_token_error(data: str | bytes) -> None:
    with pytest.raises(TokenError) as info:
        tokens.verify(data, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    assert info.value.reason in REASONS


_B64CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet=_B64CHARS + ".=", max_size=120), min_size=1, max_size=5).map(".".join)
)
def test_token_shaped_input_raises_only_token_error(data: str) -> None:
    with pytest.raises(TokenError):
        tokens.verify(data, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={name: _json for name in good_claims()},
    ),
    st.dictionaries(st.text(max_size=8), _json, max_size=3),
)
def test_validly_signed_arbitrary_claims_raise_only_token_error(claims: dict, extra: dict) -> None:
    # Mix a real token's claims with arbitrary values; signed with the trusted key,
    # so everything after the signature check is exercised.
    payload = {**good_claims(), **claims, **extra}
    token = forge(good_header(KEY.kid), payload, KEY)
    try:
        result = tokens.verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW + 1)
    except TokenError as exc:
        assert exc.reason in REASONS
        assert token not in str(exc)
    else:
        expected = dict(payload)
        if isinstance(expected["aud"], list) and len(expected["aud"]) == 1:
            expected["aud"] = expected["aud"][0]
        assert result.to_json() == expected
