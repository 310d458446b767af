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
      database_url: sqlite:///.axid/axid.db
    rules:                             # first match wins; see verifier.rules
      - {methods: [GET], path: "/payments/*", scope: "payments:read"}
      - {methods: [POST], path: "/payments/*/refund", scope: "payments:refund",
         single_use: true}
      - {path: /healthz, governed: false}

Code-only settings: ``checks`` (custom async checks), ``clock`` (Unix seconds, for
token times), ``source`` (an :class:`mtls.sources.X509Source` to use instead of
``identity``), a :class:`~axid.keys.KeySet` or a JWKS source object as ``jwks``,
and a revocation source object as ``revocations``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from axid import _yaml
from axid.audit.store import StoreError, validate_log_name
from axid.audit.witnessing import (
    DEFAULT_WITNESS_TIMEOUT,
    WitnessConfig,
    WitnessConfigError,
    witness_settings,
)
from axid.keys import DEFAULT_PUBLISH_LEAD, KeySet
from axid.tokens import MAX_LEEWAY
from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern
from verifier.errors import ConfigError
from verifier.rules import SLUG_RE, RouteRule, RuleSet

__all__ = [
    "DEFAULT_HEADER",
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
_HEADER_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")

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
    "rules",
    "token_cache_size",
    "check_timeout",
)
_IDENTITY_KEYS: Final = ("bundle", "cert", "key", "workload_api")
_JWKS_KEYS: Final = ("file", "url", "cache_ttl", "refetch_min_interval", "max_stale", "timeout")
_REVOCATION_KEYS: Final = ("url", "database_url", "interval", "max_stale", "timeout")
_LOG_KEYS: Final = (
    "url",
    "name",
    "key",
    "create_key",
    "max_batch",
    "max_delay",
    "lock_timeout",
    "head",
    "head_required",
    "witnesses",
    "quorum",
    "witness_mode",
    "witness_timeout",
)
_REPLAY_KEYS: Final = ("database_url", "lock_timeout")


# --------------------------------------------------------------------------- strict YAML


def load_yaml(text: str | bytes, *, what: str = "verifier config") -> Any:
    """Parse one strict YAML document (:mod:`axid._yaml`); failures are :class:`ConfigError`."""
    try:
        return _yaml.load_yaml(text, what=what)
    except _yaml.YamlError as exc:
        raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------- value checks


def _number(value: object, key: str, *, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError("must be a number", key=key)
    if value < lo or value > hi or (lo_open and value == lo):
        bound = "(" if lo_open else "["
        raise ConfigError(f"must be in {bound}{lo:g}, {hi:g}]", key=key)
    return float(value)


def _int(value: object, key: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"must be an integer in [{lo}, {hi}]", key=key)
    return value


def _text(value: object, key: str, *, limit: int = 2048) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > limit:
        raise ConfigError(f"must be a non-empty printable string of at most {limit}", key=key)
    return value


def _https_url(value: object, key: str) -> str:
    url = _text(value, key)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError("must be an https:// URL (the issuer is served over mTLS)", key=key)
    if parts.fragment or parts.username or parts.password or " " in url:
        raise ConfigError("must not have a fragment, userinfo or spaces", key=key)
    return url


def _db_url(value: object, key: str) -> str:
    """A database URL; a plain file path (no ``://``) means that SQLite file."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    url = _text(value, key)
    if "://" not in url:
        if "\x00" in url or url == ":memory:":
            raise ConfigError("must be a SQLite file path or a database URL", key=key)
        return f"sqlite:///{url}"
    if not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")):
        raise ConfigError("must be sqlite:///FILE, a file path, or postgresql://...", key=key)
    return url


def _db_value(value: object, base: Path) -> object:
    """A file-path database value of a config file, resolved against its directory."""
    if isinstance(value, str) and value and "://" not in value and value != ":memory:":
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)
    return value


def _bool(value: object, key: str) -> bool:
    if type(value) is not bool:
        raise ConfigError("must be true or false", key=key)
    return value


def _known(doc: Mapping[Any, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (allowed: {', '.join(allowed)})", key=f"{prefix}{str(key)[:60]}"
            )


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping", key=key)
    return value


# --------------------------------------------------------------------------- parts


class TrustedProxies:
    """Peers whose ``X-Forwarded-Client-Cert`` header is believed.

    ``spiffe://`` entries are SPIFFE ID patterns matched against a verified mTLS
    peer; other entries are IP addresses or CIDR networks (host bits zero) matched
    against the socket peer address of a plain-TCP connection (a sidecar on
    loopback), as :mod:`mtls.uvicorn`'s protocol classes record it; a server that
    does not record it gets no IP trusted.
    """

    __slots__ = ("_networks", "_patterns", "items")

    def __init__(self, items: Sequence[str] = ()) -> None:
        if isinstance(items, str):
            raise ConfigError("must be a list", key="trusted_proxies")
        patterns: list[SpiffeIdPattern] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for index, item in enumerate(items):
            key = f"trusted_proxies[{index}]"
            if not isinstance(item, str) or not item:
                raise ConfigError("must be a SPIFFE ID pattern or an IP/CIDR", key=key)
            if item.startswith("spiffe://"):
                try:
                    patterns.append(SpiffeIdPattern.parse(item))
                except SpiffeIdError as exc:
                    raise ConfigError(str(exc), key=key) from None
            else:
                try:
                    networks.append(ipaddress.ip_network(item, strict=True))
                except ValueError:
                    raise ConfigError(
                        "is neither a spiffe:// pattern nor an IP address/CIDR with zero host bits",
                        key=key,
                    ) from None
        self.items: tuple[str, ...] = tuple(items)
        self._patterns = tuple(patterns)
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and other.items == self.items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.items)!r})"

    @property
    def has_networks(self) -> bool:
        """Whether any entry is an IP address or network (not a SPIFFE ID pattern)."""
        return bool(self._networks)

    def trusts_svid(self, spiffe_id: SpiffeId) -> bool:
        return any(p.matches(spiffe_id) for p in self._patterns)

    def trusts_ip(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
        return any(ip in n or (mapped is not None and mapped in n) for n in self._networks)


@dataclass(frozen=True)
class IdentityConfig:
    """Where peer trust bundles (and this service's own SVID) come from."""

    bundle: tuple[Path, ...] = ()
    cert: Path | None = None
    key: Path | None = None
    workload_api: str | None = None

    def __post_init__(self) -> None:
        bundle = self.bundle
        if isinstance(bundle, str | os.PathLike):
            bundle = (bundle,)
        object.__setattr__(self, "bundle", tuple(Path(b) for b in bundle))
        for name in ("cert", "key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        files = bool(self.bundle) or self.cert is not None or self.key is not None
        if self.workload_api is not None:
            if files:
                raise ConfigError(
                    "give bundle/cert/key files or workload_api, not both", key="identity"
                )
            _text(self.workload_api, "identity.workload_api")
        elif not self.bundle:
            raise ConfigError("needs a bundle file (or workload_api)", key="identity")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together", key="identity")

    @property
    def has_svid(self) -> bool:
        return self.workload_api is not None or self.cert is not None


@dataclass(frozen=True)
class JwksConfig:
    """The issuer's verification keys: a JWKS ``file``, the issuer's ``url`` (mTLS),
    or (code only) a fixed :class:`~axid.keys.KeySet` as ``keys``."""

    file: Path | None = None
    url: str | None = None
    keys: KeySet | None = None
    cache_ttl: float = 300.0
    refetch_min_interval: float = 30.0
    max_stale: float = 3600.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        given = [n for n in ("file", "url", "keys") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of file, url (or keys in code)", key="jwks")
        if self.file is not None:
            object.__setattr__(self, "file", Path(self.file))
        if self.url is not None:
            _https_url(self.url, "jwks.url")
        if self.keys is not None and not isinstance(self.keys, KeySet):
            raise ConfigError("must be an axid.keys.KeySet", key="jwks.keys")
        # The cache must expire before a rotated key starts signing (the publish lead).
        _number(self.cache_ttl, "jwks.cache_ttl", lo=0, hi=DEFAULT_PUBLISH_LEAD, lo_open=True)
        if self.cache_ttl >= DEFAULT_PUBLISH_LEAD:
            raise ConfigError(
                f"must be below the issuer's publish lead ({DEFAULT_PUBLISH_LEAD:g} s)",
                key="jwks.cache_ttl",
            )
        _number(self.refetch_min_interval, "jwks.refetch_min_interval", lo=0, hi=3600)
        _number(self.max_stale, "jwks.max_stale", lo=0, hi=7 * 86400, lo_open=True)
        if self.max_stale < self.cache_ttl:
            raise ConfigError("must be at least cache_ttl", key="jwks.max_stale")
        _number(self.timeout, "jwks.timeout", lo=0, hi=120, lo_open=True)


@dataclass(frozen=True)
class RevocationConfig:
    """Where revocations come from: the issuer's ``/v1/revocations`` (``url``, polled
    over mTLS) or its table in a shared database (``database_url``)."""

    url: str | None = None
    database_url: str | None = None
    interval: float = 5.0
    max_stale: float = 60.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if (self.url is None) == (self.database_url is None):
            raise ConfigError("give exactly one of url, database_url", key="revocations")
        if self.url is not None:
            _https_url(self.url, "revocations.url")
        if self.database_url is not None:
            db = _db_url(self.database_url, "revocations.database_url")
            object.__setattr__(self, "database_url", db)
        _number(self.interval, "revocations.interval", lo=0, hi=3600, lo_open=True)
        _number(self.max_stale, "revocations.max_stale", lo=0, hi=86400, lo_open=True)
        if self.max_stale <= self.interval:
            raise ConfigError("must be longer than interval", key="revocations.max_stale")
        _number(self.timeout, "revocations.timeout", lo=0, hi=120, lo_open=True)


@dataclass(frozen=True)
class LogConfig:
    """The decision log (see :class:`axid.audit.DecisionLog`)."""

    url: str
    key: Path
    name: str | None = None
    create_key: bool = True
    max_batch: int = 512
    max_delay: float = 0.002
    lock_timeout: float = 5.0
    head: Path | None = None  # default: <key's directory>/<log>.head
    head_required: bool = False
    # Witnesses (axid.audit.witnessing): {url, vkey} mappings or WitnessConfig, made
    # WitnessConfig; quorum None is 1 with witnesses, else 0.
    witnesses: tuple[WitnessConfig, ...] | Sequence[Any] = ()
    quorum: int | None = None
    witness_mode: str = "async"
    witness_timeout: float = DEFAULT_WITNESS_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _db_url(self.url, "log.url"))
        try:
            ws = witness_settings(
                self.witnesses, self.quorum, self.witness_mode, self.witness_timeout
            )
        except WitnessConfigError as exc:
            raise ConfigError(exc.message, key=f"log.{exc.key}") from None
        object.__setattr__(self, "witnesses", ws.witnesses)
        object.__setattr__(self, "quorum", ws.quorum)
        object.__setattr__(self, "witness_timeout", ws.timeout)
        if self.head is not None:
            if not isinstance(self.head, str | os.PathLike) or not str(self.head):
                raise ConfigError("must be the path of the log's head file", key="log.head")
            object.__setattr__(self, "head", Path(self.head))
        _bool(self.head_required, "log.head_required")
        if not isinstance(self.key, str | os.PathLike) or not str(self.key):
            raise ConfigError("must be the path of the log's key file", key="log.key")
        object.__setattr__(self, "key", Path(self.key))
        if self.name is not None:
            try:
                validate_log_name(self.name)
            except StoreError as exc:
                raise ConfigError(str(exc), key="log.name") from None
        _bool(self.create_key, "log.create_key")
        _int(self.max_batch, "log.max_batch", lo=1, hi=100_000)
        _number(self.max_delay, "log.max_delay", lo=0, hi=60)
        _number(self.lock_timeout, "log.lock_timeout", lo=0, hi=3600, lo_open=True)


@dataclass(frozen=True)
class ReplayConfig:
    """The single-use jti store; ``database_url`` defaults to the log's database."""

    database_url: str | None = None
    lock_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.database_url is not None:
            db = _db_url(self.database_url, "replay.database_url")
            object.__setattr__(self, "database_url", db)
        _number(self.lock_timeout, "replay.lock_timeout", lo=0, hi=3600, lo_open=True)


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


def _issuer_id(value: object) -> SpiffeId | SpiffeIdPattern | None:
    if value is None or isinstance(value, SpiffeId | SpiffeIdPattern):
        return value
    if not isinstance(value, str):
        raise ConfigError("must be a SPIFFE ID or pattern", key="issuer_id")
    try:
        return SpiffeIdPattern.parse(value)
    except SpiffeIdError as exc:
        raise ConfigError(str(exc), key="issuer_id") from None


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class VerifierConfig:
    """Everything :class:`verifier.AxidVerifier` needs; validated on construction."""

    service: str
    issuer: str
    tenants: tuple[str, ...] | Sequence[str]
    jwks: JwksConfig | Any
    revocations: RevocationConfig | Any
    log: LogConfig
    identity: IdentityConfig | None = None
    audience: str | None = None
    header: str = DEFAULT_HEADER
    leeway: int = 5
    issuer_id: SpiffeId | SpiffeIdPattern | str | None = None
    trusted_proxies: TrustedProxies | Sequence[str] = ()
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    rules: tuple[RouteRule, ...] | Sequence[RouteRule] = ()
    token_cache_size: int = 4096
    check_timeout: float = 5.0
    # Code only:
    checks: tuple[Any, ...] | Sequence[Any] = ()
    clock: Callable[[], float] = field(default=time.time, compare=False)
    source: Any = field(default=None, compare=False)
    # Where relative paths of a file were resolved from (messages only).
    source_file: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.service, str) or _SERVICE_RE.fullmatch(self.service) is None:
            raise ConfigError("must be a service name [A-Za-z0-9][A-Za-z0-9._:/-]*", key="service")
        _text(self.issuer, "issuer")
        if self.audience is None:
            object.__setattr__(self, "audience", self.service)
        elif not isinstance(self.audience, str) or not _SERVICE_RE.fullmatch(self.audience):
            raise ConfigError("must be a service name", key="audience")
        object.__setattr__(self, "tenants", _tenants(self.tenants))
        if not isinstance(self.header, str) or _HEADER_RE.fullmatch(self.header) is None:
            raise ConfigError("must be an HTTP header name", key="header")
        if self.header.lower() in ("x-forwarded-client-cert", "authorization", "cookie"):
            raise ConfigError("must not be a header with another meaning", key="header")
        _int(self.leeway, "leeway", lo=0, hi=MAX_LEEWAY)
        object.__setattr__(self, "issuer_id", _issuer_id(self.issuer_id))
        if not isinstance(self.trusted_proxies, TrustedProxies):
            object.__setattr__(self, "trusted_proxies", TrustedProxies(self.trusted_proxies))
        if isinstance(self.jwks, KeySet):
            object.__setattr__(self, "jwks", JwksConfig(keys=self.jwks))
        elif not isinstance(self.jwks, JwksConfig) and not _is_jwks_source(self.jwks):
            raise ConfigError("must be a JwksConfig, a KeySet or a JWKS source", key="jwks")
        if not isinstance(self.revocations, RevocationConfig) and not _is_revocation_source(
            self.revocations
        ):
            raise ConfigError(
                "must be a RevocationConfig or a revocation source", key="revocations"
            )
        if not isinstance(self.log, LogConfig):
            raise ConfigError("must be a LogConfig", key="log")
        if self.log.name is None:
            try:
                validate_log_name(self.service)
            except StoreError:
                raise ConfigError(
                    "is required: the service name is not a valid log name", key="log.name"
                ) from None
            object.__setattr__(self, "log", replace(self.log, name=self.service))
        if not isinstance(self.replay, ReplayConfig):
            raise ConfigError("must be a ReplayConfig", key="replay")
        if self.identity is None and self.source is None:
            raise ConfigError("is required (bundle files or workload_api)", key="identity")
        if self.identity is not None and not isinstance(self.identity, IdentityConfig):
            raise ConfigError("must be an IdentityConfig", key="identity")
        if self.source is not None and not callable(getattr(self.source, "bundles", None)):
            raise ConfigError("must be an X509Source (with bundles())", key="source")
        needs_svid = (isinstance(self.jwks, JwksConfig) and self.jwks.url is not None) or (
            isinstance(self.revocations, RevocationConfig) and self.revocations.url is not None
        )
        if needs_svid and not self._has_own_svid():
            raise ConfigError(
                "calling the issuer over mTLS needs this service's SVID: "
                "identity.cert and identity.key, identity.workload_api, or a source",
                key="identity",
            )
        rules = tuple(self.rules)
        for index, rule in enumerate(rules):
            if not isinstance(rule, RouteRule):
                raise ConfigError("must be a RouteRule", key=f"rules[{index}]")
            if rule.tenants is not None and self.tenants != ("*",):
                extra = sorted(set(rule.tenants) - set(self.tenants))
                if extra:
                    raise ConfigError(
                        f"tenant(s) {extra} are not in the top-level tenants",
                        key=f"rules[{index}].tenants",
                    )
        object.__setattr__(self, "rules", rules)
        _int(self.token_cache_size, "token_cache_size", lo=0, hi=1_000_000)
        _number(self.check_timeout, "check_timeout", lo=0, hi=300, lo_open=True)
        checks = tuple(self.checks)
        for index, check in enumerate(checks):
            if not callable(check):
                raise ConfigError("must be an async callable", key=f"checks[{index}]")
        object.__setattr__(self, "checks", checks)
        if not callable(self.clock):
            raise ConfigError("must be a callable returning Unix seconds", key="clock")

    def _has_own_svid(self) -> bool:
        if self.source is not None:
            return callable(getattr(self.source, "svid", None))
        return self.identity is not None and self.identity.has_svid

    @property
    def rule_set(self) -> RuleSet:
        return RuleSet(self.rules)  # type: ignore[arg-type]  # a tuple after __post_init__

    @property
    def any_tenant(self) -> bool:
        return self.tenants == ("*",)

    @property
    def log_name(self) -> str:
        assert self.log.name is not None  # set in __post_init__
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
        doc = _mapping(doc, "") if doc is not None else {}
        _known(doc, _TOP_KEYS, "")
        base = Path(base_dir)

        def path(value: object, key: str) -> Path:
            if not isinstance(value, str) or not value or "\x00" in value:
                raise ConfigError("must be a non-empty path", key=key)
            p = Path(value).expanduser()
            return p if p.is_absolute() else base / p

        for required in ("service", "issuer", "tenants", "jwks", "revocations", "log"):
            if required not in doc:
                raise ConfigError("is required", key=required)
        kwargs: dict[str, Any] = {
            "service": doc["service"],
            "issuer": doc["issuer"],
            "tenants": doc["tenants"],
        }
        for key in ("audience", "header", "leeway", "issuer_id", "token_cache_size"):
            if key in doc:
                kwargs[key] = doc[key]
        if "check_timeout" in doc:
            kwargs["check_timeout"] = doc["check_timeout"]
        if "trusted_proxies" in doc:
            proxies = doc["trusted_proxies"]
            if not isinstance(proxies, list):
                raise ConfigError("must be a list", key="trusted_proxies")
            kwargs["trusted_proxies"] = TrustedProxies(proxies)

        if "identity" in doc:
            ident = _mapping(doc["identity"], "identity")
            _known(ident, _IDENTITY_KEYS, "identity.")
            ikw: dict[str, Any] = {}
            if "bundle" in ident:
                bundle = ident["bundle"]
                items = [bundle] if isinstance(bundle, str) else bundle
                if not isinstance(items, list) or not items:
                    raise ConfigError("must be a path or a list of paths", key="identity.bundle")
                ikw["bundle"] = tuple(path(b, f"identity.bundle[{i}]") for i, b in enumerate(items))
            for name in ("cert", "key"):
                if name in ident:
                    ikw[name] = path(ident[name], f"identity.{name}")
            if "workload_api" in ident:
                ikw["workload_api"] = _text(ident["workload_api"], "identity.workload_api")
            kwargs["identity"] = IdentityConfig(**ikw)

        jwks = _mapping(doc["jwks"], "jwks")
        _known(jwks, _JWKS_KEYS, "jwks.")
        jkw = {k: v for k, v in jwks.items() if k != "file"}
        if "file" in jwks:
            jkw["file"] = path(jwks["file"], "jwks.file")
        kwargs["jwks"] = JwksConfig(**jkw)

        revs = dict(_mapping(doc["revocations"], "revocations"))
        _known(revs, _REVOCATION_KEYS, "revocations.")
        if "database_url" in revs:
            revs["database_url"] = _db_value(revs["database_url"], base)
        kwargs["revocations"] = RevocationConfig(**revs)

        log = _mapping(doc["log"], "log")
        _known(log, _LOG_KEYS, "log.")
        for required in ("url", "key"):
            if required not in log:
                raise ConfigError("is required", key=f"log.{required}")
        lkw = dict(log)
        lkw["key"] = path(log["key"], "log.key")
        if "head" in log:
            lkw["head"] = path(log["head"], "log.head")
        lkw["url"] = _db_value(log["url"], base)
        kwargs["log"] = LogConfig(**lkw)

        if "replay" in doc:
            replay = dict(_mapping(doc["replay"], "replay"))
            _known(replay, _REPLAY_KEYS, "replay.")
            if "database_url" in replay:
                replay["database_url"] = _db_value(replay["database_url"], base)
            kwargs["replay"] = ReplayConfig(**replay)

        if "rules" in doc:
            rules = doc["rules"]
            if not isinstance(rules, list):
                raise ConfigError("must be a list", key="rules")
            parsed = []
            for index, item in enumerate(rules):
                try:
                    parsed.append(RouteRule.from_dict(item))
                except ConfigError as exc:
                    raise exc.under(f"rules[{index}]") from None
            kwargs["rules"] = tuple(parsed)
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


def _is_jwks_source(obj: object) -> bool:
    return callable(getattr(obj, "key_set", None)) and callable(
        getattr(obj, "refresh_for_unknown_kid", None)
    )


def _is_revocation_source(obj: object) -> bool:
    return callable(getattr(obj, "current", None)) and callable(getattr(obj, "start", None))
