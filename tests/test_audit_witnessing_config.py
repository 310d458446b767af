"""Witness settings of the decision log: DecisionLog.open's arguments, the verifier's
``log:`` and the issuer's ``audit:`` sections, and the checks of a witness's answer."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey

from axid.audit.cosignature import WitnessSigner
from axid.audit.log import DecisionLog
from axid.audit.note import Checkpoint, NoteSigner
from axid.audit.witness_answers import Refused, check_cosignatures, parse_size
from axid.audit.witnessing import WitnessConfig, WitnessConfigError, witness_settings
from axid.issuer.config import ConfigError as IssuerConfigError
from axid.issuer.config import IssuerConfig
from verifier.config import LogConfig, VerifierConfig
from verifier.errors import ConfigError

W1 = "witness.example/w1"
W2 = "witness.example/w2"
SIGNER1 = WitnessSigner(W1, Ed25519PrivateKey.generate())
SIGNER1_MLDSA = WitnessSigner(W1, MLDSA44PrivateKey.generate())
SIGNER2 = WitnessSigner(W2, Ed25519PrivateKey.generate())
V1 = SIGNER1.public().vkey()
V1_MLDSA = SIGNER1_MLDSA.public().vkey()
V2 = SIGNER2.public().vkey()
U1 = "http://127.0.0.1:7380"
U2 = "https://w2.example:8443/prefix/"


def entry(url: str = U1, vkey: str = V1, **extra: Any) -> dict[str, Any]:
    return {"url": url, "vkey": vkey, **extra}


# --------------------------------------------------------------------------- the rules


def test_defaults() -> None:
    s = witness_settings()
    assert (s.witnesses, s.quorum, s.mode, s.timeout) == ((), 0, "async", 5.0)
    one = witness_settings([entry()])
    assert one.quorum == 1 and one.names == (W1,)
    assert one.witnesses == (WitnessConfig(U1, V1),)
    assert one.witnesses[0].key == SIGNER1.public()


def test_one_witness_with_two_keys_counts_once() -> None:
    s = witness_settings([entry(), entry(vkey=V1_MLDSA), entry(U2, V2)], quorum=2, mode="sync")
    assert s.names == (W1, W2) and s.quorum == 2 and s.mode == "sync"
    assert s.witnesses[2].url == "https://w2.example:8443/prefix"  # no trailing slash
    with pytest.raises(WitnessConfigError) as info:
        witness_settings([entry(), entry(vkey=V1_MLDSA)], quorum=2)
    assert info.value.key == "quorum"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"witnesses": "x"}, "witnesses"),
        ({"witnesses": {"url": U1, "vkey": V1}}, "witnesses"),
        ({"witnesses": [None]}, "witnesses[0]"),
        ({"witnesses": [entry(), entry(U2, V2, extra=1)]}, "witnesses[1].extra"),
        ({"witnesses": [{"url": U1}]}, "witnesses[0].vkey"),
        ({"witnesses": [{"vkey": V1}]}, "witnesses[0].url"),
        ({"witnesses": [entry("ftp://w.example")]}, "witnesses[0].url"),
        ({"witnesses": [entry("w.example:7380")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http:///x")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http://w.example/?q=1")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http://w.example/#f")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http://u:p@w.example")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http://w.example:99999")]}, "witnesses[0].url"),
        ({"witnesses": [entry("http://w.example/a b")]}, "witnesses[0].url"),
        ({"witnesses": [entry(1)]}, "witnesses[0].url"),  # type: ignore[arg-type]
        ({"witnesses": [entry(vkey="nope")]}, "witnesses[0].vkey"),
        ({"witnesses": [entry(vkey=V1[:-2] + "AA")]}, "witnesses[0].vkey"),
        (
            {
                "witnesses": [
                    entry(vkey=NoteSigner("log.example/l", Ed25519PrivateKey.generate()).vkey())
                ]
            },
            "witnesses[0].vkey",
        ),
        ({"witnesses": [entry(vkey=3)]}, "witnesses[0].vkey"),  # type: ignore[arg-type]
        ({"witnesses": [entry(), entry()]}, "witnesses[1].vkey"),
        ({"witnesses": [entry(), entry(U2, V1_MLDSA)]}, "witnesses[1].url"),
        ({"witnesses": [entry(), entry(U1, V2)]}, "witnesses[1].url"),
        ({"quorum": 1}, "quorum"),
        ({"witnesses": [entry()], "quorum": 2}, "quorum"),
        ({"witnesses": [entry()], "quorum": -1}, "quorum"),
        ({"witnesses": [entry()], "quorum": True}, "quorum"),
        ({"witnesses": [entry()], "quorum": "1"}, "quorum"),
        ({"witnesses": [entry()], "mode": "eventually"}, "witness_mode"),
        ({"mode": "sync"}, "witness_mode"),
        ({"witnesses": [entry()], "quorum": 0, "mode": "sync"}, "witness_mode"),
        ({"timeout": 0}, "witness_timeout"),
        ({"timeout": -1}, "witness_timeout"),
        ({"timeout": 301}, "witness_timeout"),
        ({"timeout": float("inf")}, "witness_timeout"),
        ({"timeout": float("nan")}, "witness_timeout"),
        ({"timeout": True}, "witness_timeout"),
        ({"timeout": "5"}, "witness_timeout"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(WitnessConfigError) as info:
        witness_settings(**kwargs)
    assert info.value.key == key, str(info.value)
    assert isinstance(info.value, ValueError)


def test_at_most_32_keys() -> None:
    many = [
        entry(
            f"http://w{i}.example",
            WitnessSigner(f"w{i}.example", Ed25519PrivateKey.generate()).public().vkey(),
        )
        for i in range(33)
    ]
    assert len(witness_settings(many[:32]).names) == 32
    with pytest.raises(WitnessConfigError, match="at most 32"):
        witness_settings(many)


async def test_decision_log_refuses_bad_settings_before_opening(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with pytest.raises(ValueError, match="quorum"):
        await DecisionLog.open(
            f"sqlite:///{db}",
            log="l",
            key=Ed25519PrivateKey.generate(),
            witnesses=[entry()],
            quorum=2,
        )
    assert not db.exists()


# --------------------------------------------------------------------------- configs

VERIFIER: dict[str, Any] = {
    "service": "payments",
    "issuer": "https://issuer.example.org",
    "tenants": ["acme"],
    "identity": {"bundle": "/etc/axid/bundle.pem"},
    "jwks": {"file": "/etc/axid/jwks.json"},
    "revocations": {"database_url": "sqlite:////var/axid/axid.db"},
    "log": {"url": "sqlite:////var/axid/axid.db", "key": "/etc/axid/log.pem"},
}


def verifier_with(**log: Any) -> VerifierConfig:
    return VerifierConfig.from_dict({**VERIFIER, "log": {**VERIFIER["log"], **log}})


def test_verifier_log_witnesses() -> None:
    plain = verifier_with().log
    assert (plain.witnesses, plain.quorum, plain.witness_mode) == ((), 0, "async")
    cfg = verifier_with(
        witnesses=[entry(), entry(U2, V2)], quorum=2, witness_mode="sync", witness_timeout=2
    ).log
    assert cfg.witnesses == (WitnessConfig(U1, V1), WitnessConfig(U2, V2))
    assert (cfg.quorum, cfg.witness_mode, cfg.witness_timeout) == (2, "sync", 2.0)
    # in code too, with typed values
    code = LogConfig(url="sqlite:////x.db", key=Path("/k.pem"), witnesses=(WitnessConfig(U1, V1),))
    assert code.quorum == 1


@pytest.mark.parametrize(
    ("log", "key"),
    [
        ({"witnesses": [entry("ftp://x")]}, "log.witnesses[0].url"),
        ({"witnesses": [entry(vkey="x+1+2")]}, "log.witnesses[0].vkey"),
        ({"witnesses": [{"url": U1, "vkey": V1, "name": "w"}]}, "log.witnesses[0].name"),
        ({"witnesses": [entry()], "quorum": 3}, "log.quorum"),
        ({"witness_mode": "sync"}, "log.witness_mode"),
        ({"witness_timeout": 0}, "log.witness_timeout"),
        ({"witnesses": "http://x"}, "log.witnesses"),
        ({"witness": []}, "log.witness"),
    ],
)
def test_verifier_log_witness_errors(log: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        verifier_with(**log)
    assert info.value.key == key, str(info.value)


def test_issuer_audit_witnesses(tmp_path: Path) -> None:
    text = (
        "registrations: r.yaml\nsvid: {workload_api: unix:///run/spire.sock}\naudit:\n"
        f"  witnesses:\n    - {{url: '{U1}', vkey: '{V1}'}}\n    - {{url: '{U2}', vkey: '{V2}'}}\n"
        "  quorum: 2\n  witness_mode: sync\n  witness_timeout: 3\n"
    )
    p = tmp_path / "axid.yaml"
    p.write_text(text)
    cfg = IssuerConfig.from_file(p, environ={})
    assert cfg.log_witnesses == (WitnessConfig(U1, V1), WitnessConfig(U2, V2))
    assert (cfg.log_quorum, cfg.log_witness_mode, cfg.log_witness_timeout) == (2, "sync", 3.0)
    p.write_text("registrations: r.yaml\nsvid: {workload_api: unix:///run/spire.sock}\n")
    cfg = IssuerConfig.from_file(p, environ={})
    assert (cfg.log_witnesses, cfg.log_quorum, cfg.log_witness_mode) == ((), 0, "async")


@pytest.mark.parametrize(
    ("audit", "key"),
    [
        (f"{{witnesses: [{{url: 'http://', vkey: '{V1}'}}]}}", "audit.witnesses[0].url"),
        (f"{{witnesses: [{{url: '{U1}', vkey: bad}}]}}", "audit.witnesses[0].vkey"),
        (f"{{witnesses: [{{url: '{U1}', vkey: '{V1}'}}], quorum: 2}}", "audit.quorum"),
        ("{witness_mode: sync}", "audit.witness_mode"),
        ("{witness_timeout: 1000}", "audit.witness_timeout"),
        ("{quorums: 1}", "audit.quorums"),
    ],
)
def test_issuer_audit_witness_errors(tmp_path: Path, audit: str, key: str) -> None:
    p = tmp_path / "axid.yaml"
    p.write_text(f"registrations: r\nsvid: {{workload_api: x}}\naudit: {audit}\n")
    with pytest.raises(IssuerConfigError) as info:
        IssuerConfig.from_file(p, environ={})
    assert info.value.key == key, str(info.value)


# --------------------------------------------------------------------------- answers

CP = Checkpoint("axid/payments", 7, bytes(range(32)))


def _tampered(line: str) -> str:
    prefix, b64 = line.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 1
    return f"{prefix} {base64.b64encode(bytes(blob)).decode()}\n"


def test_answers_keep_the_good_lines_and_name_the_bad() -> None:
    keys = (SIGNER1.public(), SIGNER1_MLDSA.public())
    good, good_mldsa = SIGNER1.cosign(CP, 100), SIGNER1_MLDSA.cosign(CP, 100)
    other = SIGNER2.cosign(CP, 100)  # a key not configured: ignored
    lines, problem = check_cosignatures((good + other + good_mldsa).encode(), CP, keys)
    assert lines == [good.encode(), good_mldsa.encode()] and problem is None

    lines, problem = check_cosignatures((_tampered(good) + good_mldsa).encode(), CP, keys)
    assert lines == [good_mldsa.encode()]
    assert problem is not None and "does not verify" in problem

    on_another = SIGNER1.cosign(Checkpoint(CP.origin, 8, CP.root), 100)
    lines, problem = check_cosignatures(on_another.encode(), CP, keys)
    assert lines == [] and problem is not None and "does not verify" in problem

    for body, why in [
        (other.encode(), "no cosignature"),
        (b"", "not newline-terminated"),
        (good.encode()[:-1], "not newline-terminated"),
        (b"\xff\n", "not UTF-8"),
        (b"ok\n", "malformed"),
        (good.encode() + b"\n", "malformed"),
    ]:
        lines, problem = check_cosignatures(body, CP, keys)
        assert problem is not None and why in problem, (body, problem)


def test_409_size_is_parsed_strictly() -> None:
    assert parse_size("text/x.tlog.size", b"42\n") == 42
    assert parse_size("Text/X.TLOG.Size; charset=utf-8", b"0\n") == 0
    for ctype, body in [
        ("text/plain", b"42\n"),
        ("text/x.tlog.size", b"42"),
        ("text/x.tlog.size", b"042\n"),
        ("text/x.tlog.size", b"-1\n"),
        ("text/x.tlog.size", b"4 2\n"),
        ("text/x.tlog.size", b"42\n\n"),
        ("", b"42\n"),
    ]:
        with pytest.raises(Refused):
            parse_size(ctype, body)
