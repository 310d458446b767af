"""A service behind AxidVerifier whose ``log:`` names a witness, and the issuer whose
``audit:`` does (a real `axid witness serve` on loopback): the config reaches the
decision log, sync receipts carry the witness's cosignature, and a batch not
witnessed in time is a 503 audit_unavailable whose decision is nevertheless
recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _audit_witnessing_helpers import Witness, check_cosigned, running
from _issuer_helpers import make_world
from _issuer_helpers import running as issuer_running
from _verifier_helpers import ISSUER, Pki, call, http_scope, key_set, make_pki, new_signing_key
from _verifier_helpers import token_for as _token_for

from axid.audit.note import NoteSigner
from axid.audit.receipt import Receipt
from axid.audit.store import generate_log_key, origin_for
from axid.issuer.config import IssuerConfig
from verifier.config import IdentityConfig, LogConfig, VerifierConfig, load_yaml
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

NOW = 1_800_000_000.0
W1 = "witness.example/w1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("wv"))


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str, Witness]]:
    monkeypatch.delenv("AXID_KEY_PASSPHRASE", raising=False)
    key = tmp_path / "log.pem"
    vkey = NoteSigner(origin_for("payments"), generate_log_key(key)).vkey()
    (w1,) = Witness.create(tmp_path / "w", [W1], [(origin_for("payments"), vkey)])
    with running(w1):
        yield key, vkey, w1


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_verifier_sync_witnessing(pki: Pki, tmp_path: Path, setup: Any) -> None:
    key_path, _vkey, w1 = setup
    signing = new_signing_key()
    db = tmp_path / "axid.db"
    config = VerifierConfig.from_dict(
        {
            "service": "payments",
            "issuer": ISSUER,
            "tenants": ["acme"],
            "identity": {"bundle": str(pki.dev.bundle)},
            "jwks": {"file": str(tmp_path / "unused.json")},
            "revocations": {"database_url": f"sqlite:///{tmp_path / 'rev.db'}"},
            "log": {
                "url": f"sqlite:///{db}",
                "key": str(key_path),
                "witnesses": [w1.config_entry()],
                "witness_mode": "sync",
                "witness_timeout": 1,
            },
        },
        jwks=key_set(signing),
        revocations=StaticRevocations(),
        rules=(RouteRule("/payments/*", methods=["GET"], scope="payments:read"),),
        clock=lambda: NOW,
    )
    assert isinstance(config.log, LogConfig) and config.log.quorum == 1
    assert isinstance(config.identity, IdentityConfig)
    verifier = AxidVerifier(app, config)
    await verifier.startup()
    try:
        token = _token_for(pki, "planner", signing, now=NOW, scope="payments:read")
        scope = http_scope("/payments/p1", chain=pki.chain_pem("planner"), token=token)
        answer = await call(verifier, scope)
        assert answer.status == 200, answer.body
        receipt = Receipt.from_header(answer.headers["axid-receipt"])
        assert check_cosigned(receipt.checkpoint, origin_for("payments"), [w1.spec_key]) == {W1}
        registry = verifier.metrics.registry
        labels = {"log": "payments", "witness": W1}
        assert registry.get_sample_value("axid_log_witness_lag_entries", labels) == 0
        assert registry.get_sample_value("axid_log_witness_refusals_total", labels) == 0

        w1.stop()
        denied = await call(verifier, scope)
        assert denied.status == 503 and denied.json["reason"] == "audit_unavailable"
        log = verifier.decision_log
        assert log is not None and log.store.size() == 2  # recorded, not witnessed in time
        entry = next(log.store.entries(1, 2))[1]
        assert b'"decision":"allow"' in entry
    finally:
        await verifier.shutdown()


def test_issuer_sync_witnessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AXID_KEY_PASSPHRASE", raising=False)
    w = make_world(tmp_path, "sqlite")
    origin = origin_for(w.log_name)
    vkey = NoteSigner(origin, generate_log_key(w.tmp / "log.pem")).vkey()
    (w1,) = Witness.create(tmp_path / "w", [W1], [(origin, vkey)])
    with running(w1):
        text = (
            f"audit:\n  witnesses: [{{url: '{w1.url}', vkey: '{w1.vkey}'}}]\n"
            "  witness_mode: sync\n  witness_timeout: 1\n"
        )
        doc = {"registrations": "r", "svid": {"workload_api": "x"}, **load_yaml(text)}
        parsed = IssuerConfig.from_mapping(doc, environ={})
        with issuer_running(
            w,
            log_witnesses=parsed.log_witnesses,
            log_witness_mode=parsed.log_witness_mode,
            log_witness_timeout=parsed.log_witness_timeout,
        ):
            r = w.mint("planner", **w.root_body())
            assert r.status_code == 201, r.text
            receipt = Receipt.from_header(r.headers["axid-receipt"])
            assert check_cosigned(receipt.checkpoint, origin, [w1.spec_key]) == {W1}
            w1.stop()
            r = w.mint("planner", **w.root_body())
            assert r.status_code == 503 and r.json()["reason"] == "audit_unavailable"
            assert "token" not in r.json()
            assert [e["reason"] for e in w.entries()] == ["ok", "ok"]  # both recorded
