"""Value parsers of the verifier's configuration, and how its frozen classes are built.

Each parser takes a value as given (in code, or from a YAML mapping), checks it and
returns it in its final type, or raises :class:`~verifier.errors.ConfigError` naming
the key. The configuration classes (:mod:`verifier.config`, :mod:`verifier.rules`)
are frozen dataclasses whose ``__init__`` parses every argument with these, sets each
field once (:func:`init_frozen`), and whose ``__post_init__`` only checks what spans
several fields: nothing is rewritten after construction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from verifier.errors import ConfigError

__all__ = [
    "StrPath",
    "boolean",
    "db_url",
    "https_url",
    "init_frozen",
    "integer",
    "known_keys",
    "mapping",
    "number",
    "optional_path",
    "text",
]

StrPath: TypeAlias = str | os.PathLike[str]


def init_frozen(obj: object, **fields: Any) -> None:
    """Set each field of a frozen dataclass once, from its ``__init__``'s parsed
    values, then run its ``__post_init__`` checks, as a generated ``__init__`` does."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    post_init = getattr(obj, "__post_init__", None)
    if post_init is not None:
        post_init()


def number(value: object, key: str, *, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (``lo_open``: (lo, hi]); returned as given."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError("must be a number", key=key)
    if value < lo or value > hi or (lo_open and value == lo):
        bound = "(" if lo_open else "["
        raise ConfigError(f"must be in {bound}{lo:g}, {hi:g}]", key=key)
    return value


def integer(value: object, key: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"must be an integer in [{lo}, {hi}]", key=key)
    return value


def text(value: object, key: str, *, limit: int = 2048) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > limit:
        raise ConfigError(f"must be a non-empty printable string of at most {limit}", key=key)
    return value


def boolean(value: object, key: str) -> bool:
    if type(value) is not bool:
        raise ConfigError("must be true or false", key=key)
    return value


def https_url(value: object, key: str) -> str:
    url = text(value, key)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError("must be an https:// URL (the issuer is served over mTLS)", key=key)
    if parts.fragment or parts.username or parts.password or " " in url:
        raise ConfigError("must not have a fragment, userinfo or spaces", key=key)
    return url


def db_url(value: object, key: str) -> str:
    """A database URL; a plain file path (no ``://``) means that SQLite file."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    url = text(value, key)
    if "://" not in url:
        if "\x00" in url or url == ":memory:":
            raise ConfigError("must be a SQLite file path or a database URL", key=key)
        return f"sqlite:///{url}"
    if not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")):
        raise ConfigError("must be sqlite:///FILE, a file path, or postgresql://...", key=key)
    return url


def optional_path(value: StrPath | None) -> Path | None:
    return None if value is None else Path(value)


def known_keys(doc: Mapping[Any, Any], allowed: tuple[str, ...], prefix: str) -> None:
    """Refuse a key of ``doc`` not in ``allowed``, naming it (``prefix`` + key)."""
    for key in doc:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (allowed: {', '.join(allowed)})", key=f"{prefix}{str(key)[:60]}"
            )


def mapping(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping", key=key)
    return value
