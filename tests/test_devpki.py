"""The dev PKI (`mtls.devpki`) and `axid certs`, on real files and a real subprocess."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from axid.cli import app
from axid.cli._certs import _parse_ttl, _TtlError
from mtls.devpki import (
    DEV_WORKLOADS,
    DevCA,
    DevPkiError,
    DevPkiExistsError,
    IssuedSvid,
    init_dev_pki,
    load_dev_pki,
    write_private_key,
)
from mtls.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from mtls.x509bundle import BundleSet
from mtls.x509svid import verify_svid

ALL_FILES = ["ca.pem", "ca.key", "bundle.pem"] + [
    f"{n}.{ext}" for n in DEV_WORKLOADS for ext in ("pem", "key")
]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "certs"
    init_dev_pki(d)
    return d


def _axid_script() -> str:
    script = Path(sys.executable).parent / "axid"
    if script.exists():
        return str(script)
    found = shutil.which("axid")
    assert found, "the axid console script is not installed"
    return found


# -- library -----------------------------------------------------------------------


def test_init_writes_all_files(pki_dir: Path) -> None:
    assert sorted(p.name for p in pki_dir.iterdir()) == sorted(ALL_FILES)
    for name in ALL_FILES:
        mode = _mode(pki_dir / name)
        if name.endswith(".key"):
            assert mode == 0o600, name
        else:
            assert mode == 0o644, name
    assert (pki_dir / "bundle.pem").read_bytes() == (pki_dir / "ca.pem").read_bytes()


def test_openssl_verifies_planner(pki_dir: Path) -> None:
    # The issue's done-when check: a missing openssl(1) is a broken test machine, not a skip.
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl(1) is required to check the dev PKI with a real peer"
    r = subprocess.run(
        [openssl, "verify", "-CAfile", str(pki_dir / "bundle.pem"), str(pki_dir / "planner.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK")


def test_planner_has_exactly_one_uri_san(pki_dir: Path) -> None:
    cert = x509.load_pem_x509_certificate((pki_dir / "planner.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/agent/planner"
    ]
    assert len(list(san)) == 1
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)


def test_server_svids_also_name_loopback(pki_dir: Path) -> None:
    # So that curl --cacert bundle.pem https://127.0.0.1:PORT/ verifies the issuer.
    for name in ("issuer", "payments"):
        cert = x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert len(san.get_values_for_type(x509.UniformResourceIdentifier)) == 1
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name in ("planner", "worker"):
        cert = x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert len(list(san)) == 1


def test_ca_shape(pki_dir: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.NameConstraints)
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_every_dev_svid_verifies(pki_dir: Path) -> None:
    bundles = BundleSet.from_file(pki_dir / "bundle.pem")
    assert bundles.trust_domains == frozenset({TrustDomain("example.org")})
    for name, path in DEV_WORKLOADS.items():
        v = verify_svid((pki_dir / f"{name}.pem").read_bytes(), bundles)
        assert str(v.spiffe_id) == f"spiffe://example.org{path}"


def test_load_dev_pki(pki_dir: Path) -> None:
    pki = load_dev_pki(pki_dir)
    assert pki.trust_domain == TrustDomain("example.org")
    assert pki.cert("planner") == pki_dir / "planner.pem"
    assert pki.key("worker") == pki_dir / "worker.key"
    assert pki.bundle == pki_dir / "bundle.pem"
    with pytest.raises(DevPkiError):
        pki.cert("../etc/passwd")


def test_init_twice_refuses_and_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    init_dev_pki(d)
    before = _snapshot(d)
    with pytest.raises(DevPkiExistsError, match="--force") as info:
        init_dev_pki(d)
    assert str(d / "ca.pem") in str(info.value)
    assert _snapshot(d) == before
    # Force rewrites everything.
    pki = init_dev_pki(d, force=True)
    after = _snapshot(d)
    assert sorted(after) == sorted(before)
    for name in ALL_FILES:
        assert after[name][0] != before[name][0], name
    assert _mode(d / "ca.key") == 0o600
    verify_svid((d / "worker.pem").read_bytes(), BundleSet.from_file(pki.bundle))


def test_init_refuses_if_any_single_file_exists(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    (d / "worker.key").write_bytes(b"mine")
    with pytest.raises(DevPkiExistsError, match=r"worker\.key"):
        init_dev_pki(d)
    assert [p.name for p in d.iterdir()] == ["worker.key"]
    assert (d / "worker.key").read_bytes() == b"mine"


def test_other_trust_domain(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "c", "acme.prod", svid_ttl=timedelta(minutes=5))
    cert = x509.load_pem_x509_certificate(pki.cert("payments").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=5)
    v = verify_svid(pki.cert("payments").read_bytes(), BundleSet.from_file(pki.bundle))
    assert str(v.spiffe_id) == "spiffe://acme.prod/svc/payments"
    with pytest.raises(SpiffeIdError):
        init_dev_pki(tmp_path / "d", "Acme.prod")
    assert not (tmp_path / "d").exists()


def test_issue_svid_rules() -> None:
    ca = DevCA.create("example.org")
    with pytest.raises(DevPkiError, match="trust domain"):
        ca.issue_svid("spiffe://other.org/x")
    with pytest.raises(SpiffeIdError):
        ca.issue_svid("spiffe://example.org/x/")
    with pytest.raises(DevPkiError):
        ca.issue_svid("spiffe://example.org")
    with pytest.raises(DevPkiError):
        ca.issue_svid("spiffe://example.org/x", ttl=timedelta(0))
    svid = ca.issue_svid(SpiffeId.parse("spiffe://example.org/x"), ttl=timedelta(minutes=10))
    assert isinstance(svid, IssuedSvid)
    assert svid.chain == (svid.cert,)
    assert svid.cert.not_valid_before_utc <= datetime.now(UTC) - timedelta(seconds=50)
    # Never outlives the CA.
    long = ca.issue_svid("spiffe://example.org/y", ttl=timedelta(days=10_000))
    assert long.cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    # Explicit not_before: verification at that time succeeds, before it fails.
    start = datetime.now(UTC) + timedelta(hours=2)
    later = ca.issue_svid("spiffe://example.org/z", not_before=start, ttl=timedelta(hours=1))
    assert later.cert.not_valid_before_utc == start.replace(microsecond=0)
    bs = BundleSet({ca.trust_domain: [ca.cert]})
    verify_svid(later.chain, bs, now=start + timedelta(minutes=1))
    assert "key" not in repr(svid).lower().replace("spiffe_id", "")


def test_issued_svid_write_and_reload(tmp_path: Path) -> None:
    ca = DevCA.create("example.org")
    ca.write(tmp_path)
    svid = ca.issue_svid("spiffe://example.org/agent/x")
    cert_path, key_path = svid.write(tmp_path / "agent.v2")
    assert cert_path == tmp_path / "agent.v2.pem" and key_path == tmp_path / "agent.v2.key"
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644
    assert cert_path.read_bytes() == svid.cert_pem()
    assert key_path.read_bytes() == svid.key_pem()
    loaded = DevCA.load(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded.cert == ca.cert and loaded.trust_domain == ca.trust_domain
    # A key that does not match the certificate is refused.
    other = DevCA.create("example.org")
    write_private_key(tmp_path / "other.key", other.key)
    with pytest.raises(DevPkiError, match="does not match"):
        DevCA.load(tmp_path / "ca.pem", tmp_path / "other.key")
    with pytest.raises(DevPkiError, match="does not exist"):
        DevCA.load(tmp_path / "nope.pem", tmp_path / "ca.key")
    # No temp files left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_private_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    old = os.umask(0)
    try:
        write_private_key(tmp_path / "k.key", key)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.key") == 0o600
    # Replacing an existing, too-open file leaves it 0600 too.
    (tmp_path / "open.key").write_bytes(b"x")
    os.chmod(tmp_path / "open.key", 0o644)
    write_private_key(tmp_path / "open.key", key)
    assert _mode(tmp_path / "open.key") == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "open.key").read_bytes()


# -- CLI -----------------------------------------------------------------------------


runner = CliRunner()


def test_cli_init_and_refuse(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    r = runner.invoke(app, ["certs", "init", "--dir", str(d)])
    assert r.exit_code == 0, r.output
    assert "planner.pem" in r.output and "spiffe://example.org/agent/planner" in r.output
    assert sorted(p.name for p in d.iterdir()) == sorted(ALL_FILES)
    before = _snapshot(d)
    r = runner.invoke(app, ["certs", "init", "--dir", str(d)])
    assert r.exit_code == 1
    assert "--force" in r.output and "already exists" in r.output
    assert _snapshot(d) == before
    r = runner.invoke(app, ["certs", "init", "--dir", str(d), "--force", "--ttl", "15m"])
    assert r.exit_code == 0, r.output
    cert = x509.load_pem_x509_certificate((d / "worker.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=15)


@pytest.mark.parametrize(
    ("td", "rule"), [("Example.org", "trust_domain_chars"), ("example.org:443", "port")]
)
def test_cli_init_invalid_trust_domain(tmp_path: Path, td: str, rule: str) -> None:
    r = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path / "c"), "--trust-domain", td])
    assert r.exit_code == 2
    assert rule in r.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("ttl", ["0s", "1x", "h", "-1h", "1.5h", "1h30m", ""])
def test_cli_bad_ttl(tmp_path: Path, ttl: str) -> None:
    r = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path / "c"), "--ttl", ttl])
    assert r.exit_code == 2
    assert not (tmp_path / "c").exists()


def test_cli_issue(tmp_path: Path, pki_dir: Path) -> None:
    prefix = tmp_path / "agent"
    r = runner.invoke(
        app,
        [
            "certs",
            "issue",
            "spiffe://example.org/agent/extra",
            "--out",
            str(prefix),
            "--ttl",
            "90s",
            "--dir",
            str(pki_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    pem = (tmp_path / "agent.pem").read_bytes()
    assert _mode(tmp_path / "agent.key") == 0o600
    v = verify_svid(pem, BundleSet.from_file(pki_dir / "bundle.pem"))
    assert str(v.spiffe_id) == "spiffe://example.org/agent/extra"
    assert v.leaf.not_valid_after_utc - v.leaf.not_valid_before_utc == timedelta(seconds=90)
    # Default TTL is 1h; an existing output is not overwritten without --force.
    args = ["certs", "issue", "spiffe://example.org/agent/extra", "--out", str(prefix)]
    r = runner.invoke(app, [*args, "--dir", str(pki_dir)])
    assert r.exit_code == 1 and "--force" in r.output
    assert (tmp_path / "agent.pem").read_bytes() == pem
    r = runner.invoke(app, [*args, "--dir", str(pki_dir), "--force"])
    assert r.exit_code == 0, r.output
    leaf = x509.load_pem_x509_certificate((tmp_path / "agent.pem").read_bytes())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=1)


@pytest.mark.parametrize(
    ("spiffe_id", "rule"),
    [
        ("spiffe://example.org/agent/x/", "trailing_slash"),
        ("spiffe://Example.org/x", "trust_domain_chars"),
        ("https://example.org/x", "scheme"),
        ("spiffe://example.org/a/../b", "dot_segment"),
        ("spiffe://example.org/a%20b", "percent_encoding"),
        ("spiffe://example.org/x?q=1", "query"),
        ("spiffe://example.org", "empty_path"),
        ("spiffe://other.org/x", "trust_domain_mismatch"),
    ],
)
def test_cli_issue_invalid_id(tmp_path: Path, pki_dir: Path, spiffe_id: str, rule: str) -> None:
    r = runner.invoke(
        app,
        ["certs", "issue", spiffe_id, "--out", str(tmp_path / "x"), "--dir", str(pki_dir)],
    )
    assert r.exit_code == 2, r.output
    assert rule in r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_issue_without_ca(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "certs",
            "issue",
            "spiffe://example.org/x",
            "--out",
            str(tmp_path / "x"),
            "--dir",
            str(tmp_path / "none"),
        ],
    )
    assert r.exit_code == 1
    assert "axid certs init" in r.output


def test_console_script_subprocess(tmp_path: Path) -> None:
    axid = _axid_script()
    d = tmp_path / "certs"
    r = subprocess.run(
        [axid, "certs", "init", "--dir", str(d), "--trust-domain", "acme.test"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spiffe://acme.test/agent/worker" in r.stdout
    r = subprocess.run(
        [axid, "certs", "issue", "spiffe://acme.test/Bad/", "--out", str(d / "x"), "--dir", str(d)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 2
    assert "trailing_slash" in r.stderr
    assert not (d / "x.pem").exists()


# -- the TTL parser ------------------------------------------------------------------


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=1, max_value=999_999), st.sampled_from(sorted(_UNIT_SECONDS)))
def test_parse_ttl_valid(n: int, unit: str) -> None:
    assert _parse_ttl(f"{n}{unit}") == timedelta(seconds=n * _UNIT_SECONDS[unit])


@given(st.text(max_size=12))
def test_parse_ttl_total(text: str) -> None:
    # Any text either parses to a positive duration or is refused with _TtlError.
    try:
        ttl = _parse_ttl(text)
    except _TtlError:
        return
    assert ttl > timedelta(0)
