"""`axid audit`: the auditor's commands over the decision log.

Exit codes (the contract in DESIGN.md): 0 success / log intact, 1 tampering
found (``verify``; ``show`` and ``tree`` when a row read disagrees with its
entry bytes or an entry is malformed), 2 usage or I/O error (missing database
or bundle, unknown log or run, several logs without ``--log``, no key to verify
with, unreadable files, bad vkey, a size with no checkpoint). Click's own usage
errors also exit 2.
"""

from __future__ import annotations

import typer

from axid.cli._audit_proofs import consistency, export, proof, vkey_cmd
from axid.cli._audit_show import show, tree
from axid.cli._audit_verify import verify
from axid.cli._receipt import receipt_app

app = typer.Typer(help="Verify, export and inspect the decision log.", no_args_is_help=True)

# One module per command group; registered here in the order `axid audit --help` lists.
app.command()(verify)
app.command()(export)
app.command()(show)
app.command()(proof)
app.command()(consistency)
app.command()(tree)
app.command("vkey")(vkey_cmd)
app.add_typer(receipt_app, name="receipt")
