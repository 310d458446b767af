"""`axid witness init` (files, modes, refusals), config errors, start-up failures,
HTTPS, and a passphrase-encrypted key."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from _spec_cosignature import parse_vkey, verify_line
from _witness_helpers import (
    LogSide,
    add_checkpoint,
    body_text,
    init_witness,
    run_axid,
    serving,
    unique_origin,
    write_config,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from axid.cli import _app

runner = CliRunner()
NAME = "witness.example/w1"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- init


def test_init_writes_keys_and_vkeys(tmp_path: Path) -> None:
    out = run_axid("witness", "init", "--name", NAME, "--dir", str(tmp_path / "w"), "--ml-dsa")
    assert out.returncode == 0, out.stderr
    d = tmp_path / "w"
    assert sorted(p.name for p in d.iterdir()) == [
        "witness-mldsa.key",
        "witness-mldsa.vkey",
        "witness.key",
        "witness.vkey",
    ]
    assert mode(d) == 0o700
    assert (mode(d / "witness.key"), mode(d / "witness-mldsa.key")) == (0o600, 0o600)
    vkeys = [(d / "witness.vkey").read_text(), (d / "witness-mldsa.vkey").read_text()]
    assert out.stdout == "".join(vkeys)  # the public keys, nothing else
    ed, ml = (parse_vkey(v) for v in vkeys)
    assert (ed.name, ed.kind, ml.name, ml.kind) == (NAME, 0x04, NAME, 0x06)
    ed_key = serialization.load_pem_private_key((d / "witness.key").read_bytes(), None)
    ml_key = serialization.load_pem_private_key((d / "witness-mldsa.key").read_bytes(), None)
    assert isinstance(ed_key, Ed25519PrivateKey) and isinstance(ml_key, MLDSA44PrivateKey)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert ed_key.public_key().public_bytes(*raw) == ed.public
    assert ml_key.public_key().public_bytes(*raw) == ml.public
    assert b"PRIVATE KEY" not in out.stdout.encode() + out.stderr.encode()


def test_init_refuses_to_overwrite_and_bad_names(tmp_path: Path) -> None:
    d = tmp_path / "w"
    assert (
        runner.invoke(_app.app, ["witness", "init", "--name", NAME, "--dir", str(d)]).exit_code == 0
    )
    assert sorted(p.name for p in d.iterdir()) == ["witness.key", "witness.vkey"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for extra in ([], ["--ml-dsa"]):
        r = runner.invoke(_app.app, ["witness", "init", "--name", NAME, "--dir", str(d), *extra])
        assert r.exit_code == 1 and "refusing to overwrite" in r.output
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written
    for bad in ("", "has space", "plus+sign", "x" * 256):
        r = runner.invoke(
            _app.app, ["witness", "init", "--name", bad, "--dir", str(tmp_path / "b")]
        )
        assert r.exit_code == 2 and "witness name" in r.output
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- config errors


def _serve_in_process(config: Path) -> tuple[int, str]:
    r = runner.invoke(_app.app, ["witness", "serve", "--config", str(config)])
    return r.exit_code, r.output


def _good_doc(tmp_path: Path) -> dict[str, object]:
    log = LogSide(unique_origin())
    return {
        "listen": "127.0.0.1:0",
        "keys": str(tmp_path / "wkeys"),
        "database": f"sqlite:///{tmp_path}/s.db",
        "logs": [{"origin": log.origin, "vkey": log.vkey}],
    }


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"extra": 1}, "extra: unknown key"),
        ({"listen": None}, "listen: is required"),
        ({"listen": "127.0.0.1"}, "listen: must be host:port"),
        ({"listen": "127.0.0.1:65536"}, "listen: must be host:port"),
        ({"listen": "[zz]:80"}, "listen: must be host:port"),
        ({"database": "mysql://x/y"}, "database: must be sqlite:///FILE or postgresql://"),
        ({"database": "sqlite:///:memory:"}, "database: SQLite needs a file"),
        ({"logs": []}, "logs: must be a non-empty list"),
        ({"logs": [{"origin": "o"}]}, "logs[0].vkey: must be"),
        ({"logs": [{"origin": "o", "vkey": "o+00000000+AA==", "x": 1}]}, "logs[0].x: unknown key"),
        ({"logs": [{"origin": " o", "vkey": "v"}]}, "logs[0].origin: checkpoint origin"),
        ({"logs": [{"origin": "o" * 256, "vkey": "v"}]}, "logs[0].origin: must be at most 255"),
        ({"tls": {"cert": "nope.pem", "key": "nope.key"}}, "tls.cert: "),
        ({"tls": {"cert": "nope.pem"}}, "tls.key: is required"),
    ],
)
def test_config_errors_exit_2_naming_the_key(
    tmp_path: Path, change: dict[str, object], key: str
) -> None:
    import yaml

    doc = {k: v for k, v in {**_good_doc(tmp_path), **change}.items() if v is not None}
    config = tmp_path / "witness.yaml"
    config.write_text(yaml.safe_dump(doc))
    code, output = _serve_in_process(config)
    assert code == 2 and key in output, output


def test_config_errors_vkeys_duplicates_yaml(tmp_path: Path) -> None:
    witness = init_witness(tmp_path)
    log = LogSide(unique_origin())
    config = tmp_path / "witness.yaml"
    base = f"listen: 127.0.0.1:0\nkeys: {witness.keys}\ndatabase: sqlite:///{tmp_path}/s.db\n"
    entry = f"{{origin: {log.origin}, vkey: '{log.vkey}'}}"
    witness_vkey = (witness.keys / "witness.vkey").read_text().strip()
    cases = {
        # A witness vkey (type 0x04) is not a log key (type 0x01).
        f"logs: [{{origin: {log.origin}, vkey: '{witness_vkey}'}}]": "unsupported vkey algorithm",
        f"logs: [{entry}, {entry}]": "logs[1].origin: origin",
        f"logs: [{{origin: {log.origin}, vkey: '{log.vkey[:-4]}AAA='}}]": "logs[0].vkey:",
        f"logs: [{entry}]\nlisten: 127.0.0.1:1": "duplicate key",
        f"logs: &a [{entry}]\nx: *a": "aliases",
    }
    for text, message in cases.items():
        config.write_text(base + text + "\n")
        code, output = _serve_in_process(config)
        assert code == 2 and message in output, (text, output)
    code, output = _serve_in_process(tmp_path / "missing.yaml")
    assert code == 2 and "cannot read" in output


# --------------------------------------------------------------------------- start-up failures


def test_start_failures_exit_1(tmp_path: Path) -> None:
    witness = init_witness(tmp_path)
    log = LogSide(unique_origin())
    config = write_config(
        tmp_path / "w.yaml",
        keys=tmp_path / "nokeys",
        database=f"sqlite:///{tmp_path}/s.db",
        logs=[log],
    )
    code, output = _serve_in_process(config)
    assert code == 1 and "witness.vkey: missing" in output
    os.chmod(witness.keys / "witness.key", 0o640)
    write_config(config, keys=witness.keys, database=f"sqlite:///{tmp_path}/s.db", logs=[log])
    code, output = _serve_in_process(config)
    assert code == 1 and "group/other access" in output
    os.chmod(witness.keys / "witness.key", 0o600)
    (witness.keys / "witness.vkey").write_text(LogSide("x").vkey + "\n")
    code, output = _serve_in_process(config)
    assert code == 1 and "not a witness vkey" in output


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    witness = init_witness(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "w.yaml",
            keys=witness.keys,
            database=f"sqlite:///{tmp_path}/s.db",
            logs=[LogSide(unique_origin())],
            listen=f"127.0.0.1:{port}",
        )
        code, output = _serve_in_process(config)
    assert code == 1 and "cannot start: " in output, output
    assert "listening" not in output


# --------------------------------------------------------------------------- serving variants


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "witness")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "w.pem", tmp_path / "w.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_https_and_an_encrypted_key_and_one_key_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "correct horse battery staple"
    monkeypatch.setenv("AXID_KEY_PASSPHRASE", secret)
    witness = init_witness(tmp_path)  # Ed25519 only, encrypted with the passphrase
    assert b"ENCRYPTED PRIVATE KEY" in (witness.keys / "witness.key").read_bytes()
    cert, key = _self_signed(tmp_path)
    log = LogSide(unique_origin()).grow(3)
    config = write_config(
        tmp_path / "w.yaml",
        keys=witness.keys,
        database=f"sqlite:///{tmp_path}/s.db",
        logs=[log],
        tls={"cert": cert.name, "key": key.name},  # relative: to the config's directory
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    with serving(config) as url, httpx.Client(verify=ctx, timeout=10) as client:
        assert url.startswith("https://127.0.0.1:")
        r = add_checkpoint(client, url, log.body(0, 3))
        assert r.status_code == 200 and r.text.count("\n") == 1
        verify_line(r.text, body_text(log, 3), witness.ed25519)
    monkeypatch.delenv("AXID_KEY_PASSPHRASE")
    code, output = _serve_in_process(config)
    assert code == 1 and "AXID_KEY_PASSPHRASE is not set" in output
    monkeypatch.setenv("AXID_KEY_PASSPHRASE", "wrong")
    code, output = _serve_in_process(config)
    assert code == 1 and "wrong passphrase" in output
    assert secret not in output


def test_evidence_of_a_fresh_witness(tmp_path: Path) -> None:
    witness = init_witness(tmp_path)
    config = write_config(
        tmp_path / "w.yaml",
        keys=witness.keys,
        database=f"sqlite:///{tmp_path}/s.db",
        logs=[LogSide(unique_origin())],
    )
    r = runner.invoke(_app.app, ["witness", "evidence", "--config", str(config)])
    assert (r.exit_code, r.output) == (0, "no evidence\n")
    r = runner.invoke(_app.app, ["witness", "evidence", "--config", str(config), "--json"])
    assert (r.exit_code, r.output) == (0, "[]\n")
