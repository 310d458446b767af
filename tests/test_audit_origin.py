"""A log's configured checkpoint origin (DESIGN.md, "Decision log": ``log.origin``,
else ``axid/<log>``): what the log signs, what the database keeps and refuses to
change, and what readers (the auditor CLI, an export bundle, the verifier's
config) take it from: the stored origin, never ``axid/<log>``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _audit_helpers import runner, verify_cli
from _pg import require_pg
from _verifier_helpers import key_set, make_pki, new_signing_key

from axid.audit import DecisionLog
from axid.audit.note import NoteSigner
from axid.audit.store import (
    LogKeyMismatch,
    LogNameError,
    LogStore,
    load_log_key,
    make_engine,
    validate_origin,
)
from axid.cli import app
from verifier.config import ConfigError, IdentityConfig, LogConfig, VerifierConfig
from verifier.revocation import StaticRevocations
from verifier.runtime import Runtime

FIELDS = {
    "decision": "allow",
    "reason": "ok",
    "method": "GET",
    "path": "/payments/1",
    "agent": "planner",
    "run": "run-1",
    "peer": "spiffe://example.org/agent/planner",
}
BAD_ORIGINS = ["", "a b", "a\tb", "a+b", "https://example.org/axid/p", "x" * 256, 5]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'axid.db'}"
    return require_pg()


@pytest.fixture
def log() -> str:
    return f"pay-{uuid.uuid4().hex[:10]}"  # unique in the shared PostgreSQL database


async def _record(url: str, log: str, key: Path, origin: str | None, n: int = 3) -> str:
    """Append ``n`` decisions (one batch each) to ``log``; its vkey."""
    dl = await DecisionLog.open(url, log=log, key=key, create_key=True, max_delay=0, origin=origin)
    try:
        for _ in range(n):
            receipt = await dl.append(FIELDS)
            assert receipt.checkpoint.decode().startswith(f"{dl.origin}\n")
        return dl.vkey
    finally:
        await dl.close()


def _named(key: Path, name: str) -> str:
    """The vkey of the log key under another name."""
    return NoteSigner(name, load_log_key(key)).vkey()


# --------------------------------------------------------------------------- writing


async def test_checkpoints_carry_the_configured_origin(
    db_url: str, log: str, tmp_path: Path
) -> None:
    origin = f"example.org/axid/{log}"
    vkey = await _record(db_url, log, tmp_path / "log.pem", origin)
    assert vkey.startswith(f"{origin}+")
    engine = make_engine(db_url)
    try:
        store = LogStore(engine, log)  # a reader: the stored origin
        assert store.origin == origin
        note = store.latest_checkpoint()
        assert note is not None and note.decode().split("\n")[:2] == [origin, "3"]
    finally:
        engine.dispose()


async def test_default_origin_is_axid_log(tmp_path: Path) -> None:
    vkey = await _record(f"sqlite:///{tmp_path / 'a.db'}", "payments", tmp_path / "k.pem", None)
    assert vkey.startswith("axid/payments+")


async def test_reopening_with_another_origin_is_refused(
    db_url: str, log: str, tmp_path: Path
) -> None:
    key = tmp_path / "log.pem"
    origin = f"example.org/axid/{log}"
    await _record(db_url, log, key, origin, n=1)
    for other in (f"example.net/axid/{log}", None):
        with pytest.raises(LogKeyMismatch) as info:
            await DecisionLog.open(db_url, log=log, key=key, origin=other)
        assert origin in str(info.value) and (other or f"axid/{log}") in str(info.value)
    await _record(db_url, log, key, origin, n=1)  # the same origin still opens


@pytest.mark.parametrize("bad", BAD_ORIGINS)
async def test_invalid_origin_refused_before_opening(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(LogNameError):
        validate_origin(bad)
    url = f"sqlite:///{tmp_path / 'never.db'}"
    with pytest.raises(LogNameError):
        await DecisionLog.open(url, log="payments", key=tmp_path / "k.pem", origin=bad)
    assert not (tmp_path / "never.db").exists()


# --------------------------------------------------------------------------- the auditor


async def test_verify_takes_the_vkey_named_after_the_stored_origin(
    db_url: str, log: str, tmp_path: Path
) -> None:
    key = tmp_path / "log.pem"
    vkey = await _record(db_url, log, key, f"example.org/axid/{log}")
    code, report, result = verify_cli("--db", db_url, "--log", log, "--vkey", vkey)
    assert code == 0 and report is not None and report["ok"], result.output
    assert report["latest_checkpoint"]["origin"] == f"example.org/axid/{log}"
    code, _, result = verify_cli("--db", db_url, "--log", log, "--vkey", _named(key, f"axid/{log}"))
    assert code != 0, result.output


async def test_every_log_takes_its_own_vkey_and_trusted_checkpoint(tmp_path: Path) -> None:
    """Two logs in one database, one with the default origin and one configured:
    each takes the --vkey and --trusted-checkpoint of its stored origin."""
    url = f"sqlite:///{tmp_path / 'axid.db'}"
    v1 = await _record(url, "payments", tmp_path / "p.pem", "example.org/axid/payments")
    v2 = await _record(url, "issuer", tmp_path / "i.pem", None)
    code, report, result = verify_cli("--db", url, "--vkey", v2, "--vkey", v1)
    assert code == 0 and report is not None and report["ok"], result.output
    notes = {d["log"]: d["latest_checkpoint"]["note"] for d in report["logs"]}
    trusted = []
    for name, note in notes.items():
        (tmp_path / f"{name}.cp").write_text(note)
        trusted += ["--trusted-checkpoint", str(tmp_path / f"{name}.cp")]
    code, report, result = verify_cli("--db", url, "--vkey", v1, "--vkey", v2, *trusted)
    assert code == 0 and report is not None and report["ok"], result.output
    # The default-named key of a log with a configured origin is no key for it.
    wrong = _named(tmp_path / "p.pem", "axid/payments")
    code, _, result = verify_cli("--db", url, "--vkey", wrong, "--vkey", v2)
    assert code == 2, result.output


async def test_export_bundle_verifies_with_the_origin_vkey(log: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'axid.db'}"
    key = tmp_path / "log.pem"
    origin = f"example.org/axid/{log}"
    vkey = await _record(url, log, key, origin)
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["audit", "export", "--db", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "vkey").read_text().strip() == vkey
    assert (out / "checkpoints" / "3").read_text().startswith(f"{origin}\n")
    code, report, result = verify_cli(str(out), "--vkey", vkey)
    assert code == 0 and report is not None and report["ok"], result.output
    (tmp_path / "cp").write_text(report["latest_checkpoint"]["note"])
    code, report, result = verify_cli(
        str(out), "--vkey", vkey, "--trusted-checkpoint", str(tmp_path / "cp"), "--log", log
    )
    assert code == 0 and report is not None and report["ok"], result.output
    code, _, result = verify_cli(str(out), "--vkey", _named(key, f"axid/{log}"))
    assert code != 0, result.output


# --------------------------------------------------------------------------- the verifier


def _config(tmp_path: Path, log: dict[str, Any]) -> dict[str, Any]:
    return {
        "service": "payments",
        "issuer": "https://issuer.example.org",
        "tenants": ["acme"],
        "identity": {"bundle": "/etc/axid/bundle.pem"},
        "jwks": {"file": "/etc/axid/jwks.json"},
        "revocations": {"database_url": "sqlite:////var/axid/axid.db"},
        "log": {"url": f"sqlite:///{tmp_path / 'axid.db'}", "key": "/etc/axid/log.pem", **log},
    }


@pytest.mark.parametrize("bad", BAD_ORIGINS)
def test_config_refuses_invalid_origin(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        VerifierConfig.from_dict(_config(tmp_path, {"origin": bad}))
    assert info.value.key == "log.origin", str(info.value)


def test_config_reads_origin(tmp_path: Path) -> None:
    config = VerifierConfig.from_dict(_config(tmp_path, {"origin": "example.org/axid/payments"}))
    assert config.log.origin == "example.org/axid/payments"
    assert VerifierConfig.from_dict(_config(tmp_path, {})).log.origin is None


@pytest.fixture
def pki_dir(tmp_path: Path) -> Iterator[Any]:
    yield make_pki(tmp_path / "pki")


async def test_verifier_log_origin_reaches_its_checkpoints(tmp_path: Path, pki_dir: Any) -> None:
    """The governed service's own log (the runtime the verifier opens from its
    config) signs with ``log.origin``, and the database keeps it."""
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    origin = "example.org/axid/payments"
    config = VerifierConfig(
        service="payments",
        issuer="https://issuer.example.org",
        tenants=["acme"],
        identity=IdentityConfig(bundle=pki_dir.dev.bundle),
        jwks=key_set(new_signing_key()),
        revocations=StaticRevocations(),
        log=LogConfig(url=url, key=tmp_path / "log.pem", max_delay=0, origin=origin),
        rules=[],
    )
    async with Runtime.open(config) as runtime:
        assert runtime.log.vkey.startswith(f"{origin}+")
        receipt = await runtime.log.append(FIELDS)
        assert receipt.checkpoint.decode().startswith(f"{origin}\n")
    engine = make_engine(url)
    try:
        store = LogStore(engine, "payments")
        assert store.origin == origin
        note = store.latest_checkpoint()
        assert note is not None and note.decode().startswith(f"{origin}\n1\n")
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the issuer's own log


@pytest.mark.parametrize(
    ("origin", "ok"), [("example.org/axid/issuer", True), ("a b", False), ("https://x/y", False)]
)
def test_issuer_config_reads_audit_origin(origin: str, ok: bool, tmp_path: Path) -> None:
    from axid.issuer.config import ConfigError as IssuerConfigError
    from axid.issuer.config import IssuerConfig

    path = tmp_path / "issuer.yaml"
    path.write_text(
        f"registrations: r\nsvid: {{workload_api: x}}\naudit: {{log: issuer, origin: {origin!r}}}\n"
    )
    if ok:
        assert IssuerConfig.from_file(path, environ={}).log_origin == origin
    else:
        with pytest.raises(IssuerConfigError) as info:
            IssuerConfig.from_file(path, environ={})
        assert info.value.key == "audit.origin"


def test_issuer_audit_origin_signs_its_checkpoints(tmp_path: Path) -> None:
    """A real issuer over mTLS with ``audit.origin``: its served checkpoint names it."""
    from _issuer_helpers import make_world, running

    w = make_world(tmp_path, "sqlite")
    with running(w, log_origin="example.org/axid/issuer") as world:
        r = world.client("planner").get(f"{world.url}/v1/audit/checkpoint")
        if r.status_code == 404:  # no checkpoint yet: make one decision first
            world.client("planner").post(f"{world.url}/v1/tokens", json={})
            r = world.client("planner").get(f"{world.url}/v1/audit/checkpoint")
        assert r.status_code == 200, r.text
        assert r.text.split("\n", 1)[0] == "example.org/axid/issuer"
