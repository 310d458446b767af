"""The log's witness settings (DESIGN.md, "Witnesses"): each witness key with its
submission prefix, the quorum, the mode and the timeout, checked once
(:func:`witness_settings`) for :mod:`axid.audit.witnessing`, the issuer's
``audit:`` and the verifier's ``log:`` sections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

from axid.audit.cosignature import CosignatureError, WitnessKey
from axid.audit.errors import AuditError

__all__ = [
    "DEFAULT_WITNESS_TIMEOUT",
    "MAX_WITNESS_KEYS",
    "MAX_WITNESS_TIMEOUT",
    "WitnessConfig",
    "WitnessConfigError",
    "WitnessSettings",
    "witness_settings",
]

DEFAULT_WITNESS_TIMEOUT: Final = 5.0
MAX_WITNESS_TIMEOUT: Final = 300.0
# A cosigned note holds the log's line and one line per key: signed-note
# verifiers (ours included) refuse notes with more than 100 signatures.
MAX_WITNESS_KEYS: Final = 32
_MODES: Final = ("async", "sync")


class WitnessConfigError(AuditError, ValueError):
    """The witness settings are invalid; ``key`` names the offending setting."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class WitnessConfig:
    """One witness key: the witness's submission prefix ``url`` and its ``vkey``
    (a C2SP vkey string or a :class:`~axid.audit.cosignature.WitnessKey`)."""

    url: str
    vkey: WitnessKey | str

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _check_url(self.url))
        if isinstance(self.vkey, str):
            try:
                object.__setattr__(self, "vkey", WitnessKey.from_vkey(self.vkey))
            except CosignatureError as e:
                raise WitnessConfigError(str(e), key="vkey") from None
        elif not isinstance(self.vkey, WitnessKey):
            raise WitnessConfigError("must be a witness vkey string", key="vkey")

    @property
    def key(self) -> WitnessKey:
        return cast(WitnessKey, self.vkey)

    @property
    def name(self) -> str:
        return self.key.name

    @classmethod
    def from_value(cls, value: object) -> WitnessConfig:
        """A :class:`WitnessConfig` as is, or one from a mapping of exactly ``url``, ``vkey``."""
        if isinstance(value, WitnessConfig):
            return value
        if not isinstance(value, Mapping):
            raise WitnessConfigError("must be a mapping {url, vkey}", key="witnesses")
        for k in value:
            if k not in ("url", "vkey"):
                raise WitnessConfigError("unknown key (allowed: url, vkey)", key=str(k)[:60])
        for k in ("url", "vkey"):
            if k not in value:
                raise WitnessConfigError("is required", key=k)
        return cls(value["url"], value["vkey"])


def _check_url(url: object) -> str:
    """A witness's submission prefix: an http(s) URL with a host, no query,
    fragment or userinfo; returned without a trailing slash."""
    if not isinstance(url, str) or not url or len(url) > 2048 or not url.isprintable():
        raise WitnessConfigError("must be a printable http(s) URL", key="url")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise WitnessConfigError("has an invalid port", key="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WitnessConfigError("must be an http:// or https:// URL with a host", key="url")
    if parts.query or parts.fragment or parts.username or parts.password or " " in url:
        raise WitnessConfigError("must not have a query, fragment, userinfo or spaces", key="url")
    return url.rstrip("/")


@dataclass(frozen=True)
class WitnessSettings:
    """Validated witness settings (build with :func:`witness_settings`)."""

    witnesses: tuple[WitnessConfig, ...] = ()
    quorum: int = 0
    mode: Literal["async", "sync"] = "async"
    timeout: float = DEFAULT_WITNESS_TIMEOUT

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct witnesses (key names), in configuration order."""
        return tuple(dict.fromkeys(w.name for w in self.witnesses))


def witness_settings(
    witnesses: Sequence[WitnessConfig | Mapping[str, object]] | None = None,
    quorum: int | None = None,
    mode: str = "async",
    timeout: float = DEFAULT_WITNESS_TIMEOUT,
) -> WitnessSettings:
    """Check the log's witness settings (raises :class:`WitnessConfigError`).

    - ``witnesses``: a list of at most 32 keys (``{url, vkey}``); one key once;
      a witness's keys share its URL, and witnesses do not share a URL.
    - ``quorum``: the number of distinct witnesses (key names) a checkpoint
      needs, 0..their number; default 1 with witnesses, else 0.
    - ``mode``: ``async`` (nobody waits) or ``sync`` (each batch waits for a
      quorum, which must then be at least 1).
    - ``timeout``: seconds, in (0, 300]: each request to a witness, and in
      sync mode each batch's wait.
    """
    items = _witness_list(witnesses)
    names = tuple(dict.fromkeys(w.name for w in items))
    if quorum is None:
        quorum = 1 if names else 0
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 0:
        raise WitnessConfigError("must be an integer >= 0", key="quorum")
    if quorum > len(names):
        raise WitnessConfigError(
            f"is {quorum} but only {len(names)} distinct witness(es) are configured", key="quorum"
        )
    if mode not in _MODES:
        raise WitnessConfigError("must be 'async' or 'sync'", key="witness_mode")
    if mode == "sync" and quorum < 1:
        raise WitnessConfigError("sync needs witnesses and a quorum >= 1", key="witness_mode")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_WITNESS_TIMEOUT
    ):
        raise WitnessConfigError(
            f"must be a number of seconds in (0, {MAX_WITNESS_TIMEOUT:g}]", key="witness_timeout"
        )
    return WitnessSettings(items, quorum, cast(Any, mode), float(timeout))


def _witness_list(witnesses: object) -> tuple[WitnessConfig, ...]:
    if witnesses is None:
        return ()
    if isinstance(witnesses, str | bytes | Mapping) or not isinstance(witnesses, Sequence):
        raise WitnessConfigError("must be a list of {url, vkey}", key="witnesses")
    if len(witnesses) > MAX_WITNESS_KEYS:
        raise WitnessConfigError(f"at most {MAX_WITNESS_KEYS} witness keys", key="witnesses")
    items: list[WitnessConfig] = []
    url_of: dict[str, str] = {}
    name_of: dict[str, str] = {}
    keys: set[tuple[str, bytes]] = set()
    for i, value in enumerate(witnesses):
        try:
            w = WitnessConfig.from_value(value)
        except WitnessConfigError as e:
            sub = "" if e.key == "witnesses" else f".{e.key}"
            raise WitnessConfigError(e.message, key=f"witnesses[{i}]{sub}") from None
        if (w.name, w.key.key_id) in keys:
            raise WitnessConfigError("the same witness key twice", key=f"witnesses[{i}].vkey")
        if url_of.setdefault(w.name, w.url) != w.url:
            raise WitnessConfigError(
                f"witness {w.name} is configured with two URLs", key=f"witnesses[{i}].url"
            )
        if name_of.setdefault(w.url, w.name) != w.name:
            raise WitnessConfigError(
                "two witnesses (key names) at one URL", key=f"witnesses[{i}].url"
            )
        keys.add((w.name, w.key.key_id))
        items.append(w)
    return tuple(items)
