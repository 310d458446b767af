"""Configuration of the issuer service (``axid serve --config FILE``).

YAML, every key optional but ``registrations`` and the SVID source; unknown keys
are refused with the key named. Relative paths in a file are resolved against
the file's directory (so a config works from any working directory)::

    issuer: https://issuer.example.org   # the `iss` of every token (exact string);
                                         # default https://HOST:PORT
    host: 127.0.0.1
    port: 8443
    http: h11                            # uvicorn HTTP implementation: h11 | httptools
    svid:                                # the issuer's own X.509-SVID: PEM files ...
      cert: certs/issuer.pem
      key: certs/issuer.key
      bundle: certs/bundle.pem
    # svid: {workload_api: "unix:///run/spire/agent.sock"}   # ... or the Workload API
    keys_dir: .axid/keys                 # token signing keyring (created on first start)
    database_url: sqlite:///.axid/axid.db   # runs + revocations; AXID_DATABASE_URL wins
    registrations: registrations.yaml    # see axid.issuer.registry
    admins:                              # who may POST /v1/revocations
      - "spiffe://example.org/admin/*"
    approvals:                           # approval requests (axid.issuer.approval_settings)
      approvers: ["spiffe://example.org/admin/*"]  # default approvers of a request
      services:                          # who may file, for which service (default: nobody)
        payments: ["spiffe://example.org/svc/payments"]
      timeout: 900                       # seconds; undecided = expired = denied
      # notify_url: https://hooks.example.org/axid   # a JSON POST per new request
    audit:
      log: issuer                        # the issuer's own decision log
      # origin: example.org/axid/issuer  # checkpoint origin (default axid/<log>)
      key: .axid/keys/log.pem            # its signing key, created 0600 on first start
      database_url: null                 # default: database_url
      head: .axid/keys/issuer.head       # the authenticated head (default: beside the key)
      head_required: false               # true: a missing head file is an integrity failure
      witnesses:                         # C2SP tlog-witnesses that cosign the checkpoints:
        - url: https://witness.example.org   # submission prefix (POSTs to url/add-checkpoint)
          vkey: witness.example.org/w1+3afd8f53+BLMl8KDI291nm4KjUKUStZ2A24EOmXWZYtAzSwP1wAnc
      quorum: 1                          # distinct witnesses a checkpoint needs (default 1)
      witness_mode: async                # sync: a batch waits for the quorum (else 503)
      witness_timeout: 5                 # seconds: each submission; sync: each batch's wait
    tokens:
      default_ttl: 120                   # seconds, when a request names none
      max_ttl: 300                       # at most 300 (the token format's limit)
      publish_lead: 330                  # `axid keys rotate` default, seconds

Precedence: command-line flags > ``AXID_DATABASE_URL`` > the file > defaults.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from axid._yaml import YamlError, read_yaml_file
from axid.audit.store import LogNameError, StoreError, validate_log_name, validate_origin
from axid.audit.witnessing import (
    DEFAULT_WITNESS_TIMEOUT,
    WitnessConfig,
    WitnessConfigError,
    witness_settings,
)
from axid.issuer.approval_settings import ApprovalSettings
from axid.issuer.errors import IssuerBaseError
from axid.keys import DEFAULT_PUBLISH_LEAD
from axid.tokens import MAX_TTL
from mtls.spiffeid import SpiffeIdError, SpiffeIdPattern

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_DEFAULT_TTL",
    "DEFAULT_KEYS_DIR",
    "DEFAULT_LOG_KEY",
    "DEFAULT_LOG_NAME",
    "DEFAULT_PORT",
    "ConfigError",
    "IssuerConfig",
]

DATABASE_URL_ENV: Final = "AXID_DATABASE_URL"
DEFAULT_DATABASE_URL: Final = "sqlite:///.axid/axid.db"
DEFAULT_KEYS_DIR: Final = Path(".axid/keys")
DEFAULT_LOG_KEY: Final = Path(".axid/keys/log.pem")
DEFAULT_LOG_NAME: Final = "issuer"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8443
DEFAULT_DEFAULT_TTL: Final = 120

_TOP_KEYS: Final = (
    "issuer",
    "host",
    "port",
    "http",
    "svid",
    "keys_dir",
    "database_url",
    "registrations",
    "admins",
    "approvals",
    "audit",
    "tokens",
)
_SVID_KEYS: Final = ("cert", "key", "bundle", "workload_api")
_AUDIT_KEYS: Final = (
    "log",
    "origin",
    "key",
    "database_url",
    "head",
    "head_required",
    "witnesses",
    "quorum",
    "witness_mode",
    "witness_timeout",
)
_TOKEN_KEYS: Final = ("default_ttl", "max_ttl", "publish_lead")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,253}")


class ConfigError(IssuerBaseError, ValueError):
    """The issuer configuration is invalid; ``key`` names the offending key if known."""

    key: str | None

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_issuer_url(value: object) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > 2048:
        raise ConfigError("must be a non-empty printable string", key="issuer")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError("must be an https:// URL with a host", key="issuer")
    if parts.query or parts.fragment or parts.username or parts.password or " " in value:
        raise ConfigError("must not have a query, fragment, userinfo or spaces", key="issuer")
    return value


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"must be an integer in [{lo}, {hi}], not {_show(value)}", key=key)
    return value


@dataclass(frozen=True)
class IssuerConfig:
    """Everything ``axid serve`` needs. Validated on construction (``ConfigError``)."""

    registrations: Path
    issuer: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    http: str = "h11"
    cert: Path | None = None
    key: Path | None = None
    bundle: Path | None = None
    workload_api: str | None = None
    keys_dir: Path = DEFAULT_KEYS_DIR
    database_url: str = DEFAULT_DATABASE_URL
    admins: tuple[SpiffeIdPattern, ...] = ()
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)
    log_name: str = DEFAULT_LOG_NAME
    log_origin: str | None = None  # default: axid/<log_name>
    log_key: Path = DEFAULT_LOG_KEY
    audit_database_url: str | None = None
    log_head: Path | None = None  # default: <log key's directory>/<log>.head
    log_head_required: bool = False
    # Witnesses of the log (axid.audit.witnessing): {url, vkey} mappings or
    # WitnessConfig, made WitnessConfig; quorum None is 1 with witnesses, else 0.
    log_witnesses: tuple[WitnessConfig, ...] = ()
    log_quorum: int | None = None
    log_witness_mode: str = "async"
    log_witness_timeout: float = DEFAULT_WITNESS_TIMEOUT
    default_ttl: int = DEFAULT_DEFAULT_TTL
    max_ttl: int = MAX_TTL
    publish_lead: float = DEFAULT_PUBLISH_LEAD
    # Where relative paths of the file were resolved from (for messages only).
    source_file: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._check_listen()
        self._check_svid()
        self._check_witnessing()
        for name in ("registrations", "keys_dir", "log_key", "log_head", "cert", "key", "bundle"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        self._check_databases()
        if not isinstance(self.admins, tuple) or not all(
            isinstance(a, SpiffeIdPattern) for a in self.admins
        ):
            raise ConfigError("must be a tuple of SpiffeIdPattern", key="admins")
        self._check_tokens()

    def _check_listen(self) -> None:
        """host, port, the issuer URL (default from them) and the HTTP implementation."""
        if not isinstance(self.host, str) or _HOST_RE.fullmatch(self.host) is None:
            raise ConfigError(f"{_show(self.host)} is not a host name or address", key="host")
        _int(self.port, "port", 0, 65535)
        if self.issuer is None:
            if self.port == 0:
                raise ConfigError("is required when port is 0", key="issuer")
            host = f"[{self.host}]" if ":" in self.host else self.host
            object.__setattr__(self, "issuer", f"https://{host}:{self.port}")
        _check_issuer_url(self.issuer)
        if self.http not in ("h11", "httptools"):
            raise ConfigError("must be 'h11' or 'httptools'", key="http")

    def _check_svid(self) -> None:
        """The SVID from files or from the Workload API: exactly one of the two."""
        files = (self.cert, self.key, self.bundle)
        if self.workload_api is not None:
            if any(f is not None for f in files):
                raise ConfigError(
                    "give either cert/key/bundle files or workload_api, not both", key="svid"
                )
            if not isinstance(self.workload_api, str) or not self.workload_api:
                raise ConfigError("must be a socket path or unix:// URI", key="svid.workload_api")
        elif any(f is None for f in files):
            raise ConfigError(
                "the issuer's SVID is needed: cert, key and bundle files, or workload_api",
                key="svid",
            )

    def _check_witnessing(self) -> None:
        """The log's head file flag and witness settings (normalised here)."""
        if not isinstance(self.log_head_required, bool):
            raise ConfigError("must be true or false", key="audit.head_required")
        try:
            ws = witness_settings(
                self.log_witnesses, self.log_quorum, self.log_witness_mode, self.log_witness_timeout
            )
        except WitnessConfigError as exc:
            raise ConfigError(exc.message, key=f"audit.{exc.key}") from None
        object.__setattr__(self, "log_witnesses", ws.witnesses)
        object.__setattr__(self, "log_quorum", ws.quorum)
        object.__setattr__(self, "log_witness_timeout", ws.timeout)

    def _check_databases(self) -> None:
        """The database URLs and the decision log's name."""
        for name in ("database_url", "audit_database_url"):
            value = getattr(self, name)
            if value is None and name == "audit_database_url":
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError("must be a non-empty database URL", key=name)
        try:
            validate_log_name(self.log_name)
        except StoreError as exc:
            raise ConfigError(str(exc), key="audit.log") from None

    def _check_tokens(self) -> None:
        _int(self.max_ttl, "tokens.max_ttl", 1, MAX_TTL)
        _int(self.default_ttl, "tokens.default_ttl", 1, self.max_ttl)
        lead = self.publish_lead
        if isinstance(lead, bool) or not isinstance(lead, int | float) or not math.isfinite(lead):
            raise ConfigError("must be a number of seconds", key="tokens.publish_lead")
        if lead < 0:
            raise ConfigError("must be >= 0", key="tokens.publish_lead")

    @property
    def iss(self) -> str:
        """The ``iss`` claim of every token this issuer mints."""
        assert self.issuer is not None  # set in __post_init__
        return self.issuer

    @property
    def audit_url(self) -> str:
        """The database of the issuer's decision log."""
        return self.audit_database_url or self.database_url

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_mapping(
        cls,
        doc: object,
        *,
        base_dir: str | os.PathLike[str] = ".",
        environ: Mapping[str, str] | None = None,
    ) -> IssuerConfig:
        """Build from a parsed document (see the module docstring). Relative paths are
        resolved against ``base_dir``; ``environ`` (default ``os.environ``) may
        override the database URL."""
        if doc is None:
            doc = {}
        if not isinstance(doc, Mapping):
            raise ConfigError("the configuration must be a mapping")
        base = Path(base_dir)
        _known(doc, _TOP_KEYS, "")
        kwargs: dict[str, Any] = {}
        for name in ("issuer", "host"):
            if name in doc:
                kwargs[name] = _text(doc[name], name)
        if "port" in doc:
            kwargs["port"] = _int(doc["port"], "port", 0, 65535)
        if "http" in doc:
            kwargs["http"] = _text(doc["http"], "http")
        if "registrations" not in doc:
            raise ConfigError("is required (the registration file)", key="registrations")
        kwargs["registrations"] = _path(doc["registrations"], "registrations", base)
        kwargs.update(_svid_kwargs(doc.get("svid"), base))
        if "keys_dir" in doc:
            kwargs["keys_dir"] = _path(doc["keys_dir"], "keys_dir", base)
        if "database_url" in doc:
            kwargs["database_url"] = _text(doc["database_url"], "database_url")
        if "admins" in doc:
            kwargs["admins"] = _admin_patterns(doc["admins"])
        if "approvals" in doc:
            try:
                kwargs["approvals"] = ApprovalSettings.from_dict(doc["approvals"])
            except ValueError as exc:
                raise ConfigError(str(exc), key="approvals") from None
        kwargs.update(_audit_kwargs(doc.get("audit"), base))
        kwargs.update(_tokens_kwargs(doc.get("tokens")))
        config = cls(**kwargs)
        return config.with_env(environ)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
    ) -> IssuerConfig:
        """Load a YAML config file strictly (``ConfigError`` on any problem)."""
        p = Path(path)
        try:
            doc = read_yaml_file(p, what=f"config file {p}")
        except YamlError as exc:
            raise ConfigError(str(exc)) from None
        config = cls.from_mapping(doc, base_dir=p.parent, environ=environ)
        return replace(config, source_file=p)

    def with_env(self, environ: Mapping[str, str] | None = None) -> IssuerConfig:
        """This config with ``AXID_DATABASE_URL`` (if set and non-empty) as database URL."""
        env = os.environ if environ is None else environ
        url = env.get(DATABASE_URL_ENV)
        return replace(self, database_url=url) if url else self


def _known(doc: Mapping[Any, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (allowed: {', '.join(allowed)})", key=f"{prefix}{str(key)[:60]}"
            )


# ---------------------------------------------------------------------- file sections


def _path(value: object, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ConfigError("must be a non-empty path", key=key)
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a non-empty string", key=key)
    return value


def _svid_kwargs(svid: object, base: Path) -> dict[str, Any]:
    """The ``svid:`` section (required): cert/key/bundle files or workload_api."""
    if svid is None:
        raise ConfigError("is required (cert/key/bundle or workload_api)", key="svid")
    if not isinstance(svid, Mapping):
        raise ConfigError("must be a mapping", key="svid")
    _known(svid, _SVID_KEYS, "svid.")
    kwargs: dict[str, Any] = {}
    for name in ("cert", "key", "bundle"):
        if name in svid:
            kwargs[name] = _path(svid[name], f"svid.{name}", base)
    if "workload_api" in svid:
        kwargs["workload_api"] = _text(svid["workload_api"], "svid.workload_api")
    return kwargs


def _admin_patterns(admins: object) -> tuple[SpiffeIdPattern, ...]:
    if not isinstance(admins, list):
        raise ConfigError("must be a list of SPIFFE ID patterns", key="admins")
    patterns = []
    for i, item in enumerate(admins):
        if not isinstance(item, str):
            raise ConfigError("must be a string", key=f"admins[{i}]")
        try:
            patterns.append(SpiffeIdPattern.parse(item))
        except SpiffeIdError as exc:
            raise ConfigError(str(exc), key=f"admins[{i}]") from None
    return tuple(patterns)


def _audit_kwargs(audit: object, base: Path) -> dict[str, Any]:
    """The optional ``audit:`` section: the issuer's decision log."""
    if audit is None:
        return {}
    if not isinstance(audit, Mapping):
        raise ConfigError("must be a mapping", key="audit")
    _known(audit, _AUDIT_KEYS, "audit.")
    kwargs: dict[str, Any] = {}
    if "log" in audit:
        kwargs["log_name"] = _text(audit["log"], "audit.log")
    if audit.get("origin") is not None:
        try:
            kwargs["log_origin"] = validate_origin(audit["origin"])
        except LogNameError as exc:
            raise ConfigError(str(exc), key="audit.origin") from None
    if "key" in audit:
        kwargs["log_key"] = _path(audit["key"], "audit.key", base)
    if audit.get("database_url") is not None:
        kwargs["audit_database_url"] = _text(audit["database_url"], "audit.database_url")
    if "head" in audit:
        kwargs["log_head"] = _path(audit["head"], "audit.head", base)
    if "head_required" in audit:
        kwargs["log_head_required"] = audit["head_required"]
    for name in ("witnesses", "quorum", "witness_mode", "witness_timeout"):
        if name in audit:
            kwargs[f"log_{name}"] = audit[name]
    return kwargs


def _tokens_kwargs(tokens: object) -> dict[str, Any]:
    """The optional ``tokens:`` section: lifetimes and the key publication lead."""
    if tokens is None:
        return {}
    if not isinstance(tokens, Mapping):
        raise ConfigError("must be a mapping", key="tokens")
    _known(tokens, _TOKEN_KEYS, "tokens.")
    kwargs: dict[str, Any] = {}
    if "default_ttl" in tokens:
        kwargs["default_ttl"] = _int(tokens["default_ttl"], "tokens.default_ttl", 1, 300)
    if "max_ttl" in tokens:
        kwargs["max_ttl"] = _int(tokens["max_ttl"], "tokens.max_ttl", 1, 300)
    if "publish_lead" in tokens:
        kwargs["publish_lead"] = tokens["publish_lead"]
    return kwargs
