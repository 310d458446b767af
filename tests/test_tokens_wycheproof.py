"""Wycheproof Ed25519 verification vectors through the verifier's key-loading path.

Each group's ``publicKeyJwk`` goes through ``KeySet.from_jwks`` (what a verifier does
with the issuer's JWKS) and each ``sig`` is checked over ``msg`` with the loaded key
by the same PyJWT EdDSA algorithm object ``axid.tokens.verify`` uses.

Decisions:
- Wycheproof's JWKs carry the placeholder ``"kid": "none"``. Our loader requires a
  kid to be the key's RFC 7638 thumbprint, so the test drops that member (and checks
  that the placeholder itself is refused).
- ``acceptable`` results (either outcome allowed by Wycheproof) would be accepted
  either way; this vector file has none, and the test asserts that so a future
  update that adds some forces a look at them.
- The verifier additionally refuses any signature that is not exactly 64 bytes
  before calling the primitive (as ``verify`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from axid import tokens
from axid.keys import KeyringError, KeySet

VECTORS = Path(__file__).parent / "vectors" / "wycheproof" / "ed25519_test.json"
EXPECTED_TESTS = 151


def _load() -> dict:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def _load_key(jwk: dict) -> Ed25519PublicKey:
    key_set = KeySet.from_jwks({"keys": [jwk]})
    (kid,) = key_set.kids
    public_key = key_set.get(kid)
    assert public_key is not None
    return public_key


def _accepts(public_key: Ed25519PublicKey, msg: bytes, sig: bytes) -> bool:
    if len(sig) != 64:
        return False
    return bool(tokens._EDDSA.verify(msg, public_key, sig))


def test_wycheproof_ed25519_all_vectors() -> None:
    doc = _load()
    assert doc["algorithm"] == "EDDSA"
    assert doc["numberOfTests"] == EXPECTED_TESTS
    ran = 0
    results = {"valid": 0, "invalid": 0, "acceptable": 0}
    failures: list[str] = []
    for group in doc["testGroups"]:
        jwk = {k: v for k, v in group["publicKeyJwk"].items() if k != "kid"}
        public_key = _load_key(jwk)
        # The JWK must be the same key as the group's raw public key.
        assert public_key.public_bytes_raw() == bytes.fromhex(group["publicKey"]["pk"])
        for case in group["tests"]:
            ran += 1
            results[case["result"]] += 1
            accepted = _accepts(public_key, bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"]))
            if case["result"] == "valid" and not accepted:
                failures.append(f"tcId {case['tcId']}: valid signature rejected")
            elif case["result"] == "invalid" and accepted:
                failures.append(f"tcId {case['tcId']}: invalid signature accepted")
    assert failures == []
    assert ran == EXPECTED_TESTS
    assert results == {"valid": 88, "invalid": 63, "acceptable": 0}


def test_wycheproof_placeholder_kid_is_refused() -> None:
    jwk = _load()["testGroups"][0]["publicKeyJwk"]
    assert jwk["kid"] == "none"
    with pytest.raises(KeyringError, match="thumbprint"):
        KeySet.from_jwks({"keys": [jwk]})
