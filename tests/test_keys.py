"""Thumbprints, strict JWKS loading, and the on-disk keyring lifecycle (fake clock)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from _tokens_helpers import CNF, SUB, b64
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid import tokens
from axid.keys import (
    KEYRING_FILE,
    PASSPHRASE_ENV,
    Keyring,
    KeyringError,
    KeySet,
    KeyState,
    SigningKey,
    b64url_decode,
    b64url_encode,
    jwk_thumbprint,
    public_jwk,
)
from axid.tokens import TokenError

RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
LEAD = 330.0
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def kids(jwks: dict) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


# ----------------------------------------------------------------- base64url, thumbprint


def test_b64url_strict() -> None:
    assert b64url_decode("AQID") == b"\x01\x02\x03"
    assert b64url_encode(b"\xfb\xff") == "-_8"
    for bad in ("AQID=", "AQ==", "A", "AQI+", "AQ I", "AB", "AQJ", "\u00e9A"):
        with pytest.raises(ValueError):
            b64url_decode(bad)


def test_thumbprint_is_rfc7638() -> None:
    key = KeySet.from_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": RFC_X}]})
    assert key.kids == (RFC_THUMBPRINT,)
    public = key.get(RFC_THUMBPRINT)
    assert public is not None
    assert jwk_thumbprint(public) == RFC_THUMBPRINT
    # The definition, spelled out.
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + RFC_X + '"}'
    assert b64(hashlib.sha256(canonical.encode()).digest()) == RFC_THUMBPRINT


def test_public_jwk_shape() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    jwk = public_jwk(key)
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert jwk["kid"] == jwk_thumbprint(key)
    assert b64url_decode(jwk["x"]) == key.public_bytes_raw()


def test_signing_key_repr_and_kid_check() -> None:
    private = Ed25519PrivateKey.generate()
    signing = SigningKey.from_private_key(private)
    raw = private.private_bytes_raw()
    text = repr(signing)
    assert signing.kid in text
    assert b64(raw) not in text and raw.hex() not in text
    assert "private_key" not in text
    with pytest.raises(KeyringError):
        SigningKey(RFC_THUMBPRINT, private)
    with pytest.raises(TypeError):
        SigningKey(signing.kid, private.public_key())  # type: ignore[arg-type]


# ----------------------------------------------------------------- JWKS strictness


def good_jwks() -> dict:
    return {"keys": [public_jwk(Ed25519PrivateKey.generate().public_key()) for _ in range(2)]}


def test_jwks_round_trip_from_every_input_form() -> None:
    jwks = good_jwks()
    for form in (jwks, json.dumps(jwks), json.dumps(jwks).encode()):
        key_set = KeySet.from_jwks(form)
        assert list(key_set.kids) == kids(jwks)
        assert key_set.to_jwks() == jwks
    minimal = {"keys": [{k: v for k, v in jwks["keys"][0].items() if k in ("kty", "crv", "x")}]}
    assert KeySet.from_jwks(minimal).kids == (jwks["keys"][0]["kid"],)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _non_canonical(x: str) -> str:
    """Same 32 bytes, but an unused trailing bit set (43 chars: 2 unused bits)."""
    twin = x[:-1] + _ALPHABET[_ALPHABET.index(x[-1]) | 1]
    assert twin != x
    return twin


def _mutated(change) -> dict:  # type: ignore[no-untyped-def]
    jwks = good_jwks()
    change(jwks)
    return jwks


BAD_JWKS = {
    "private d": lambda j: j["keys"][1].update(d=b64(bytes(32))),
    "kty EC": lambda j: j["keys"][0].update(kty="EC"),
    "crv Ed448": lambda j: j["keys"][0].update(crv="Ed448"),
    "crv X25519": lambda j: j["keys"][0].update(crv="X25519"),
    "x 31 bytes": lambda j: j["keys"][0].update(x=b64(bytes(31))),
    "x 33 bytes": lambda j: j["keys"][0].update(x=b64(bytes(33))),
    "x padded": lambda j: j["keys"][0].update(x=j["keys"][0]["x"] + "="),
    "x standard alphabet": lambda j: j["keys"][0].update(x=b64(b"\xfb" * 32).replace("-", "+")),
    "x non-canonical": lambda j: j["keys"][0].update(x=_non_canonical(j["keys"][0]["x"])),
    "x missing": lambda j: j["keys"][0].pop("x"),
    "x number": lambda j: j["keys"][0].update(x=5),
    "kid mismatch": lambda j: j["keys"][1].update(kid=j["keys"][0]["kid"]),
    "kid placeholder": lambda j: j["keys"][0].update(kid="none"),
    "kid not str": lambda j: j["keys"][0].update(kid=1),
    "alg RS256": lambda j: j["keys"][0].update(alg="RS256"),
    "use enc": lambda j: j["keys"][0].update(use="enc"),
    "key_ops sign": lambda j: j["keys"][0].update(key_ops=["sign"]),
    "x5u member": lambda j: j["keys"][0].update(x5u="https://evil.example"),
    "x5c member": lambda j: j["keys"][0].update(x5c=["MIIB"]),
    "duplicate key": lambda j: j["keys"].append(dict(j["keys"][0])),
    "not an object": lambda j: j["keys"].append("key"),
    "extra top-level": lambda j: j.update(extra=1),
    "keys not list": lambda j: j.update(keys={}),
    "no keys": lambda j: j.pop("keys"),
}


@pytest.mark.parametrize("name", sorted(BAD_JWKS))
def test_jwks_rejects_the_whole_set(name: str) -> None:
    with pytest.raises(KeyringError):
        KeySet.from_jwks(_mutated(BAD_JWKS[name]))


def test_jwks_rejects_bad_json() -> None:
    jwks = good_jwks()
    text = json.dumps(jwks)
    with pytest.raises(KeyringError):
        KeySet.from_jwks('{"keys":[],"keys":' + json.dumps(jwks["keys"]) + "}")
    with pytest.raises(KeyringError):
        KeySet.from_jwks(text[:-1])
    with pytest.raises(KeyringError):
        KeySet.from_jwks(b"\xff" + text.encode())
    with pytest.raises(KeyringError):
        KeySet.from_jwks("[]")
    with pytest.raises(KeyringError):
        KeySet.from_jwks(" " * (300 * 1024))
    with pytest.raises(KeyringError):
        KeySet.from_jwks({"keys": [copy.deepcopy(jwks["keys"][0])] * 65})
    with pytest.raises(TypeError):
        KeySet.from_jwks(42)  # type: ignore[arg-type]


def test_jwks_duplicate_member_inside_a_key() -> None:
    jwk = good_jwks()["keys"][0]
    raw = json.dumps({"keys": [jwk]})
    dup = raw.replace('"kty": "OKP"', '"kty": "OKP", "kty": "OKP"')
    assert dup != raw
    with pytest.raises(KeyringError):
        KeySet.from_jwks(dup)


def test_key_set_constructor_checks_kids() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    assert KeySet({jwk_thumbprint(key): key}).kids == (jwk_thumbprint(key),)
    with pytest.raises(KeyringError):
        KeySet({"some-kid": key})
    assert KeySet.of(key).get(jwk_thumbprint(key)) is key
    assert KeySet.of(key).get("nope") is None
    assert len(KeySet()) == 0


# ----------------------------------------------------------------- keyring lifecycle


def mint_at(ring: Keyring, now: float, run: str = "run-1") -> str:
    return tokens.mint(
        key=ring.signing_key(now),
        iss="https://issuer.example.org",
        sub=SUB,
        aud="payments",
        tenant="acme",
        agent="planner",
        run=run,
        spawn_parent=None,
        chain=[],
        scope="payments:read",
        cnf_x5t_s256=CNF,
        now=int(now),
    )


def verify_at(token: str, ring: Keyring, now: float) -> str:
    """Verify with the JWKS the issuer publishes at ``now``, via the verifier's path."""
    key_set = KeySet.from_jwks(json.dumps(ring.jwks(now)))
    return tokens.verify(
        token, key_set, issuer="https://issuer.example.org", audience="payments", now=now
    ).kid


def test_keyring_full_lifecycle_with_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    directory = tmp_path / "keys"
    ring = Keyring.init(directory, now=clock.now)
    first = ring.signing_key(clock.now).kid
    assert kids(ring.jwks(clock.now)) == [first]
    assert [(k.kid, k.state) for k in ring.keys(clock.now)] == [(first, KeyState.CURRENT)]
    old_token = mint_at(ring, clock.now)

    # Rotate: the next key is published at once but does not sign yet.
    clock.advance(1000)
    t_rotate = clock.now
    second = ring.rotate(clock.now, publish_lead=LEAD)
    assert second != first
    assert kids(ring.jwks(clock.now)) == [first, second]
    assert ring.signing_key(clock.now).kid == first
    states = {k.kid: k.state for k in ring.keys(clock.now)}
    assert states == {first: KeyState.CURRENT, second: KeyState.NEXT}
    # A second rotation while one is pending is refused.
    with pytest.raises(KeyringError, match="pending"):
        ring.rotate(clock.now + 10)

    # Just before the lead: still the old key.
    clock.advance(LEAD - 0.001)
    assert ring.signing_key(clock.now).kid == first
    last_old_token = mint_at(ring, clock.now, run="run-2")

    # At the lead: the new key signs, the old one is retired but still published.
    clock.now = t_rotate + LEAD
    assert ring.signing_key(clock.now).kid == second
    states = {k.kid: k.state for k in ring.keys(clock.now)}
    assert states == {first: KeyState.RETIRED, second: KeyState.CURRENT}
    assert kids(ring.jwks(clock.now)) == [second, first]
    new_token = mint_at(ring, clock.now, run="run-3")
    assert verify_at(new_token, ring, clock.now) == second
    assert verify_at(last_old_token, ring, clock.now) == first
    info = {k.kid: k for k in ring.keys(clock.now)}[first]
    assert info.retired_at == t_rotate + LEAD
    assert info.unpublish_at == t_rotate + LEAD + 300 + 30

    # The retired key stays until its last possible token (signed just before
    # retirement, valid 300 s, plus 30 s leeway) can no longer be accepted.
    retired_at = t_rotate + LEAD
    clock.now = retired_at + 300 + 30 - 0.001
    assert first in kids(ring.jwks(clock.now))
    clock.now = retired_at + 300 + 30
    assert kids(ring.jwks(clock.now)) == [second]
    assert {k.kid: k.state for k in ring.keys(clock.now)}[first] is KeyState.EXPIRED
    with pytest.raises(TokenError) as err:
        verify_at(old_token, ring, clock.now)
    assert err.value.reason == "token_unknown_kid"

    # The state survives a reload (all derived from timestamps on disk).
    again = Keyring.load(directory)
    assert [(k.kid, k.state) for k in again.keys(clock.now)] == [
        (first, KeyState.EXPIRED),
        (second, KeyState.CURRENT),
    ]
    assert again.signing_key(clock.now).kid == second
    assert again.jwks(clock.now) == ring.jwks(clock.now)
    assert again.key_set(clock.now).kids == (second,)

    # And a third rotation works once the second key is current.
    third = again.rotate(clock.now)
    assert kids(again.jwks(clock.now)) == [second, third]
    assert again.signing_key(clock.now + DEFAULT_LEAD).kid == third


DEFAULT_LEAD = 330.0


def test_rotate_defaults_to_the_design_lead(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    nxt = ring.rotate(T0 + 1)
    assert {k.kid: k.active_from for k in ring.keys(T0 + 1)}[nxt] == T0 + 1 + 330.0


def test_jwks_honours_ttl_and_leeway_parameters(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    first = ring.signing_key(T0).kid
    ring.rotate(T0 + 1, publish_lead=0)  # first retired at T0 + 1
    assert first in kids(ring.jwks(T0 + 99, max_token_ttl=60, leeway=39))
    assert first not in kids(ring.jwks(T0 + 100, max_token_ttl=60, leeway=39))
    assert first in kids(ring.jwks(T0 + 100, max_token_ttl=60, leeway=40))
    assert first not in kids(ring.jwks(T0 + 101, max_token_ttl=60, leeway=40))


def test_rotation_needs_a_later_activation(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    with pytest.raises(KeyringError, match="later"):
        ring.rotate(T0, publish_lead=0)  # would activate together with the current key


def test_signing_before_the_keyring_existed_is_refused(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    with pytest.raises(KeyringError):
        ring.signing_key(T0 - 1)


def test_rotate_argument_checks(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    with pytest.raises(ValueError):
        ring.rotate(T0, publish_lead=-1)
    with pytest.raises(ValueError):
        ring.rotate(float("nan"))
    with pytest.raises(KeyringError):
        ring.rotate(T0 - 5)  # before the newest key's publication


def test_init_refuses_an_existing_keyring(tmp_path: Path) -> None:
    Keyring.init(tmp_path / "k", now=T0)
    with pytest.raises(KeyringError, match="exists"):
        Keyring.init(tmp_path / "k", now=T0)


def test_rotation_in_another_process_is_seen(tmp_path: Path) -> None:
    server = Keyring.init(tmp_path / "k", now=T0)
    cli = Keyring.load(tmp_path / "k")
    new = cli.rotate(T0 + 10)
    assert new not in kids(server.jwks(T0 + 10))
    assert server.reload_if_changed() is True
    assert new in kids(server.jwks(T0 + 10))
    assert server.reload_if_changed() is False
    # A stale in-memory view cannot rotate over a pending key either.
    with pytest.raises(KeyringError, match="pending"):
        Keyring.load(tmp_path / "k").rotate(T0 + 20)


# ----------------------------------------------------------------- files and modes


def test_file_modes(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    ring = Keyring.init(directory, now=T0)
    ring.rotate(T0)
    pems = sorted(directory.glob("*.pem"))
    assert len(pems) == 2
    for pem in pems:
        assert mode(pem) == 0o600
        assert pem.stem in {k.kid for k in ring.keys(T0)}
    assert mode(directory / KEYRING_FILE) == 0o600
    assert mode(directory) == 0o700
    state = json.loads((directory / KEYRING_FILE).read_text())
    assert "PRIVATE" not in json.dumps(state)
    assert not list(directory.glob("*.tmp"))


def test_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ring = Keyring.init(tmp_path / "k", now=T0)
        ring.rotate(T0)
    finally:
        os.umask(old)
    for path in (tmp_path / "k").iterdir():
        if path.suffix in (".pem", ".json"):
            assert mode(path) == 0o600


def test_refuses_a_0644_key_file(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    pem = tmp_path / "k" / f"{ring.signing_key(T0).kid}.pem"
    pem.chmod(0o644)
    with pytest.raises(KeyringError, match="group/other"):
        Keyring.load(tmp_path / "k")
    pem.chmod(0o640)
    with pytest.raises(KeyringError, match="group/other"):
        Keyring.load(tmp_path / "k")
    pem.chmod(0o600)
    assert Keyring.load(tmp_path / "k").signing_key(T0).kid == ring.signing_key(T0).kid


def test_refuses_a_group_writable_state_file_or_directory(tmp_path: Path) -> None:
    Keyring.init(tmp_path / "k", now=T0)
    (tmp_path / "k" / KEYRING_FILE).chmod(0o620)
    with pytest.raises(KeyringError):
        Keyring.load(tmp_path / "k")
    (tmp_path / "k" / KEYRING_FILE).chmod(0o644)  # readable is fine: no secrets
    Keyring.load(tmp_path / "k")
    (tmp_path / "k").chmod(0o777)
    with pytest.raises(KeyringError, match="writable"):
        Keyring.load(tmp_path / "k")


def test_refuses_a_symlinked_key_file(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    pem = tmp_path / "k" / f"{ring.signing_key(T0).kid}.pem"
    elsewhere = tmp_path / "elsewhere.pem"
    pem.rename(elsewhere)
    pem.symlink_to(elsewhere)
    with pytest.raises(KeyringError):
        Keyring.load(tmp_path / "k")


def test_refuses_a_swapped_key_file(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    second = ring.rotate(T0)
    first = ring.signing_key(T0).kid
    a, b = tmp_path / "k" / f"{first}.pem", tmp_path / "k" / f"{second}.pem"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(KeyringError, match="does not match"):
        Keyring.load(tmp_path / "k")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s["keys"][0].update(kid="../../etc/passwd"),
        lambda s: s["keys"][0].update(kid="A" * 42),
        lambda s: s["keys"][0].update(active_from="soon"),
        lambda s: s["keys"][0].update(active_from=s["keys"][0]["published_at"] - 1),
        lambda s: s["keys"][0].update(extra=1),
        lambda s: s.update(version=2),
        lambda s: s.update(keys=[]),
        lambda s: s["keys"].append(dict(s["keys"][0])),
    ],
)
def test_refuses_a_tampered_state_file(tmp_path: Path, tamper) -> None:  # type: ignore[no-untyped-def]
    Keyring.init(tmp_path / "k", now=T0)
    path = tmp_path / "k" / KEYRING_FILE
    state = json.loads(path.read_text())
    tamper(state)
    path.write_text(json.dumps(state))
    with pytest.raises(KeyringError):
        Keyring.load(tmp_path / "k")


def test_missing_keyring(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="missing"):
        Keyring.load(tmp_path / "nothing")


def test_garbage_key_file(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "k", now=T0)
    pem = tmp_path / "k" / f"{ring.signing_key(T0).kid}.pem"
    pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyringError, match="PKCS8"):
        Keyring.load(tmp_path / "k")


# ----------------------------------------------------------------- passphrase


def test_passphrase_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ring = Keyring.init(tmp_path / "k", now=T0)
    second = ring.rotate(T0)
    for pem in (tmp_path / "k").glob("*.pem"):
        text = pem.read_bytes()
        assert text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert b"correct horse" not in text
    loaded = Keyring.load(tmp_path / "k")
    assert loaded.signing_key(T0).kid == ring.signing_key(T0).kid
    assert loaded.signing_key(T0 + LEAD).kid == second
    token = mint_at(loaded, T0)
    assert verify_at(token, ring, T0) == ring.signing_key(T0).kid
    # An explicit passphrase argument works too.
    explicit = Keyring.load(tmp_path / "k", passphrase=b"correct horse battery staple")
    assert explicit.signing_key(T0).kid == ring.signing_key(T0).kid


def test_wrong_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "pw-right-7f3a")
    Keyring.init(tmp_path / "k", now=T0)
    monkeypatch.setenv(PASSPHRASE_ENV, "pw-wrong-91bc")
    with pytest.raises(KeyringError, match="wrong passphrase") as info:
        Keyring.load(tmp_path / "k")
    assert "pw-" not in str(info.value)


def test_missing_passphrase_for_an_encrypted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "secret")
    Keyring.init(tmp_path / "k", now=T0)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyringError, match="not set"):
        Keyring.load(tmp_path / "k")


def test_passphrase_set_but_key_unencrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(tmp_path / "k", now=T0)
    monkeypatch.setenv(PASSPHRASE_ENV, "secret")
    with pytest.raises(KeyringError, match="not encrypted"):
        Keyring.load(tmp_path / "k")


def test_empty_passphrase_variable_means_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    ring = Keyring.init(tmp_path / "k", now=T0)
    pem = tmp_path / "k" / f"{ring.signing_key(T0).kid}.pem"
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert Keyring.load(tmp_path / "k").signing_key(T0).kid == ring.signing_key(T0).kid


def test_keyring_repr_holds_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "hunter2")
    ring = Keyring.init(tmp_path / "k", now=T0)
    assert "hunter2" not in repr(ring)
    assert "PRIVATE" not in repr(ring)
    assert ring.signing_key(T0).kid in repr(ring)


def test_now_must_be_finite(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Keyring.init(tmp_path / "k", now=float("inf"))
    with pytest.raises(ValueError):
        Keyring.init(tmp_path / "k2", now=True)  # type: ignore[arg-type]
