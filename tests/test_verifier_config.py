"""VerifierConfig: YAML loading, strictness (unknown keys named), defaults, hypothesis."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid.keys import KeySet
from verifier.config import (
    IdentityConfig,
    JwksConfig,
    LogConfig,
    RevocationConfig,
    TrustedProxies,
    VerifierConfig,
    load_yaml,
)
from verifier.errors import ConfigError
from verifier.revocation import StaticRevocations
from verifier.rules import RouteRule

FULL = """\
service: payments
issuer: https://issuer.example.org
audience: payments
tenants: [acme, globex]
header: X-Waxell-AXID
leeway: 10
identity:
  bundle: certs/bundle.pem
  cert: certs/payments.pem
  key: certs/payments.key
issuer_id: spiffe://example.org/axid/issuer
trusted_proxies:
  - spiffe://example.org/envoy/*
  - 127.0.0.1/32
  - "::1"
jwks:
  url: https://127.0.0.1:8443/.well-known/jwks.json
  cache_ttl: 120
  refetch_min_interval: 10
  max_stale: 600
revocations:
  url: https://127.0.0.1:8443/v1/revocations
  interval: 2
  max_stale: 20
log:
  url: sqlite:///.axid/axid.db
  key: keys/payments-log.pem
  max_batch: 64
  max_delay: 0.005
replay:
  database_url: postgresql://postgres@127.0.0.1:5432/test
rules:
  - {methods: [GET], path: "/payments/*", scope: "payments:read"}
  - methods: [POST]
    path: /payments/*/refund
    scope: payments:refund
    single_use: true
    agents: [planner, worker]
    tenants: [acme]
  - {path: /healthz, governed: false}
"""

MINIMAL: dict[str, Any] = {
    "service": "payments",
    "issuer": "https://issuer.example.org",
    "tenants": ["acme"],
    "identity": {"bundle": "/etc/axid/bundle.pem"},
    "jwks": {"file": "/etc/axid/jwks.json"},
    "revocations": {"database_url": "sqlite:////var/axid/axid.db"},
    "log": {"url": "sqlite:////var/axid/axid.db", "key": "/etc/axid/log.pem"},
}


def test_from_file_full(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "verifier.yaml"
    path.parent.mkdir()
    path.write_text(FULL)
    config = VerifierConfig.from_file(path)
    base = path.parent
    assert config.service == "payments" and config.audience == "payments"
    assert config.tenants == ("acme", "globex")
    assert config.leeway == 10
    assert config.identity == IdentityConfig(
        bundle=(base / "certs/bundle.pem",),
        cert=base / "certs/payments.pem",
        key=base / "certs/payments.key",
    )
    assert str(config.issuer_id) == "spiffe://example.org/axid/issuer"
    assert config.trusted_proxies.items == ("spiffe://example.org/envoy/*", "127.0.0.1/32", "::1")
    assert isinstance(config.jwks, JwksConfig)
    assert config.jwks.cache_ttl == 120 and config.jwks.max_stale == 600
    assert isinstance(config.revocations, RevocationConfig) and config.revocations.interval == 2
    assert config.log.key == base / "keys/payments-log.pem"
    assert config.log_name == "payments"  # defaults to the service
    assert config.replay_url.startswith("postgresql://")
    assert len(config.rules) == 3 and config.rules[1].single_use
    assert config.rule_set.match("GET", "/healthz") is config.rules[2]
    assert config.source_file == path


def test_minimal_defaults() -> None:
    config = VerifierConfig.from_dict(MINIMAL)
    assert config.header == "X-Waxell-AXID"
    assert config.leeway == 5
    assert config.audience == "payments"
    assert config.replay_url == MINIMAL["log"]["url"]
    assert config.log.create_key is True
    assert config.rules == ()
    assert isinstance(config.jwks, JwksConfig) and config.jwks.cache_ttl == 300
    assert not config.any_tenant
    assert VerifierConfig.from_dict({**MINIMAL, "tenants": ["*"]}).any_tenant


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"colour": "blue"}, "colour"),
        ({"identity": {"bundle": "b.pem", "certs": "x"}}, "identity.certs"),
        ({"jwks": {"file": "j.json", "ttl": 5}}, "jwks.ttl"),
        ({"revocations": {"url": "https://i/v1/revocations", "poll": 1}}, "revocations.poll"),
        ({"log": {"url": "sqlite:///x.db", "key": "k.pem", "batch": 1}}, "log.batch"),
        ({"replay": {"url": "sqlite:///x.db"}}, "replay.url"),
        (
            {"rules": [{"path": "/x"}, {"path": "/y", "scope_required": "a"}]},
            "rules[1].scope_required",
        ),
        ({"rules": [{"path": "/x", "methods": ["get"]}]}, "rules[0].methods"),
        ({"rules": [{"path": "/x", "tenants": ["globex"]}]}, "rules[0].tenants"),
        ({"leeway": 31}, "leeway"),
        ({"leeway": True}, "leeway"),
        ({"tenants": []}, "tenants"),
        ({"tenants": "acme"}, "tenants"),
        ({"tenants": ["Acme"]}, "tenants"),
        ({"tenants": ["*", "acme"]}, "tenants"),
        ({"header": "X Bad"}, "header"),
        ({"header": "X-Forwarded-Client-Cert"}, "header"),
        ({"service": "bad service"}, "service"),
        ({"issuer": ""}, "issuer"),
        ({"issuer_id": "spiffe://Example.org/x"}, "issuer_id"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies[0]"),
        ({"trusted_proxies": ["spiffe://example.org/a*"]}, "trusted_proxies[0]"),
        ({"trusted_proxies": "127.0.0.1"}, "trusted_proxies"),
        ({"jwks": {"file": "j.json", "cache_ttl": 330}}, "jwks.cache_ttl"),
        ({"jwks": {"file": "j.json", "cache_ttl": 0}}, "jwks.cache_ttl"),
        ({"jwks": {"file": "j.json", "max_stale": 10}}, "jwks.max_stale"),
        ({"jwks": {}}, "jwks"),
        ({"jwks": {"file": "j.json", "url": "https://i/jwks"}}, "jwks"),
        ({"jwks": {"url": "http://i/jwks"}}, "jwks.url"),
        ({"revocations": {}}, "revocations"),
        ({"revocations": {"database_url": "mysql://x"}}, "revocations.database_url"),
        ({"revocations": {"database_url": "sqlite:///x", "interval": 60}}, "revocations.max_stale"),
        ({"log": {"url": "sqlite:///x.db"}}, "log.key"),
        ({"log": {"url": "sqlite:///x.db", "key": "k", "name": "Bad Name"}}, "log.name"),
        ({"log": {"url": "sqlite:///x.db", "key": "k", "max_batch": 0}}, "log.max_batch"),
        ({"log": {"url": "sqlite:///x.db", "key": "k", "create_key": "yes"}}, "log.create_key"),
        ({"identity": {"bundle": "b.pem", "workload_api": "unix:///s"}}, "identity"),
        ({"identity": {"bundle": "b.pem", "cert": "c.pem"}}, "identity"),
        ({"identity": {}}, "identity"),
        ({"jwks": {"url": "https://i/jwks"}}, "identity"),  # mTLS to the issuer needs a SVID
    ],
)
def test_refused_with_key(change: dict[str, Any], key: str) -> None:
    doc = {**MINIMAL, **change}
    with pytest.raises(ConfigError) as info:
        VerifierConfig.from_dict(doc)
    assert info.value.key == key, str(info.value)


@pytest.mark.parametrize("missing", ["service", "issuer", "tenants", "jwks", "revocations", "log"])
def test_required_keys(missing: str) -> None:
    doc = {k: v for k, v in MINIMAL.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        VerifierConfig.from_dict(doc)
    assert info.value.key == missing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\na: 2\n", "duplicate key"),
        ("a: &x 1\nb: *x\n", "aliases"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n", "alias"),
        ("a: [1,\n", "line"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_strict_yaml(text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_yaml(text)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        VerifierConfig.from_file(tmp_path / "absent.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        VerifierConfig.from_file(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(ConfigError, match="mapping"):
        VerifierConfig.from_file(listed)


def test_code_config() -> None:
    keys = KeySet()
    config = VerifierConfig(
        service="payments",
        issuer="https://issuer.example.org",
        tenants=["acme"],
        identity=IdentityConfig(bundle="/b.pem"),
        jwks=keys,
        revocations=StaticRevocations(),
        log=LogConfig(url="sqlite:////tmp/x.db", key="/tmp/k.pem"),
        rules=[RouteRule("/x", scope="a")],
        checks=[lambda action, request: None],
    )
    assert isinstance(config.jwks, JwksConfig) and config.jwks.keys is keys
    assert config.tenants == ("acme",)
    with pytest.raises(ConfigError) as info:
        VerifierConfig(
            service="payments",
            issuer="https://issuer.example.org",
            tenants=["acme"],
            identity=IdentityConfig(bundle="/b.pem"),
            jwks=keys,
            revocations=StaticRevocations(),
            log=LogConfig(url="sqlite:////tmp/x.db", key="/tmp/k.pem"),
            checks=[42],
        )
    assert info.value.key == "checks[0]"
    with pytest.raises(ConfigError) as info:
        VerifierConfig(
            service="Payments Service",
            issuer="https://issuer.example.org",
            tenants=["acme"],
            identity=IdentityConfig(bundle="/b.pem"),
            jwks=keys,
            revocations=StaticRevocations(),
            log=LogConfig(url="sqlite:////tmp/x.db", key="/tmp/k.pem"),
        )
    assert info.value.key == "service"


def test_trusted_proxies() -> None:
    tp = TrustedProxies(["spiffe://example.org/envoy/*", "127.0.0.0/8", "::1"])
    from mtls.spiffeid import SpiffeId

    assert tp.trusts_svid(SpiffeId.parse("spiffe://example.org/envoy/a"))
    assert not tp.trusts_svid(SpiffeId.parse("spiffe://example.org/envoy/a/b"))
    assert not tp.trusts_svid(SpiffeId.parse("spiffe://other.org/envoy/a"))
    assert tp.trusts_ip("127.0.0.1") and tp.trusts_ip("127.1.2.3")
    assert tp.trusts_ip("::1") and tp.trusts_ip("::ffff:127.0.0.1")
    assert not tp.trusts_ip("10.0.0.1") and not tp.trusts_ip("not-an-ip") and not tp.trusts_ip(None)
    assert not TrustedProxies([])


# --------------------------------------------------------------------------- hypothesis

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 400)
    | st.floats(allow_nan=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in doc.items():
        out.append((key,))
        if isinstance(value, dict):
            out += [(key, *p) for p in _paths(value)]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_config_is_valid_or_config_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["rules"] = [{"path": "/payments/*", "scope": "payments:read"}]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        target = doc
        for part in path[:-1]:
            target = target[part]
        if data.draw(st.booleans()):
            target[path[-1]] = data.draw(_values)
        else:
            target.pop(path[-1], None)
        if data.draw(st.booleans()):
            target[data.draw(st.sampled_from(["zzz", "Colour", "url", "file"]))] = data.draw(
                _values
            )
    try:
        config = VerifierConfig.from_dict(doc)
    except ConfigError as exc:
        assert str(exc)
        return
    assert config.tenants and config.log_name


def test_documented_example_loads() -> None:
    """The YAML in verifier.config's docstring is a valid configuration."""
    import textwrap

    import verifier.config as module

    doc = module.__doc__ or ""
    text = textwrap.dedent(doc[doc.index("::") + 3 : doc.index("Code-only settings")])
    config = VerifierConfig.from_dict(load_yaml(text))
    assert config.service == "payments" and len(config.rules) == 3
    assert config.rule_set.match("POST", "/payments/p1/refund").single_use  # type: ignore[union-attr]


def test_sqlite_file_paths(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    doc = {
        **MINIMAL,
        "log": {"url": "state/axid.db", "key": "log.pem"},
        "revocations": {"database_url": "/var/axid/issuer.db"},
        "replay": {"database_url": "state/jti.db"},
    }
    path.write_text(json.dumps(doc))
    config = VerifierConfig.from_file(path)
    assert config.log.url == f"sqlite:///{tmp_path}/state/axid.db"
    assert isinstance(config.revocations, RevocationConfig)
    assert config.revocations.database_url == "sqlite:////var/axid/issuer.db"
    assert config.replay_url == f"sqlite:///{tmp_path}/state/jti.db"
    assert LogConfig(url=tmp_path / "x.db", key="k").url == f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(ConfigError):
        LogConfig(url=":memory:", key="k")


def test_package_exports_what_a_service_calls() -> None:
    """``verifier`` exports the middleware, its config and the types a service reads
    or builds; internals are imported from their modules."""
    import verifier

    assert set(verifier.__all__) == {
        "ApprovalsConfig",
        "AxidVerifier",
        "BudgetLedger",
        "CheckResult",
        "ConfigError",
        "CustomCheck",
        "Decision",
        "IdentityConfig",
        "JwksConfig",
        "LogConfig",
        "ReplayConfig",
        "RequestInfo",
        "RevocationConfig",
        "RouteRule",
        "TrustedProxies",
        "VerifiedAction",
        "VerifierConfig",
        "VerifierError",
        "VerifierMetrics",
    }
    assert all(hasattr(verifier, name) for name in verifier.__all__)
    assert not hasattr(verifier, "Pipeline") and not hasattr(verifier, "PeerResolver")
