"""`axid keys`: the issuer's Ed25519 token-signing keyring.

Exit codes: 0 done, 1 the keyring refused (missing, already exists, a key still
pending, bad passphrase, unsafe permissions), 2 usage errors (Click's own).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from axid.keys import DEFAULT_KEYS_DIR, DEFAULT_PUBLISH_LEAD, Keyring, KeyringError
from axid.tokens import MAX_TTL

app = typer.Typer(help="Token signing keys: init, rotate, list, JWKS.", no_args_is_help=True)

_DirOpt = Annotated[Path, typer.Option("--dir", help="Keyring directory.", show_default=True)]
_MaxTtlOpt = Annotated[
    int,
    typer.Option(
        "--max-ttl",
        min=1,
        max=MAX_TTL,
        help="Longest token TTL the issuer mints; retired keys stay published that long.",
    ),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(directory: Path) -> Keyring:
    try:
        return Keyring.load(directory)
    except KeyringError as exc:
        _fail(str(exc))


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@app.command("init")
def init(directory: _DirOpt = DEFAULT_KEYS_DIR) -> None:
    """Create a keyring with one signing key (refuses an existing keyring)."""
    try:
        ring = Keyring.init(directory, now=float(int(time.time())))
    except (KeyringError, OSError) as exc:
        _fail(str(exc))
    kid = ring.signing_key(time.time()).kid
    typer.echo(f"created keyring {directory} with current key {kid}")


@app.command("rotate")
def rotate(
    directory: _DirOpt = DEFAULT_KEYS_DIR,
    publish_lead: Annotated[
        float,
        typer.Option(
            "--publish-lead",
            min=0,
            help="Seconds the new key is published before it signs (> verifiers' JWKS cache).",
        ),
    ] = DEFAULT_PUBLISH_LEAD,
) -> None:
    """Publish a new key now; it signs after the publish lead."""
    ring = _load(directory)
    now = time.time()
    try:
        kid = ring.rotate(now, publish_lead=publish_lead)
    except (KeyringError, ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"published key {kid}; it signs from {_iso(now + publish_lead)}")


@app.command("list")
def list_keys(
    directory: _DirOpt = DEFAULT_KEYS_DIR,
    max_ttl: _MaxTtlOpt = MAX_TTL,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Every key with its state (current, next, retired, expired)."""
    ring = _load(directory)
    infos = ring.keys(time.time(), max_token_ttl=max_ttl)
    if as_json:
        typer.echo(json.dumps({"keys": [i.to_json() for i in infos]}, indent=2))
        return
    typer.echo(f"{'KID':<44} {'STATE':<8} {'PUBLISHED':<21} {'SIGNS FROM':<21} UNPUBLISHED AT")
    for i in infos:
        typer.echo(
            f"{i.kid:<44} {i.state!s:<8} {_iso(i.published_at):<21} "
            f"{_iso(i.active_from):<21} {_iso(i.unpublish_at)}"
        )


@app.command("jwks")
def jwks(directory: _DirOpt = DEFAULT_KEYS_DIR, max_ttl: _MaxTtlOpt = MAX_TTL) -> None:
    """Print the JWKS the issuer serves now (current + next + still-valid retired keys)."""
    ring = _load(directory)
    typer.echo(json.dumps(ring.jwks(time.time(), max_token_ttl=max_ttl), indent=2))
