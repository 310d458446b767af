"""What the `axid audit` commands share: the database options, opening the logs
(every failure a usage/IO error, exit 2), the exit codes, and safe text cells."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer

from axid.audit.verify import DatabaseSource, VerifyUsageError

DEFAULT_DB = "sqlite:///.axid/axid.db"
EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2

DbOpt = Annotated[
    str | None,
    typer.Option("--db", help=f"Database URL (default {DEFAULT_DB}).", show_default=False),
]
LogOpt = Annotated[
    str | None,
    typer.Option("--log", help="Log name; needed only when the database holds several logs."),
]
# `audit verify` and `audit receipt check`: the witnesses a quorum counts.
WitnessOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--witness",
        metavar="VKEY_OR_FILE",
        help="A witness's vkey (or a file holding it): type 0x04 (Ed25519) or 0x06 "
        "(ML-DSA-44). Repeatable; with --quorum.",
        show_default=False,
    ),
]


def fail(msg: str, *, as_json: bool = False) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": msg}))
    raise typer.Exit(EXIT_USAGE)


@contextmanager
def open_logs(
    db: str | None, log: str | None, *, every_log: bool = False, as_json: bool = False
) -> Iterator[list[DatabaseSource]]:
    """Open the log ``log`` (or, with ``every_log`` and no ``log``, every log in the
    database); any way that fails is a usage/IO error (exit 2)."""
    url = db or DEFAULT_DB
    try:
        if every_log and log is None:
            sources = DatabaseSource.open_all(url)
        else:
            sources = [DatabaseSource(url, log)]
    except VerifyUsageError as e:
        fail(str(e), as_json=as_json)
    try:
        yield sources
    except VerifyUsageError as e:
        fail(str(e), as_json=as_json)
    except Exception as e:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(e, SQLAlchemyError):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail(f"cannot read the database: {first}", as_json=as_json)
        raise
    finally:
        for source in sources:
            source.close()


@contextmanager
def open_log(db: str | None, log: str | None, *, as_json: bool = False) -> Iterator[DatabaseSource]:
    """Open one log (``--log``, or the database's only one)."""
    with open_logs(db, log, as_json=as_json) as sources:
        yield sources[0]


def log_names(sources: list[DatabaseSource]) -> list[str]:
    return [str(s.log_name) for s in sources]


def counted(n: int, noun: str, nouns: str | None = None) -> str:
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


# C0 and C1 controls and DEL: shown as \xNN, never sent to the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cell(value: object) -> Any:
    """A stored value as literal text: rich markup (``[/]``, ``[conceal]``), emoji
    codes and terminal control characters in it are shown, never interpreted."""
    from rich.text import Text

    return Text(_UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))
