"""The witness's configuration file (``axid witness serve --config witness.yaml``)::

    listen: 127.0.0.1:7380          # host:port ([::1]:7380 for IPv6); port 0: any
    tls: {cert: w.pem, key: w.key}  # optional: serve HTTPS with this certificate
    keys: witness/                  # the directory `axid witness init` wrote
    database: sqlite:///witness.db  # or postgresql://... (several witness processes)
    logs:                           # the logs it witnesses: origin and log vkey
      - {origin: example.org/axid/payments, vkey: "example.org/axid/payments+1234abcd+AB..."}

Every key but ``tls`` is required; unknown keys, duplicate origins, origins of
more than 255 bytes (what subtree/v1 cosignatures can carry), a vkey that
is not a C2SP Ed25519 log key (type 0x01) and missing TLS files are errors that
name the key. Relative paths (``tls``, ``keys`` and a relative SQLite file) are
resolved against the config file's directory. The YAML itself is read strictly
(no duplicate keys, aliases or merge keys) by the CLI, with :mod:`axid._yaml`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from axid.audit.note import Checkpoint, NoteError, NoteVerifier
from axid.witness.errors import WitnessError

__all__ = ["TlsFiles", "WitnessConfig", "WitnessConfigError", "parse_config"]

_TOP_KEYS: Final = ("listen", "tls", "keys", "database", "logs")
_TLS_KEYS: Final = ("cert", "key")
_LOG_KEYS: Final = ("origin", "vkey")
_LISTEN_RE: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(0|[1-9][0-9]{0,4})")
_DB_PREFIXES: Final = ("sqlite:///", "postgresql://", "postgresql+psycopg://")
_MAX_LOGS: Final = 10_000
_MAX_ORIGIN_BYTES: Final = 255  # subtree/v1 cosignatures carry it in an opaque<1..2^8-1>


class WitnessConfigError(WitnessError, ValueError):
    """The witness configuration is invalid; ``key`` names the offending key."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class WitnessConfig:
    host: str
    port: int
    tls: TlsFiles | None
    keys: Path
    database: str
    logs: Mapping[str, tuple[NoteVerifier, ...]]  # origin -> trusted log keys


def _known(doc: Mapping[Any, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise WitnessConfigError(
                f"unknown key (allowed: {', '.join(allowed)})", key=f"{prefix}{str(key)[:60]}"
            )


def _text(value: object, key: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > limit:
        raise WitnessConfigError(
            f"must be a non-empty printable string of at most {limit}", key=key
        )
    return value


def _path(value: object, key: str, base: Path) -> Path:
    p = Path(_text(value, key)).expanduser()
    return p if p.is_absolute() else base / p


def _listen(value: object) -> tuple[str, int]:
    m = _LISTEN_RE.fullmatch(_text(value, "listen", 300))
    port = int(m.group(2)) if m else -1
    if m is None or port > 65535:
        raise WitnessConfigError("must be host:port (e.g. 127.0.0.1:7380)", key="listen")
    host = m.group(1)
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise WitnessConfigError("invalid IPv6 address", key="listen") from None
    return host, port


def _tls(value: object, base: Path) -> TlsFiles | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise WitnessConfigError("must be a mapping {cert, key}", key="tls")
    _known(value, _TLS_KEYS, "tls.")
    for name in _TLS_KEYS:
        if name not in value:
            raise WitnessConfigError("is required", key=f"tls.{name}")
    files = []
    for name in _TLS_KEYS:
        path = _path(value[name], f"tls.{name}", base)
        if not path.is_file():
            raise WitnessConfigError(f"{path}: no such file", key=f"tls.{name}")
        files.append(path)
    return TlsFiles(*files)


def _database(value: object, base: Path) -> str:
    url = _text(value, "database")
    if not url.startswith(_DB_PREFIXES):
        raise WitnessConfigError("must be sqlite:///FILE or postgresql://...", key="database")
    if url.startswith("sqlite:///"):
        file = url.removeprefix("sqlite:///")
        if not file or file == ":memory:" or "?" in file or file.startswith("file:"):
            raise WitnessConfigError(
                "SQLite needs a file: sqlite:///path/to/file.db", key="database"
            )
        if not Path(file).is_absolute():
            url = f"sqlite:///{base / file}"
    return url


def _logs(value: object) -> dict[str, tuple[NoteVerifier, ...]]:
    if not isinstance(value, list) or not value or len(value) > _MAX_LOGS:
        raise WitnessConfigError("must be a non-empty list of {origin, vkey}", key="logs")
    logs: dict[str, tuple[NoteVerifier, ...]] = {}
    for i, item in enumerate(value):
        key = f"logs[{i}]"
        if not isinstance(item, Mapping):
            raise WitnessConfigError("must be a mapping {origin, vkey}", key=key)
        _known(item, _LOG_KEYS, f"{key}.")
        origin = _text(item.get("origin"), f"{key}.origin")
        try:
            Checkpoint(origin, 0, bytes(32))  # the origin line's own rules
        except NoteError as exc:
            raise WitnessConfigError(str(exc), key=f"{key}.origin") from None
        if len(origin.encode("utf-8")) > _MAX_ORIGIN_BYTES:
            raise WitnessConfigError(
                f"must be at most {_MAX_ORIGIN_BYTES} bytes (subtree/v1)", key=f"{key}.origin"
            )
        try:
            verifier = NoteVerifier.from_vkey(_text(item.get("vkey"), f"{key}.vkey"))
        except NoteError as exc:
            raise WitnessConfigError(str(exc), key=f"{key}.vkey") from None
        if origin in logs:
            raise WitnessConfigError(f"origin {origin!r} is listed twice", key=f"{key}.origin")
        logs[origin] = (verifier,)
    return logs


def parse_config(doc: object, base: Path) -> WitnessConfig:
    """Check a parsed config document; relative paths resolve against ``base``."""
    if not isinstance(doc, Mapping):
        raise WitnessConfigError("the witness config must be a mapping")
    _known(doc, _TOP_KEYS, "")
    for name in ("listen", "keys", "database", "logs"):
        if name not in doc:
            raise WitnessConfigError("is required", key=name)
    host, port = _listen(doc["listen"])
    return WitnessConfig(
        host=host,
        port=port,
        tls=_tls(doc.get("tls"), base),
        keys=_path(doc["keys"], "keys", base),
        database=_database(doc["database"], base),
        logs=_logs(doc["logs"]),
    )
