"""RFC 8037 appendix A known answers, through the project's own key and JWS code.

Values are the RFC's (A.1 private key, A.2 public key, A.3 thumbprint, A.4 JWS);
they were cross-checked against several independent public test suites.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid import tokens
from axid.keys import KeySet, SigningKey, b64url_decode, jwk_thumbprint, public_jwk
from axid.tokens import TokenError

# A.1
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
# A.2
RFC_PUBLIC_JWK = {"kty": "OKP", "crv": "Ed25519", "x": RFC_X}
# A.3
RFC_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
# A.4
RFC_PAYLOAD = b"Example of Ed25519 signing"
RFC_HEADER_SEGMENT = "eyJhbGciOiJFZERTQSJ9"  # {"alg":"EdDSA"}
RFC_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


@pytest.fixture(scope="module")
def rfc_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC_D))


def test_a1_private_key_gives_a2_public_key(rfc_private_key: Ed25519PrivateKey) -> None:
    jwk = public_jwk(rfc_private_key.public_key())
    assert jwk["x"] == RFC_X
    assert {k: jwk[k] for k in ("kty", "crv", "x")} == RFC_PUBLIC_JWK


def test_a3_thumbprint(rfc_private_key: Ed25519PrivateKey) -> None:
    assert jwk_thumbprint(rfc_private_key.public_key()) == RFC_THUMBPRINT
    # ... and through the verifier's JWKS loading path, which computes the kid.
    key_set = KeySet.from_jwks({"keys": [RFC_PUBLIC_JWK]})
    assert key_set.kids == (RFC_THUMBPRINT,)
    assert public_jwk(rfc_private_key.public_key())["kid"] == RFC_THUMBPRINT
    assert SigningKey.from_private_key(rfc_private_key).kid == RFC_THUMBPRINT


def test_a4_sign_is_byte_exact(rfc_private_key: Ed25519PrivateKey) -> None:
    header_segment = tokens._encode_segment({"alg": "EdDSA"})
    assert header_segment == RFC_HEADER_SEGMENT
    assert tokens._sign_compact(header_segment, RFC_PAYLOAD, rfc_private_key) == RFC_JWS
    # Same through a SigningKey (the object mint() signs with).
    signing_key = SigningKey.from_private_key(rfc_private_key)
    assert tokens._sign_compact(header_segment, RFC_PAYLOAD, signing_key) == RFC_JWS


def test_a5_verify() -> None:
    key_set = KeySet.from_jwks({"keys": [RFC_PUBLIC_JWK]})
    public_key = key_set.get(RFC_THUMBPRINT)
    assert public_key is not None
    assert tokens._jws_signature_valid(RFC_JWS, public_key)
    # One flipped signature bit (last char 'g' -> 'w' keeps the encoding canonical).
    tampered = RFC_JWS[:-1] + "w"
    assert not tokens._jws_signature_valid(tampered, public_key)
    # The RFC's JWS is not an AXID token: its header has no typ (and no kid).
    with pytest.raises(TokenError) as info:
        tokens.verify(RFC_JWS, key_set, issuer="https://i", audience="svc", now=0)
    assert info.value.reason == "token_bad_type"
