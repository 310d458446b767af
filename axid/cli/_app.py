"""Root of the `axid` command: each concept's sub-commands live in their own module."""

from __future__ import annotations

import typer

from axid.cli import (
    _approvals,
    _audit,
    _bench,
    _budget,
    _certs,
    _demo,
    _keys,
    _serve,
    _token,
    _witness,
)

app = typer.Typer(
    name="axid",
    help="AXID: verifiable identity and a tamper-evident record for AI agent actions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(_certs.app, name="certs")
app.add_typer(_approvals.app, name="approvals")
app.add_typer(_audit.app, name="audit")
app.add_typer(_budget.app, name="budget")
app.add_typer(_keys.app, name="keys")
app.add_typer(_token.app, name="token")
app.add_typer(_witness.app, name="witness")
app.command("serve")(_serve.serve)
app.command("bench")(_bench.bench)
app.command("demo")(_demo.demo)


def main() -> None:
    """Console-script entry point."""
    app()
