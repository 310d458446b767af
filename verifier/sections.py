"""The sections of a verifier config: ``identity``, ``jwks``, ``revocations``, ``log``
and ``replay`` (see :mod:`verifier.config` for the file; each class is built in code
too).

Each class's ``__init__`` parses its arguments into their final types
(:mod:`verifier._values`) and sets each field once; ``__post_init__`` only checks
what spans fields. ``*_from(section, base)`` parse a file's section, its relative
paths resolved against ``base`` (the file's directory), into the class.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from axid.audit.store import StoreError, validate_log_name, validate_origin
from axid.audit.witnessing import (
    DEFAULT_WITNESS_TIMEOUT,
    WitnessConfig,
    WitnessConfigError,
    witness_settings,
)
from axid.keys import DEFAULT_PUBLISH_LEAD, KeySet
from verifier._values import (
    StrPath,
    boolean,
    db_url,
    https_url,
    init_frozen,
    integer,
    known_keys,
    mapping,
    number,
    optional_path,
    text,
)
from verifier.errors import ConfigError

__all__ = [
    "ApprovalsConfig",
    "IdentityConfig",
    "JwksConfig",
    "LogConfig",
    "ReplayConfig",
    "RevocationConfig",
    "approvals_from",
    "identity_from",
    "jwks_from",
    "log_from",
    "replay_from",
    "revocations_from",
]

_IDENTITY_KEYS: Final = ("bundle", "cert", "key", "workload_api")
_JWKS_KEYS: Final = ("file", "url", "cache_ttl", "refetch_min_interval", "max_stale", "timeout")
_APPROVALS_KEYS: Final = ("url", "timeout", "max_body")
_REVOCATION_KEYS: Final = ("url", "database_url", "interval", "max_stale", "timeout")
_LOG_KEYS: Final = (
    "url",
    "name",
    "origin",
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


@dataclass(frozen=True, init=False)
class IdentityConfig:
    """Where peer trust bundles (and this service's own SVID) come from."""

    bundle: tuple[Path, ...]
    cert: Path | None
    key: Path | None
    workload_api: str | None

    def __init__(
        self,
        bundle: StrPath | Iterable[StrPath] = (),
        cert: StrPath | None = None,
        key: StrPath | None = None,
        workload_api: str | None = None,
    ) -> None:
        if isinstance(bundle, str | os.PathLike):
            bundle = (bundle,)
        init_frozen(
            self,
            bundle=tuple(Path(b) for b in bundle),
            cert=optional_path(cert),
            key=optional_path(key),
            workload_api=workload_api,
        )

    def __post_init__(self) -> None:
        files = bool(self.bundle) or self.cert is not None or self.key is not None
        if self.workload_api is not None:
            if files:
                raise ConfigError(
                    "give bundle/cert/key files or workload_api, not both", key="identity"
                )
            text(self.workload_api, "identity.workload_api")
        elif not self.bundle:
            raise ConfigError("needs a bundle file (or workload_api)", key="identity")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together", key="identity")

    @property
    def has_svid(self) -> bool:
        return self.workload_api is not None or self.cert is not None


@dataclass(frozen=True, init=False)
class JwksConfig:
    """The issuer's verification keys: a JWKS ``file``, the issuer's ``url`` (mTLS),
    or (code only) a fixed :class:`~axid.keys.KeySet` as ``keys``."""

    file: Path | None
    url: str | None
    keys: KeySet | None
    cache_ttl: float
    refetch_min_interval: float
    max_stale: float
    timeout: float

    def __init__(
        self,
        file: StrPath | None = None,
        url: str | None = None,
        keys: KeySet | None = None,
        cache_ttl: float = 300.0,
        refetch_min_interval: float = 30.0,
        max_stale: float = 3600.0,
        timeout: float = 5.0,
    ) -> None:
        if sum(v is not None for v in (file, url, keys)) != 1:  # first: which source
            raise ConfigError("give exactly one of file, url (or keys in code)", key="jwks")
        init_frozen(
            self,
            file=optional_path(file),
            url=None if url is None else https_url(url, "jwks.url"),
            keys=_key_set(keys),
            cache_ttl=_cache_ttl(cache_ttl),
            refetch_min_interval=number(
                refetch_min_interval, "jwks.refetch_min_interval", lo=0, hi=3600
            ),
            max_stale=number(max_stale, "jwks.max_stale", lo=0, hi=7 * 86400, lo_open=True),
            timeout=number(timeout, "jwks.timeout", lo=0, hi=120, lo_open=True),
        )

    def __post_init__(self) -> None:
        if self.max_stale < self.cache_ttl:
            raise ConfigError("must be at least cache_ttl", key="jwks.max_stale")


def _key_set(value: object) -> KeySet | None:
    if value is not None and not isinstance(value, KeySet):
        raise ConfigError("must be an axid.keys.KeySet", key="jwks.keys")
    return value


def _cache_ttl(value: object) -> float:
    """The cache must expire before a rotated key starts signing (the publish lead)."""
    ttl = number(value, "jwks.cache_ttl", lo=0, hi=DEFAULT_PUBLISH_LEAD, lo_open=True)
    if ttl >= DEFAULT_PUBLISH_LEAD:
        raise ConfigError(
            f"must be below the issuer's publish lead ({DEFAULT_PUBLISH_LEAD:g} s)",
            key="jwks.cache_ttl",
        )
    return ttl


@dataclass(frozen=True, init=False)
class RevocationConfig:
    """Where revocations come from: the issuer's ``/v1/revocations`` (``url``, polled
    over mTLS) or its table in a shared database (``database_url``)."""

    url: str | None
    database_url: str | None
    interval: float
    max_stale: float
    timeout: float

    def __init__(
        self,
        url: str | None = None,
        database_url: StrPath | None = None,
        interval: float = 5.0,
        max_stale: float = 60.0,
        timeout: float = 5.0,
    ) -> None:
        if (url is None) == (database_url is None):  # first: which source
            raise ConfigError("give exactly one of url, database_url", key="revocations")
        init_frozen(
            self,
            url=None if url is None else https_url(url, "revocations.url"),
            database_url=(
                None if database_url is None else db_url(database_url, "revocations.database_url")
            ),
            interval=number(interval, "revocations.interval", lo=0, hi=3600, lo_open=True),
            max_stale=number(max_stale, "revocations.max_stale", lo=0, hi=86400, lo_open=True),
            timeout=number(timeout, "revocations.timeout", lo=0, hi=120, lo_open=True),
        )

    def __post_init__(self) -> None:
        if self.max_stale <= self.interval:
            raise ConfigError("must be longer than interval", key="revocations.max_stale")


@dataclass(frozen=True, init=False)
class LogConfig:
    """The decision log (see :class:`axid.audit.DecisionLog`).

    ``witnesses`` are :class:`~axid.audit.witnessing.WitnessConfig` (or ``{url,
    vkey}`` mappings, parsed into them); ``quorum`` None is 1 with witnesses, else 0.
    ``head`` None is ``<key's directory>/<log>.head``; ``origin`` None is
    ``axid/<log>`` (the checkpoints' origin and the log key's name).
    """

    url: str
    key: Path
    name: str | None
    origin: str | None
    create_key: bool
    max_batch: int
    max_delay: float
    lock_timeout: float
    head: Path | None
    head_required: bool
    witnesses: tuple[WitnessConfig, ...]
    quorum: int
    witness_mode: str
    witness_timeout: float

    def __init__(
        self,
        url: StrPath,
        key: StrPath,
        name: str | None = None,
        create_key: bool = True,
        max_batch: int = 512,
        max_delay: float = 0.002,
        lock_timeout: float = 5.0,
        head: StrPath | None = None,
        head_required: bool = False,
        witnesses: Sequence[WitnessConfig | Mapping[str, object]] = (),
        quorum: int | None = None,
        witness_mode: str = "async",
        witness_timeout: float = DEFAULT_WITNESS_TIMEOUT,
        origin: str | None = None,
    ) -> None:
        url = db_url(url, "log.url")
        try:
            ws = witness_settings(witnesses, quorum, witness_mode, witness_timeout)
        except WitnessConfigError as exc:
            raise ConfigError(exc.message, key=f"log.{exc.key}") from None
        init_frozen(
            self,
            url=url,
            witnesses=ws.witnesses,
            quorum=ws.quorum,
            witness_mode=witness_mode,
            witness_timeout=ws.timeout,
            head=None if head is None else _file(head, "log.head", "the log's head file"),
            head_required=boolean(head_required, "log.head_required"),
            key=_file(key, "log.key", "the log's key file"),
            name=None if name is None else _log_name(name),
            origin=None if origin is None else _origin(origin),
            create_key=boolean(create_key, "log.create_key"),
            max_batch=integer(max_batch, "log.max_batch", lo=1, hi=100_000),
            max_delay=number(max_delay, "log.max_delay", lo=0, hi=60),
            lock_timeout=number(lock_timeout, "log.lock_timeout", lo=0, hi=3600, lo_open=True),
        )


def _log_name(value: str) -> str:
    try:
        validate_log_name(value)
    except StoreError as exc:
        raise ConfigError(str(exc), key="log.name") from None
    return value


def _origin(value: object) -> str:
    try:
        return validate_origin(value)
    except StoreError as exc:
        raise ConfigError(str(exc), key="log.origin") from None


def _file(value: object, key: str, what: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"must be the path of {what}", key=key)
    return Path(value)


@dataclass(frozen=True, init=False)
class ReplayConfig:
    """The single-use jti store; ``database_url`` defaults to the log's database."""

    database_url: str | None
    lock_timeout: float

    def __init__(self, database_url: StrPath | None = None, lock_timeout: float = 5.0) -> None:
        init_frozen(
            self,
            database_url=(
                None if database_url is None else db_url(database_url, "replay.database_url")
            ),
            lock_timeout=number(lock_timeout, "replay.lock_timeout", lo=0, hi=3600, lo_open=True),
        )


@dataclass(frozen=True, init=False)
class ApprovalsConfig:
    """Where the verifier files approval requests (DESIGN.md "Approvals"): the issuer's
    ``POST /v1/approvals`` over mTLS with this service's own SVID. ``timeout`` bounds
    one filing (then 503 ``approval_unavailable``); ``max_body`` caps the body of a
    request on an approval route (its SHA-256 is bound into the approval), larger
    bodies are refused."""

    url: str
    timeout: float
    max_body: int

    def __init__(self, url: str, timeout: float = 5.0, max_body: int = 1 << 20) -> None:
        init_frozen(
            self,
            url=https_url(url, "approvals.url").rstrip("/"),
            timeout=number(timeout, "approvals.timeout", lo=0, hi=300, lo_open=True),
            max_body=integer(max_body, "approvals.max_body", lo=0, hi=1 << 30),
        )


# --------------------------------------------------------------------------- file sections


def _section(doc: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    section = mapping(doc, key)
    known_keys(section, allowed, f"{key}.")
    return dict(section)


def _path(value: object, key: str, base: Path) -> Path:
    """A file path of a config file, resolved against its directory."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ConfigError("must be a non-empty path", key=key)
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _db_value(value: object, base: Path) -> object:
    """A file-path database value of a config file, resolved against its directory."""
    if isinstance(value, str) and value and "://" not in value and value != ":memory:":
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)
    return value


def identity_from(doc: Any, base: Path) -> IdentityConfig:
    ident = _section(doc, "identity", _IDENTITY_KEYS)
    if "bundle" in ident:
        bundle = ident["bundle"]
        items = [bundle] if isinstance(bundle, str) else bundle
        if not isinstance(items, list) or not items:
            raise ConfigError("must be a path or a list of paths", key="identity.bundle")
        ident["bundle"] = tuple(
            _path(b, f"identity.bundle[{i}]", base) for i, b in enumerate(items)
        )
    for name in ("cert", "key"):
        if name in ident:
            ident[name] = _path(ident[name], f"identity.{name}", base)
    if "workload_api" in ident:
        ident["workload_api"] = text(ident["workload_api"], "identity.workload_api")
    return IdentityConfig(**ident)


def jwks_from(doc: Any, base: Path) -> JwksConfig:
    jwks = _section(doc, "jwks", _JWKS_KEYS)
    if "file" in jwks:
        jwks["file"] = _path(jwks["file"], "jwks.file", base)
    return JwksConfig(**jwks)


def revocations_from(doc: Any, base: Path) -> RevocationConfig:
    revs = _section(doc, "revocations", _REVOCATION_KEYS)
    if "database_url" in revs:
        revs["database_url"] = _db_value(revs["database_url"], base)
    return RevocationConfig(**revs)


def log_from(doc: Any, base: Path) -> LogConfig:
    log = _section(doc, "log", _LOG_KEYS)
    for required in ("url", "key"):
        if required not in log:
            raise ConfigError("is required", key=f"log.{required}")
    log["key"] = _path(log["key"], "log.key", base)
    if "head" in log:
        log["head"] = _path(log["head"], "log.head", base)
    log["url"] = _db_value(log["url"], base)
    return LogConfig(**log)


def replay_from(doc: Any, base: Path) -> ReplayConfig:
    replay = _section(doc, "replay", _REPLAY_KEYS)
    if "database_url" in replay:
        replay["database_url"] = _db_value(replay["database_url"], base)
    return ReplayConfig(**replay)


def approvals_from(doc: Any) -> ApprovalsConfig:
    approvals = _section(doc, "approvals", _APPROVALS_KEYS)
    if "url" not in approvals:
        raise ConfigError("is required", key="approvals.url")
    return ApprovalsConfig(**approvals)
