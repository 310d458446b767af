"""`axid budget show`: what spawn trees and tenants spent, against their limits.

Reads the table of :class:`verifier.BudgetLedger` (``axid_budget``). Exit codes: 0
printed (also when nothing is recorded), 1 the database could not be read, 2 usage
errors (Click's own).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:  # the verifier and the database layer load when the command runs
    from verifier.budget import BudgetRow

app = typer.Typer(help="Budgets shared by every verifier replica.", no_args_is_help=True)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _row_json(row: BudgetRow) -> dict[str, object]:
    return {
        "kind": row.kind,
        "name": row.name,
        "day": row.day or None,
        "spent": row.spent,
        "limit": row.limit,
        "left": row.left,
        "updated_at": row.updated_at,
    }


@app.command("show")
def show(
    db: Annotated[str, typer.Option("--db", help="The ledger's database URL.")],
    tree: Annotated[
        str | None, typer.Option("--tree", metavar="RUN", help="Only this spawn tree (root run).")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant (every day).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Spend against limits, per spawn tree and per tenant and UTC day."""
    from sqlalchemy.exc import SQLAlchemyError

    from axid.audit.store import StoreError
    from verifier.budget import read_budgets

    try:
        rows = read_budgets(db, tree=tree, tenant=tenant)
    except ValueError as exc:  # a malformed URL, tree or tenant
        _fail(str(exc))
    except (SQLAlchemyError, StoreError, OSError) as exc:
        _fail(f"cannot read the budget table ({type(exc).__name__})")
    if as_json:
        typer.echo(json.dumps({"budgets": [_row_json(r) for r in rows]}, indent=2))
        return
    if not rows:
        typer.echo("no budget spent yet")
        return
    width = max(len(r.name) for r in rows)
    typer.echo(f"{'KIND':<7} {'NAME':<{width}} {'DAY':<10} {'SPENT':>14} {'LIMIT':>14} LEFT")
    for r in rows:
        limit = "-" if r.limit is None else str(r.limit)
        left = "-" if r.left is None else str(r.left)
        typer.echo(
            f"{r.kind:<7} {r.name:<{width}} {r.day or '-':<10} {r.spent:>14} {limit:>14} {left}"
        )
