"""The registration file and the issuer config: strict parsing, typed errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid.issuer.config import ConfigError, IssuerConfig
from axid.issuer.problems import Refusal
from axid.issuer.registry import Registry, RegistryError, parse_scope
from axid.issuer.schemas import MintRequest, parse_json_body, validate_body
from mtls.spiffeid import SpiffeId

GOOD = """
registrations:
  - spiffe_id: "spiffe://example.org/agent/planner"
    tenant: acme
    agents: [planner]
    audiences: [payments]
    scope: "payments:read payments:refund payments:delete"
  - spiffe_id: "spiffe://example.org/agent/*"
    tenant: acme
    agents: [worker, helper]
    audiences: [payments, "https://ledger.example.org"]
    scope: [payments:read]
  - spiffe_id: "spiffe://other.org/**"
    tenant: globex
    agents: [bot]
    audiences: [payments]
    scope: payments:read
"""


def entry(**changes: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "spiffe_id": "spiffe://example.org/agent/planner",
        "tenant": "acme",
        "agents": ["planner"],
        "audiences": ["payments"],
        "scope": "payments:read",
    }
    for k, v in changes.items():
        if v is ...:
            del e[k]
        else:
            e[k] = v
    return e


def doc(*entries: dict[str, Any]) -> str:
    return json.dumps({"registrations": list(entries)})


def test_good_registry_first_match_wins() -> None:
    reg = Registry.from_yaml(GOOD)
    assert len(reg) == 3
    planner = reg.match(SpiffeId.parse("spiffe://example.org/agent/planner"))
    assert planner is not None and planner.index == 0 and planner.agents == {"planner"}
    assert planner.scope == {"payments:read", "payments:refund", "payments:delete"}
    worker = reg.match(SpiffeId.parse("spiffe://example.org/agent/worker"))
    assert worker is not None and worker.index == 1 and worker.rule.endswith("/agent/*")
    assert worker.audiences == {"payments", "https://ledger.example.org"}
    assert worker.scope == {"payments:read"}
    bot = reg.match(SpiffeId.parse("spiffe://other.org/a/b"))
    assert bot is not None and bot.tenant == "globex"
    assert reg.match(SpiffeId.parse("spiffe://example.org/svc/payments")) is None
    assert reg.match(SpiffeId.parse("spiffe://example.org/agent/a/b")) is None


def test_registry_file(tmp_path: Path) -> None:
    p = tmp_path / "reg.yaml"
    p.write_text(GOOD)
    assert len(Registry.from_file(p)) == 3
    with pytest.raises(RegistryError, match="cannot read"):
        Registry.from_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "index", "key", "match"),
    [
        (doc(entry(extra=1)), 0, "extra", "unknown key"),
        (
            doc(entry(), entry(spiffe_id="spiffe://example.org/x", tenant=...)),
            1,
            "tenant",
            "required",
        ),
        (doc(entry(tenant="Acme")), 0, "tenant", "slug"),
        (doc(entry(tenant="-acme")), 0, "tenant", "slug"),
        (doc(entry(tenant="a" * 64)), 0, "tenant", "slug"),
        (doc(entry(tenant="acme\n")), 0, "tenant", "slug"),
        (doc(entry(tenant=5)), 0, "tenant", "slug"),
        (doc(entry(agents=[])), 0, "agents", "non-empty"),
        (doc(entry(agents="planner")), 0, "agents", "non-empty list"),
        (doc(entry(agents=["ok", "Bad"])), 0, "agents", "slug"),
        (doc(entry(agents=["a", "a"])), 0, "agents", "repeats"),
        (doc(entry(audiences=["pay ments"])), 0, "audiences", "service name"),
        (doc(entry(scope="")), 0, "scope", "empty"),
        (doc(entry(scope="a  b")), 0, "scope", "scope token"),
        (doc(entry(scope='a "b"')), 0, "scope", "scope token"),
        (doc(entry(scope="a a")), 0, "scope", "repeats"),
        (doc(entry(scope=5)), 0, "scope", "string or a list"),
        (doc(entry(spiffe_id="spiffe://example.org/agent-*")), 0, "spiffe_id", "pattern"),
        (doc(entry(spiffe_id="spiffe://Example.org/a")), 0, "spiffe_id", "pattern"),
        (doc(entry(spiffe_id="spiffe://example.org")), 0, "spiffe_id", "trust domain"),
        (doc(entry(spiffe_id="spiffe://*/a")), 0, "spiffe_id", "pattern"),
        (doc(entry(spiffe_id=["x"])), 0, "spiffe_id", "string"),
        (doc(entry(), entry(tenant="b")), 1, "spiffe_id", "same spiffe_id"),
        (doc("x"), 0, None, "mapping"),  # type: ignore[arg-type]
        (doc(entry(spawn_from=None)), 0, "spawn_from", "must be a list"),
        (doc(entry(spawn_from="spiffe://example.org/a")), 0, "spawn_from", "must be a list"),
        (doc(entry(spawn_from=["spiffe://example.org/a-*"])), 0, "spawn_from", "pattern"),
        (doc(entry(spawn_from=["spiffe://example.org/A/"])), 0, "spawn_from", "pattern"),
        (doc(entry(spawn_from=["spiffe://example.org"])), 0, "spawn_from", "trust domain"),
        (doc(entry(spawn_from=[5])), 0, "spawn_from", "string"),
        (
            doc(entry(spawn_from=["spiffe://example.org/a", "spiffe://example.org/a"])),
            0,
            "spawn_from",
            "repeats",
        ),
    ],
)
def test_registry_errors_name_entry_and_key(
    text: str, index: int | None, key: str | None, match: str
) -> None:
    with pytest.raises(RegistryError, match=match) as info:
        Registry.from_yaml(text)
    assert info.value.index == index
    assert info.value.key == key
    if index is not None:
        assert f"registrations[{index}]" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("registrations: []\nother: 1\n", "unknown top-level key"),
        ("{}", "required"),
        ("registrations: {}", "must be a list"),
        ("- a\n- b\n", "mapping"),
        ("registrations: [\n", "line"),
        ("a: 1\na: 2\n", "duplicate key"),
        ("registrations:\n  - &e {tenant: a}\n  - *e\n", "aliases"),
        ("registrations:\n  - <<: {tenant: a}\n", "merge keys"),
        ("registrations: []\n? [a, b]\n: 1\n", "scalar|unhashable|key"),
        (b"registrations: [\xff]", "UTF-8"),
        ("x: 2001-13-45\n", "invalid value|unknown top-level"),
    ],
)
def test_registry_document_errors(text: str | bytes, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        Registry.from_yaml(text)


def test_spawn_from_is_optional() -> None:
    reg = Registry.from_yaml(
        doc(
            entry(),
            entry(
                spiffe_id="spiffe://example.org/agent/worker",
                spawn_from=["spiffe://example.org/agent/planner", "spiffe://example.org/ops/*"],
            ),
            entry(spiffe_id="spiffe://example.org/agent/root-only", spawn_from=[]),
        )
    )
    none, worker, root_only = reg
    # Absent: no parent at all (explicit delegation), not even the workload itself.
    assert none.spawn_from is None
    assert not none.may_spawn_from("spiffe://example.org/anything/at/all")
    assert not none.may_spawn_from(SpiffeId.parse("spiffe://other.org/x"))
    assert not none.may_spawn_from(str(none.pattern))
    assert worker.spawn_from is not None and len(worker.spawn_from) == 2
    assert worker.may_spawn_from("spiffe://example.org/agent/planner")
    assert worker.may_spawn_from(SpiffeId.parse("spiffe://example.org/ops/admin"))
    for sub in (
        "spiffe://example.org/agent/worker",
        "spiffe://example.org/agent/planner/x",
        "spiffe://other.org/agent/planner",
        "spiffe://example.org/ops",
        "spiffe://Example.org/agent/planner",  # never normalised into a match
        "not a spiffe id",
    ):
        assert not worker.may_spawn_from(sub), sub
    assert root_only.spawn_from == ()
    assert not root_only.may_spawn_from("spiffe://example.org/agent/planner")


def test_empty_registry_is_valid() -> None:
    assert len(Registry.from_yaml("registrations: []")) == 0


def test_parse_scope() -> None:
    assert parse_scope("b a") == {"a", "b"}
    assert parse_scope(["a", "b"]) == {"a", "b"}
    for bad in ("", " a", "a ", "a\tb", "a\\b", ["a", 1], 3):
        with pytest.raises(ValueError):
            parse_scope(bad)


_yamlish = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "spiffe://example.org/agent/*",
            "spiffe://example.org/**",
            "payments:read",
            "acme",
            "registrations",
            "spiffe_id",
            "tenant",
            "agents",
            "audiences",
            "scope",
            "spawn_from",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "registrations",
                    "spiffe_id",
                    "tenant",
                    "agents",
                    "audiences",
                    "scope",
                    "spawn_from",
                    "x",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(spawn_from=_yamlish)
def test_spawn_from_values_raise_only_registry_error(spawn_from: Any) -> None:
    with contextlib.suppress(RegistryError):
        [reg] = Registry.from_yaml(doc(entry(spawn_from=spawn_from)))
        # Accepted only as a list of patterns; absent is never produced by a value.
        assert isinstance(spawn_from, list) and reg.spawn_from is not None
        assert len(reg.spawn_from) == len(spawn_from)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_yamlish)
def test_registry_structures_raise_only_registry_error(value: Any) -> None:
    for text in (json.dumps(value), json.dumps({"registrations": value})):
        with contextlib.suppress(RegistryError):
            Registry.from_yaml(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | st.binary(max_size=200))
def test_registry_text_raises_only_registry_error(text: str | bytes) -> None:
    with contextlib.suppress(RegistryError):
        Registry.from_yaml(text)


_YAML_PIECES = st.sampled_from(
    [
        "registrations:",
        "\n  - ",
        "spiffe_id: ",
        '"spiffe://example.org/agent/planner"',
        "tenant: acme",
        "agents: [planner]",
        "audiences: [payments]",
        "scope: payments:read",
        "\n    ",
        "&a ",
        "*a",
        "<<: ",
        "!!python/object:os.system ",
        "!!binary ",
        "? ",
        "[",
        "]",
        "{",
        "}",
        ", ",
        "- ",
        "\n",
        ": ",
        "2001-13-45",
        "0x1F",
        "~",
        "'",
        '"',
        "%YAML 1.1\n---\n",
        "--- ",
        "...",
    ]
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_YAML_PIECES, max_size=30))
def test_yamlish_text_raises_only_registry_error(pieces: list[str]) -> None:
    with contextlib.suppress(RegistryError):
        Registry.from_yaml("".join(pieces))


# --------------------------------------------------------------------------- config


def _config_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "axid.yaml"
    p.write_text(text)
    return p


FULL = """
issuer: https://issuer.example.org
host: 0.0.0.0
port: 9443
http: httptools
svid:
  cert: certs/issuer.pem
  key: certs/issuer.key
  bundle: /etc/axid/bundle.pem
keys_dir: keys
database_url: postgresql://db/axid
registrations: registrations.yaml
admins: ["spiffe://example.org/admin/*"]
audit:
  log: issuer-eu
  key: keys/log.pem
  database_url: sqlite:///audit.db
tokens:
  default_ttl: 60
  max_ttl: 200
  publish_lead: 400
"""


def test_config_from_file(tmp_path: Path) -> None:
    cfg = IssuerConfig.from_file(_config_file(tmp_path, FULL), environ={})
    assert cfg.iss == "https://issuer.example.org"
    assert (cfg.host, cfg.port, cfg.http) == ("0.0.0.0", 9443, "httptools")
    assert cfg.cert == tmp_path / "certs/issuer.pem"  # relative to the file
    assert cfg.bundle == Path("/etc/axid/bundle.pem")
    assert cfg.keys_dir == tmp_path / "keys"
    assert cfg.registrations == tmp_path / "registrations.yaml"
    assert [str(a) for a in cfg.admins] == ["spiffe://example.org/admin/*"]
    assert (cfg.log_name, cfg.log_key) == ("issuer-eu", tmp_path / "keys/log.pem")
    assert cfg.database_url == "postgresql://db/axid"
    assert cfg.audit_url == "sqlite:///audit.db"
    assert (cfg.default_ttl, cfg.max_ttl, cfg.publish_lead) == (60, 200, 400)
    env = IssuerConfig.from_file(
        _config_file(tmp_path, FULL), environ={"AXID_DATABASE_URL": "sqlite:///env.db"}
    )
    assert env.database_url == "sqlite:///env.db"


def test_config_defaults(tmp_path: Path) -> None:
    text = "registrations: r.yaml\nsvid: {workload_api: unix:///run/spire.sock}\n"
    cfg = IssuerConfig.from_file(_config_file(tmp_path, text), environ={})
    assert cfg.iss == "https://127.0.0.1:8443"
    assert cfg.database_url == "sqlite:///.axid/axid.db" and cfg.audit_url == cfg.database_url
    assert cfg.keys_dir == Path(".axid/keys") and cfg.log_key == Path(".axid/keys/log.pem")
    assert cfg.log_name == "issuer" and cfg.admins == ()
    assert (cfg.default_ttl, cfg.max_ttl, cfg.publish_lead) == (120, 300, 330.0)
    assert cfg.workload_api == "unix:///run/spire.sock"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("registrations: r\nsvid: {workload_api: x}\nbogus: 1\n", "bogus"),
        ("registrations: r\nsvid: {workload_api: x, nope: 1}\n", "svid.nope"),
        ("registrations: r\nsvid: {workload_api: x}\naudit: {bad: 1}\n", "audit.bad"),
        ("registrations: r\nsvid: {workload_api: x}\ntokens: {ttl: 1}\n", "tokens.ttl"),
        ("svid: {workload_api: x}\n", "registrations"),
        ("registrations: r\n", "svid"),
        ("registrations: r\nsvid: {cert: a}\n", "svid"),
        ("registrations: r\nsvid: {cert: a, key: b, bundle: c, workload_api: x}\n", "svid"),
        ("registrations: r\nsvid: {workload_api: x}\nissuer: http://a\n", "issuer"),
        ("registrations: r\nsvid: {workload_api: x}\nissuer: https://a/?q=1\n", "issuer"),
        ("registrations: r\nsvid: {workload_api: x}\nport: 70000\n", "port"),
        ("registrations: r\nsvid: {workload_api: x}\nport: '80'\n", "port"),
        ("registrations: r\nsvid: {workload_api: x}\nport: 0\n", "issuer"),
        ("registrations: r\nsvid: {workload_api: x}\nhttp: h2\n", "http"),
        ("registrations: r\nsvid: {workload_api: x}\nadmins: [spiffe://A/x]\n", "admins[0]"),
        ("registrations: r\nsvid: {workload_api: x}\nadmins: x\n", "admins"),
        ("registrations: r\nsvid: {workload_api: x}\ntokens: {max_ttl: 301}\n", "tokens.max_ttl"),
        (
            "registrations: r\nsvid: {workload_api: x}\ntokens: {default_ttl: 200, max_ttl: 100}\n",
            "tokens.default_ttl",
        ),
        (
            "registrations: r\nsvid: {workload_api: x}\ntokens: {publish_lead: -1}\n",
            "tokens.publish_lead",
        ),
        ("registrations: r\nsvid: {workload_api: x}\naudit: {log: Bad}\n", "audit.log"),
        ("registrations: r\nsvid: {workload_api: x}\nhost: 'a b'\n", "host"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        IssuerConfig.from_file(_config_file(tmp_path, text), environ={})
    assert info.value.key == key, str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        IssuerConfig.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="duplicate"):
        IssuerConfig.from_file(_config_file(tmp_path, "port: 1\nport: 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        IssuerConfig.from_file(_config_file(tmp_path, "- a\n"))


# --------------------------------------------------------------------------- request bodies

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["planner", "run-1", "payments", "payments:read", "a b", "eyJ.x.y"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
_bodies = st.dictionaries(
    st.sampled_from(
        ["agent", "run", "audience", "scope", "parent_token", "ttl_seconds", "tenant", "x"]
    ),
    _json_values,
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(body=_bodies)
def test_mint_body_validation_is_total(body: dict[str, Any]) -> None:
    try:
        req = validate_body(MintRequest, parse_json_body(json.dumps(body).encode()))
    except Refusal as exc:
        assert (exc.status, exc.reason) == (400, "bad_request")
        assert "\n" not in exc.detail
    else:
        assert set(body) <= set(MintRequest.model_fields)
        assert req.scope_set and req.audiences


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_json_body_parsing_is_total(raw: bytes) -> None:
    try:
        obj = parse_json_body(raw)
    except Refusal as exc:
        assert exc.reason == "bad_request" and exc.status in (400, 413)
    else:
        assert isinstance(obj, dict)


_BASE = "registrations: r\nsvid: {workload_api: x}\n"


def test_approvals_services_bind_filers_to_services(tmp_path: Path) -> None:
    text = _BASE + (
        "approvals:\n  services:\n    payments: ['spiffe://example.org/svc/payments']\n"
        "    ledger: ['spiffe://example.org/svc/ledger', 'spiffe://example.org/svc/l2']\n"
    )
    settings = IssuerConfig.from_file(_config_file(tmp_path, text), environ={}).approvals
    assert settings.may_file("spiffe://example.org/svc/payments", "payments")
    assert not settings.may_file("spiffe://example.org/svc/payments", "ledger")
    assert not settings.may_file("spiffe://example.org/svc/payments", "billing")
    assert not settings.may_file("spiffe://example.org/agent/worker")
    assert settings.may_file("spiffe://example.org/svc/l2", "ledger")
    assert settings.sweep_interval == 5.0
    default = IssuerConfig.from_file(_config_file(tmp_path, _BASE), environ={}).approvals
    assert default.services == {} and not default.may_file("spiffe://example.org/svc/payments")


@pytest.mark.parametrize(
    ("services", "match"),
    [
        ("['spiffe://example.org/svc/*']", "is a mapping .* list form is no longer accepted"),
        ("{payments: []}", r"approvals\.services\.payments must list at least one"),
        ("{payments: 'spiffe://example.org/svc/payments'}", r"approvals\.services\.payments"),
        ("{payments: [x]}", r"approvals\.services\.payments must be a list of SPIFFE"),
        ("{'-p': ['spiffe://example.org/svc/p']}", "is not a service name"),
        ("{1: ['spiffe://example.org/svc/p']}", "is not a service name"),
        ("7", "approvals.services must be a mapping"),
    ],
)
def test_approvals_services_strict(tmp_path: Path, services: str, match: str) -> None:
    text = _BASE + f"approvals: {{services: {services}}}\n"
    with pytest.raises(ConfigError, match=match) as info:
        IssuerConfig.from_file(_config_file(tmp_path, text), environ={})
    assert info.value.key == "approvals"


def test_approval_settings_refuse_the_old_shape_in_code() -> None:
    from axid.issuer.approval_settings import ApprovalSettings
    from mtls.spiffeid import SpiffeIdPattern

    with pytest.raises(TypeError):
        old = (SpiffeIdPattern.parse("spiffe://example.org/svc/*"),)
        ApprovalSettings(services=old)  # type: ignore[arg-type]
