"""Verifier configuration: a YAML file, a mapping, or dataclasses built in code.

Every key but ``service``, ``issuer``, ``tenants``, ``identity``, ``jwks``,
``revocations`` and ``log`` is optional; unknown keys are refused with the key
named; relative paths in a file are resolved against the file's directory::

    service: payments                  # this service: log "service" field, default audience
    issuer: https://issuer.example.org # the exact `iss` of accepted tokens
    audience: payments                 # default: service
    tenants: [acme]                    # tenants served here; ["*"] for any
    header: X-Waxell-AXID              # the token header
    leeway: 5                          # seconds of clock skew on nbf/exp/iat, at most 30
    identity:                          # trust bundles for peer SVIDs: PEM file(s) ...
      bundle: certs/bundle.pem         #   (one file or a list)
      cert: certs/payments.pem         # this service's own SVID: needed only to call the
      key: certs/payments.key          #   issuer over mTLS (jwks.url / revocations.url)
      # workload_api: unix:///run/spire/agent.sock   # ... or all of it from SPIFFE
    issuer_id: spiffe://example.org/axid/issuer  # the issuer's SPIFFE ID (or pattern);
                                       #   default spiffe://<own trust domain>/axid/issuer
    trusted_proxies:                   # whose X-Forwarded-Client-Cert is believed:
      - spiffe://example.org/envoy/*   #   mTLS peers by SPIFFE ID pattern,
      - 127.0.0.1/32                   #   plain-TCP peers (local sidecars) by IP/CIDR
    jwks:
      url: https://127.0.0.1:8443/.well-known/jwks.json   # over mTLS; or file: jwks.json
      cache_ttl: 300                   # refetch after; < the issuer's publish lead (330)
      refetch_min_interval: 30         # at most one unknown-kid refetch per this many s
      max_stale: 3600                  # keys older than this are not used (503)
      timeout: 5
    revocations:
      url: https://127.0.0.1:8443/v1/revocations   # poll the issuer ...
      # database_url: sqlite:///.axid/axid.db      # ... or read its table directly
      interval: 5
      max_stale: 60                    # older than this: deny 503 revocation_unavailable
      timeout: 5
    log:
      url: sqlite:///.axid/axid.db     # or postgresql://..., or a SQLite file path
      name: payments                   # default: service
      origin: example.org/axid/payments  # checkpoints' origin (default axid/<name>)
      key: .axid/keys/payments-log.pem # the log's Ed25519 key (created 0600 if missing)
      create_key: true
      max_batch: 512
      max_delay: 0.002
      lock_timeout: 5
      head: .axid/keys/payments.head   # the authenticated head (default: beside the key)
      head_required: false             # true: a missing head file is an integrity failure
      witnesses:                       # C2SP tlog-witnesses that cosign the checkpoints:
        - url: https://witness.example.org   # submission prefix (POSTs to url/add-checkpoint)
          vkey: witness.example.org/w1+3afd8f53+BLMl8KDI291nm4KjUKUStZ2A24EOmXWZYtAzSwP1wAnc
      quorum: 1                        # distinct witnesses a checkpoint needs (default 1)
      witness_mode: async              # sync: a batch waits for the quorum (else 503)
      witness_timeout: 5               # seconds: each submission; sync: each batch's wait
    replay:                            # single_use jti store; default: the log's database
      database_url: sqlite:///.axid/axid.db   # (also each approval id's one use)
    approvals:                         # needed by rules with `approval: required` (and
                                       #   `approvers: [SPIFFE ID patterns]`), see verifier.rules
      url: https://127.0.0.1:8443/v1/approvals  # the issuer's, over mTLS (own SVID)
      timeout: 5                       # one filing; then 503 approval_unavailable
      max_body: 1048576                # bytes of an approval route's body (hashed)
    rules:                             # first match wins; see verifier.rules
      - {methods: [GET], path: "/payments/*", scope: "payments:read"}
      - {methods: [POST], path: "/payments/*/refund", scope: "payments:refund",
         single_use: true}
      - {path: /healthz, governed: false}

Code-only settings: ``checks`` (custom async checks), ``clock`` (Unix seconds, for
token times), ``source`` (an :class:`mtls.sources.X509Source` to use instead of
``identity``), a :class:`~axid.keys.KeySet` or a JWKS source object as ``jwks``,
and a revocation source object as ``revocations``.

In code, each class takes its values as a user has them (lists for tuples, strings
for paths, a plain file path for a SQLite URL, a ``KeySet`` for ``jwks``) and its
constructor parses them into their final types (:mod:`verifier._values`), setting
each field once; ``__post_init__`` only checks what spans fields. A file or mapping
is parsed section by section into these classes (:meth:`VerifierConfig.from_dict`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from axid import _yaml
from axid.audit.store import StoreError, validate_log_name
from axid.keys import KeySet
from axid.tokens import MAX_LEEWAY
from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern
from verifier._values import init_frozen, integer, known_keys, mapping, number, text
from verifier.errors import ConfigError
from verifier.proxies import TrustedProxies
from verifier.rules import SLUG_RE, RouteRule, RuleSet
from verifier.sections import (
    ApprovalsConfig,
    IdentityConfig,
    JwksConfig,
    LogConfig,
    ReplayConfig,
    RevocationConfig,
    approvals_from,
    identity_from,
    jwks_from,
    log_from,
    replay_from,
    revocations_from,
)

__all__ = [
    "APPROVAL_HEADER",
    "DEFAULT_HEADER",
    "ApprovalsConfig",
    "ConfigError",
    "IdentityConfig",
    "JwksConfig",
    "LogConfig",
    "ReplayConfig",
    "RevocationConfig",
    "TrustedProxies",
    "VerifierConfig",
    "load_yaml",
]

DEFAULT_HEADER: Final = "X-Waxell-AXID"
APPROVAL_HEADER: Final = "X-AXID-Approval"
_HEADER_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")
_DEFAULT_REPLAY: Final = ReplayConfig()
_TOP_KEYS: Final = (
    "service",
    "issuer",
    "audience",
    "tenants",
    "header",
    "leeway",
    "identity",
    "issuer_id",
    "trusted_proxies",
    "jwks",
    "revocations",
    "log",
    "replay",
    "approvals",
    "rules",
    "token_cache_size",
    "check_timeout",
)
# Taken as they are; the constructor checks them.
_PLAIN_KEYS: Final = (
    "service",
    "issuer",
    "tenants",
    "audience",
    "header",
    "leeway",
    "issuer_id",
    "token_cache_size",
    "check_timeout",
)


def load_yaml(text: str | bytes, *, what: str = "verifier config") -> Any:
    """Parse one strict YAML document (:mod:`axid._yaml`); failures are :class:`ConfigError`."""
    try:
        return _yaml.load_yaml(text, what=what)
    except _yaml.YamlError as exc:
        raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True, init=False)
class VerifierConfig:
    """Everything :class:`verifier.AxidVerifier` needs; validated on construction.

    ``audience`` None is the service; a ``log`` without a name is named after the
    service; a :class:`~axid.keys.KeySet` as ``jwks`` is ``JwksConfig(keys=...)``.
    """

    service: str
    issuer: str
    tenants: tuple[str, ...]
    jwks: JwksConfig | Any  # or a JWKS source object (code only)
    revocations: RevocationConfig | Any  # or a revocation source object (code only)
    log: LogConfig
    identity: IdentityConfig | None
    audience: str
    header: str
    leeway: int
    issuer_id: SpiffeId | SpiffeIdPattern | None
    trusted_proxies: TrustedProxies
    replay: ReplayConfig
    approvals: ApprovalsConfig | None
    rules: tuple[RouteRule, ...]
    token_cache_size: int
    check_timeout: float
    # Code only:
    checks: tuple[Any, ...]
    clock: Callable[[], float] = field(compare=False)
    source: Any = field(compare=False)
    # Where relative paths of a file were resolved from (messages only).
    source_file: Path | None = field(compare=False)

    def __init__(
        self,
        service: str,
        issuer: str,
        tenants: Sequence[str],
        jwks: JwksConfig | KeySet | Any,
        revocations: RevocationConfig | Any,
        log: LogConfig,
        identity: IdentityConfig | None = None,
        audience: str | None = None,
        header: str = DEFAULT_HEADER,
        leeway: int = 5,
        issuer_id: SpiffeId | SpiffeIdPattern | str | None = None,
        trusted_proxies: TrustedProxies | Sequence[str] = (),
        replay: ReplayConfig = _DEFAULT_REPLAY,
        approvals: ApprovalsConfig | None = None,
        rules: Sequence[RouteRule] = (),
        token_cache_size: int = 4096,
        check_timeout: float = 5.0,
        checks: Sequence[Any] = (),
        clock: Callable[[], float] = time.time,
        source: Any = None,
        source_file: Path | None = None,
    ) -> None:
        service = _service(service)
        # Each value parsed alone, in this order; then __post_init__ checks what spans fields.
        init_frozen(
            self,
            service=service,
            issuer=text(issuer, "issuer"),
            audience=_audience(audience, service),
            tenants=_tenants(tenants),
            header=_header(header),
            leeway=integer(leeway, "leeway", lo=0, hi=MAX_LEEWAY),
            issuer_id=_issuer_id(issuer_id),
            trusted_proxies=(
                trusted_proxies
                if isinstance(trusted_proxies, TrustedProxies)
                else TrustedProxies(trusted_proxies)
            ),
            jwks=_jwks(jwks),
            revocations=_revocations(revocations),
            log=_named_log(log, service),
            replay=_typed(replay, ReplayConfig, "replay", "a ReplayConfig"),
            approvals=_typed(approvals, ApprovalsConfig | None, "approvals", "an ApprovalsConfig"),
            identity=_typed(identity, IdentityConfig | None, "identity", "an IdentityConfig"),
            source=_source(source),
            rules=_rules(rules),
            token_cache_size=integer(token_cache_size, "token_cache_size", lo=0, hi=1_000_000),
            check_timeout=number(check_timeout, "check_timeout", lo=0, hi=300, lo_open=True),
            checks=_checks(checks),
            clock=_clock(clock),
            source_file=source_file,
        )

    def __post_init__(self) -> None:
        if self.identity is None and self.source is None:
            raise ConfigError("is required (bundle files or workload_api)", key="identity")
        needs_svid = (
            (isinstance(self.jwks, JwksConfig) and self.jwks.url is not None)
            or (isinstance(self.revocations, RevocationConfig) and self.revocations.url is not None)
            or self.approvals is not None
        )
        if needs_svid and not self._has_own_svid():
            raise ConfigError(
                "calling the issuer over mTLS needs this service's SVID: "
                "identity.cert and identity.key, identity.workload_api, or a source",
                key="identity",
            )
        for index, rule in enumerate(self.rules):
            if rule.approval_required and self.approvals is None:
                raise ConfigError(
                    "a rule with 'approval: required' needs the approvals section (approvals.url)",
                    key=f"rules[{index}].approval",
                )
            if rule.tenants is None or self.any_tenant:
                continue
            extra = sorted(set(rule.tenants) - set(self.tenants))
            if extra:
                raise ConfigError(
                    f"tenant(s) {extra} are not in the top-level tenants",
                    key=f"rules[{index}].tenants",
                )

    def _has_own_svid(self) -> bool:
        if self.source is not None:
            return callable(getattr(self.source, "svid", None))
        return self.identity is not None and self.identity.has_svid

    @property
    def rule_set(self) -> RuleSet:
        return RuleSet(self.rules)

    @property
    def any_tenant(self) -> bool:
        return self.tenants == ("*",)

    @property
    def log_name(self) -> str:
        assert self.log.name is not None  # named after the service if not given
        return self.log.name

    @property
    def replay_url(self) -> str:
        return self.replay.database_url or self.log.url

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(
        cls, doc: object, *, base_dir: str | os.PathLike[str] = ".", **code: Any
    ) -> VerifierConfig:
        """Build from a parsed document (module docstring). Relative paths resolve
        against ``base_dir``; keyword arguments set code-only fields (``checks``,
        ``clock``, ``source``)."""
        doc = mapping(doc, "") if doc is not None else {}
        known_keys(doc, _TOP_KEYS, "")
        for required in ("service", "issuer", "tenants", "jwks", "revocations", "log"):
            if required not in doc:
                raise ConfigError("is required", key=required)
        base = Path(base_dir)
        kwargs: dict[str, Any] = {key: doc[key] for key in _PLAIN_KEYS if key in doc}
        if "trusted_proxies" in doc:
            kwargs["trusted_proxies"] = _proxies_from(doc["trusted_proxies"])
        if "identity" in doc:
            kwargs["identity"] = identity_from(doc["identity"], base)
        kwargs["jwks"] = jwks_from(doc["jwks"], base)
        kwargs["revocations"] = revocations_from(doc["revocations"], base)
        kwargs["log"] = log_from(doc["log"], base)
        if "replay" in doc:
            kwargs["replay"] = replay_from(doc["replay"], base)
        if "approvals" in doc:
            kwargs["approvals"] = approvals_from(doc["approvals"])
        if "rules" in doc:
            kwargs["rules"] = _rules_from(doc["rules"])
        kwargs.update(code)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **code: Any) -> VerifierConfig:
        """Load a YAML file strictly (:class:`ConfigError` on any problem)."""
        p = Path(path)
        try:
            doc = _yaml.read_yaml_file(p, what=f"config file {p}")
        except _yaml.YamlError as exc:
            raise ConfigError(str(exc)) from None
        if doc is None:
            raise ConfigError(f"config file {p} is empty")
        config = cls.from_dict(doc, base_dir=p.parent, **code)
        return replace(config, source_file=p)


# --------------------------------------------------------------------------- field parsers


def _service(value: object) -> str:
    if not isinstance(value, str) or _SERVICE_RE.fullmatch(value) is None:
        raise ConfigError("must be a service name [A-Za-z0-9][A-Za-z0-9._:/-]*", key="service")
    return value


def _audience(value: object, service: str) -> str:
    if value is None:
        return service
    if not isinstance(value, str) or not _SERVICE_RE.fullmatch(value):
        raise ConfigError("must be a service name", key="audience")
    return value


def _tenants(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ConfigError("must be a non-empty list of tenant slugs, or ['*']", key="tenants")
    items = tuple(value)
    if items == ("*",):
        return items
    for item in items:
        if not isinstance(item, str) or SLUG_RE.fullmatch(item) is None:
            raise ConfigError(
                "items must be tenant slugs [a-z0-9][a-z0-9-]{0,62} (or the list ['*'])",
                key="tenants",
            )
    if len(set(items)) != len(items):
        raise ConfigError("repeats a tenant", key="tenants")
    return items


def _header(value: object) -> str:
    if not isinstance(value, str) or _HEADER_RE.fullmatch(value) is None:
        raise ConfigError("must be an HTTP header name", key="header")
    if value.lower() in ("x-forwarded-client-cert", "authorization", "cookie"):
        raise ConfigError("must not be a header with another meaning", key="header")
    return value


def _issuer_id(value: object) -> SpiffeId | SpiffeIdPattern | None:
    if value is None or isinstance(value, SpiffeId | SpiffeIdPattern):
        return value
    if not isinstance(value, str):
        raise ConfigError("must be a SPIFFE ID or pattern", key="issuer_id")
    try:
        return SpiffeIdPattern.parse(value)
    except SpiffeIdError as exc:
        raise ConfigError(str(exc), key="issuer_id") from None


def _jwks(value: object) -> Any:
    if isinstance(value, KeySet):
        return JwksConfig(keys=value)
    is_source = callable(getattr(value, "key_set", None)) and callable(
        getattr(value, "refresh_for_unknown_kid", None)
    )
    if not isinstance(value, JwksConfig) and not is_source:
        raise ConfigError("must be a JwksConfig, a KeySet or a JWKS source", key="jwks")
    return value


def _revocations(value: object) -> Any:
    is_source = callable(getattr(value, "current", None)) and callable(
        getattr(value, "start", None)
    )
    if not isinstance(value, RevocationConfig) and not is_source:
        raise ConfigError("must be a RevocationConfig or a revocation source", key="revocations")
    return value


def _named_log(log: object, service: str) -> LogConfig:
    """``log``, named after the service if it has no name."""
    if not isinstance(log, LogConfig):
        raise ConfigError("must be a LogConfig", key="log")
    if log.name is not None:
        return log
    try:
        validate_log_name(service)
    except StoreError:
        raise ConfigError(
            "is required: the service name is not a valid log name", key="log.name"
        ) from None
    return replace(log, name=service)


def _typed(value: Any, kind: Any, key: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"must be {what}", key=key)
    return value


def _source(value: object) -> Any:
    if value is not None and not callable(getattr(value, "bundles", None)):
        raise ConfigError("must be an X509Source (with bundles())", key="source")
    return value


def _rules(value: Iterable[object]) -> tuple[RouteRule, ...]:
    rules = tuple(value)
    for index, rule in enumerate(rules):
        if not isinstance(rule, RouteRule):
            raise ConfigError("must be a RouteRule", key=f"rules[{index}]")
    return rules  # type: ignore[return-value]  # checked above


def _checks(value: Iterable[object]) -> tuple[Any, ...]:
    checks = tuple(value)
    for index, check in enumerate(checks):
        if not callable(check):
            raise ConfigError("must be an async callable", key=f"checks[{index}]")
    return checks


def _clock(value: object) -> Callable[[], float]:
    if not callable(value):
        raise ConfigError("must be a callable returning Unix seconds", key="clock")
    return value  # type: ignore[return-value]


def _proxies_from(value: object) -> TrustedProxies:
    if not isinstance(value, list):
        raise ConfigError("must be a list", key="trusted_proxies")
    return TrustedProxies(value)


def _rules_from(value: object) -> tuple[RouteRule, ...]:
    if not isinstance(value, list):
        raise ConfigError("must be a list", key="rules")
    parsed = []
    for index, item in enumerate(value):
        try:
            parsed.append(RouteRule.from_dict(item))
        except ConfigError as exc:
            raise exc.under(f"rules[{index}]") from None
    return tuple(parsed)
