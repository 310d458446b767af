"""`axid certs`: the development PKI."""

from __future__ import annotations

import typer

app = typer.Typer(help="Development PKI: a dev CA and X.509-SVIDs.", no_args_is_help=True)
