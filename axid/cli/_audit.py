"""`axid audit`: the auditor's commands over the decision log."""

from __future__ import annotations

import typer

app = typer.Typer(help="Verify, export and inspect the decision log.", no_args_is_help=True)
