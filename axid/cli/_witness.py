"""`axid witness`: run a C2SP tlog-witness (see :mod:`axid.witness`).

- ``init --name NAME --dir DIR [--ml-dsa]`` writes the keys and vkeys and prints
  the vkey(s). Exit 0; 1 when a file exists (nothing is overwritten) or cannot be
  written; 2 for a bad name (and Click's usage errors).
- ``serve --config witness.yaml`` prints ``listening http(s)://HOST:PORT`` on
  stdout once it accepts connections. Exit 0 stopped by SIGINT/SIGTERM; 1 failed
  to start (keys, database, port); 2 bad configuration.
- ``evidence --config witness.yaml [--origin O] [--json]`` lists the validly
  signed submissions the witness refused (plain text, or one JSON array). Exit 0
  (also when there are none); 2 bad configuration or unreadable database.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from axid.witness import Evidence, WitnessConfig

app = typer.Typer(help="A C2SP tlog-witness: cosign the checkpoints of logs.", no_args_is_help=True)

_ConfigOpt = Annotated[Path, typer.Option("--config", help="Witness YAML config file.")]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config(path: Path) -> WitnessConfig:
    from axid import _yaml
    from axid.witness import WitnessConfigError, parse_config

    try:
        return parse_config(_yaml.read_yaml_file(path), path.resolve().parent)
    except (_yaml.YamlError, WitnessConfigError) as exc:
        _fail(f"{path}: {exc}", 2)


@app.command("init")
def init(
    name: Annotated[str, typer.Option("--name", help="Witness name, e.g. witness.example.org/w1.")],
    directory: Annotated[Path, typer.Option("--dir", help="Directory for the keys and vkeys.")],
    ml_dsa: Annotated[
        bool, typer.Option("--ml-dsa", help="Also an ML-DSA-44 key (subtree/v1 cosignatures).")
    ] = False,
) -> None:
    """Create the witness's keys (Ed25519, and ML-DSA-44 with --ml-dsa)."""
    from axid.witness.keys import WitnessKeyError, check_name, init_keys

    try:
        check_name(name)
    except WitnessKeyError as exc:
        _fail(str(exc), 2)
    try:
        keys = init_keys(directory, name, ml_dsa=ml_dsa)
    except WitnessKeyError as exc:
        _fail(str(exc), 1)
    for key in keys:
        typer.echo(key.vkey())


@app.command("serve")
def serve(
    config: _ConfigOpt,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve POST /add-checkpoint."""
    from sqlalchemy.exc import SQLAlchemyError

    from axid.witness import WitnessKeyError, WitnessStartupError, WitnessStoreError
    from axid.witness import serve as run

    cfg = _config(config)

    def ready(url: str) -> None:
        typer.echo(f"listening {url}")

    try:
        run(cfg, ready=ready, log_level=log_level)
    except (WitnessKeyError, WitnessStoreError, WitnessStartupError) as exc:
        _fail(str(exc), 1)
    except SQLAlchemyError as exc:
        _fail(f"state database: {type(exc).__name__}", 1)
    except OSError as exc:
        _fail(f"cannot start: {exc.strerror or exc}", 1)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _as_json(e: Evidence) -> dict[str, object]:
    return {
        "id": e.id,
        "origin": e.origin,
        "status": e.status,
        "reason": e.reason,
        "first_seen": _iso(e.first_seen),
        "last_seen": _iso(e.last_seen),
        "count": e.count,
        "body": e.body.decode("utf-8", errors="replace"),
    }


def _as_text(e: Evidence) -> str:
    times = "once" if e.count == 1 else f"{e.count} times, last {_iso(e.last_seen)}"
    head = f"#{e.id} {_iso(e.first_seen)} {e.origin} {e.status} {e.reason} ({times})"
    body = e.body.decode("utf-8", errors="replace")
    return head + "\n" + "".join(f"    {line}\n" for line in body.splitlines())


@app.command("evidence")
def evidence(
    config: _ConfigOpt,
    origin: Annotated[str | None, typer.Option("--origin", help="Only this log.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """List the validly signed checkpoints the witness refused (the request bodies)."""
    from sqlalchemy.exc import SQLAlchemyError

    from axid.witness import WitnessStore, WitnessStoreError

    cfg = _config(config)
    try:
        store = WitnessStore.open(cfg.database)
        try:
            rows = store.evidence(origin)
        finally:
            store.close()
    except WitnessStoreError as exc:
        _fail(str(exc), 2)
    except SQLAlchemyError as exc:
        _fail(f"state database: {type(exc).__name__}", 2)
    if as_json:
        typer.echo(json.dumps([_as_json(e) for e in rows], indent=2))
        return
    if not rows:
        typer.echo("no evidence")
    for e in rows:
        typer.echo(_as_text(e), nl=False)
