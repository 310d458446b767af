"""`axid demo`: the whole story on loopback (see :mod:`axid.demo.run`).

Exit codes: 0 every step did what it should, both decision logs verify with the
witness's cosignature of their latest checkpoint (``axid audit verify --witness
... --quorum 1``) and the refund's receipt checks (``axid audit receipt check``)
(with ``--keep-running``: then stopped by SIGINT/SIGTERM); 1 a step, the
verification, the witnessing or the receipt check failed, or a server did not
start; 2 bad arguments (a non-empty ``--dir``, an invalid
trust domain); 128+N stopped by signal N before the story ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Keep the PKI, keys and database here (a new or empty directory); "
            "default: a temporary directory removed at the end.",
        ),
    ] = None,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running",
            help="After the story, keep the witness, the issuer and payments up "
            "(Ctrl-C stops them).",
        ),
    ] = False,
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="SPIFFE trust domain of the dev PKI.")
    ] = "example.org",
) -> None:
    """Play the AXID story on loopback: a witness, the issuer, a governed service,
    agents, the audit."""
    from axid.demo.provisioning import DemoError, DemoUsageError
    from axid.demo.run import run_demo

    try:
        code = run_demo(directory, keep_running=keep_running, trust_domain=trust_domain)
    except DemoUsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except DemoError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
