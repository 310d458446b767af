"""`axid serve`: run the issuer service (FastAPI under uvicorn, mTLS).

Settings come from ``--config FILE`` (see :mod:`axid.issuer.config`) and/or flags;
a flag wins over the file, ``--db`` over ``AXID_DATABASE_URL``, which wins over the
file. Once the server accepts connections it prints ``issuer: https://HOST:PORT``
and ``ready`` on stdout (the bound port, also with ``--port 0``).

Exit codes: 0 stopped by SIGINT/SIGTERM, 1 failed to start, 2 bad configuration.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from axid.issuer.config import IssuerConfig
    from mtls.spiffeid import SpiffeIdPattern


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _svid_overrides(
    cert: Path | None, key: Path | None, bundle: Path | None, workload_api: str | None
) -> dict[str, Any]:
    """The SVID flags: files or the Workload API, never both (exit 2)."""
    if cert is not None or key is not None or bundle is not None:
        if workload_api is not None:
            _fail("give --cert/--key/--bundle or --workload-api, not both", 2)
        return {"cert": cert, "key": key, "bundle": bundle, "workload_api": None}
    if workload_api is not None:
        return {"cert": None, "key": None, "bundle": None, "workload_api": workload_api}
    return {}


def _admins(admin: list[str]) -> tuple[SpiffeIdPattern, ...]:
    from mtls.spiffeid import SpiffeIdError, SpiffeIdPattern

    try:
        return tuple(SpiffeIdPattern.parse(a) for a in admin)
    except SpiffeIdError as exc:
        _fail(f"--admin: {exc}", 2)


def _settings(config: Path | None, overrides: dict[str, Any], db: str | None) -> IssuerConfig:
    """The file's settings (or the defaults and environment) under the flags (exit 2 on
    a bad configuration)."""
    from axid.issuer.config import ConfigError, IssuerConfig

    try:
        if config is not None:
            settings = replace(IssuerConfig.from_file(config), **overrides)
        else:
            if "registrations" not in overrides:
                _fail("give --config FILE or at least --registrations and the SVID flags", 2)
            settings = IssuerConfig(**overrides).with_env()
        if db is not None:
            settings = replace(settings, database_url=db)
    except ConfigError as exc:
        _fail(str(exc), 2)
    return settings


_ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML config file (see the README).")
]
_HostOpt = Annotated[str | None, typer.Option("--host", help="Listen address.")]
_PortOpt = Annotated[
    int | None, typer.Option("--port", min=0, max=65535, help="Listen port (0: any).")
]
_IssuerOpt = Annotated[
    str | None, typer.Option("--issuer", help="The tokens' iss (default https://HOST:PORT).")
]
_CertOpt = Annotated[Path | None, typer.Option("--cert", help="Issuer SVID (PEM).")]
_KeyOpt = Annotated[Path | None, typer.Option("--key", help="Issuer SVID key (PEM).")]
_BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Trust bundle (PEM).")]
_WorkloadApiOpt = Annotated[
    str | None, typer.Option("--workload-api", help="SPIFFE Workload API socket.")
]
_RegistrationsOpt = Annotated[
    Path | None, typer.Option("--registrations", help="Registration file (YAML).")
]
_DbOpt = Annotated[
    str | None, typer.Option("--db", help="Database URL (sqlite:///... or postgresql://...).")
]
_KeysDirOpt = Annotated[
    Path | None, typer.Option("--keys-dir", help="Token signing keyring directory.")
]
_AdminOpt = Annotated[
    list[str] | None,
    typer.Option("--admin", help="Admin SPIFFE ID or pattern (repeatable)."),
]
_HttpOpt = Annotated[
    str | None, typer.Option("--http", help="uvicorn HTTP implementation: h11 | httptools.")
]
_LogLevelOpt = Annotated[str, typer.Option("--log-level", help="uvicorn log level.")]


def serve(
    config: _ConfigOpt = None,
    host: _HostOpt = None,
    port: _PortOpt = None,
    issuer: _IssuerOpt = None,
    cert: _CertOpt = None,
    key: _KeyOpt = None,
    bundle: _BundleOpt = None,
    workload_api: _WorkloadApiOpt = None,
    registrations: _RegistrationsOpt = None,
    db: _DbOpt = None,
    keys_dir: _KeysDirOpt = None,
    admin: _AdminOpt = None,
    http: _HttpOpt = None,
    log_level: _LogLevelOpt = "info",
) -> None:
    """Run the issuer service over mTLS."""
    from axid.issuer.config import ConfigError
    from axid.issuer.registry import RegistryError
    from axid.issuer.server import IssuerStartupError
    from axid.issuer.server import serve as run

    flags = {
        "host": host,
        "port": port,
        "issuer": issuer,
        "registrations": registrations,
        "keys_dir": keys_dir,
        "http": http,
    }
    overrides = {name: value for name, value in flags.items() if value is not None}
    overrides.update(_svid_overrides(cert, key, bundle, workload_api))
    if admin:
        overrides["admins"] = _admins(admin)
    settings = _settings(config, overrides, db)

    def ready(url: str) -> None:
        typer.echo(f"issuer: {url}")
        typer.echo("ready")

    try:
        run(settings, ready=ready, log_level=log_level)
    except (RegistryError, ConfigError) as exc:
        _fail(str(exc), 2)
    except IssuerStartupError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # the source, keyring or database could not be opened
        _fail(f"{type(exc).__name__}: {exc}", 1)
