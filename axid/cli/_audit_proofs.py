"""`axid audit export`, `proof`, `consistency` and `vkey`: what the log's store
hands out (an offline bundle, C2SP proofs, the verifier key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from axid.audit.verify import DatabaseSource
from axid.cli._audit_common import DbOpt, LogOpt, fail, open_log


def export(
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="New or empty directory for the bundle."),
    ],
    db: DbOpt = None,
    log: LogOpt = None,
) -> None:
    """Write an offline bundle: entries.jsonl, checkpoints/<size>, vkey."""
    from axid.audit.export import ExportError, export_bundle

    with open_log(db, log) as source:
        try:
            result = export_bundle(source.store, None, out)
        except ExportError as e:
            fail(str(e))
    typer.echo(
        f"exported log {result.log}: {result.entries} entries, {result.checkpoints} "
        f"checkpoints to {result.path}"
    )
    typer.echo(f"verify it offline with: axid audit verify {result.path} --vkey '{result.vkey}'")


_SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        min=0,
        help="The size of a stored checkpoint to prove against (default: the latest).",
        show_default=False,
    ),
]


def _stored_failure(e: Exception) -> NoReturn:
    """A proof that cannot be made from what is stored: say so (exit 2)."""
    if isinstance(e, KeyError):
        fail(f"the stored Merkle tree is incomplete (node {e}); run `axid audit verify`")
    fail(f"the stored checkpoint is malformed ({e}); run `axid audit verify`")


def proof(
    seq: Annotated[int, typer.Argument(help="The entry's seq.", min=0)],
    size: _SizeOpt = None,
    db: DbOpt = None,
    log: LogOpt = None,
) -> None:
    """Print a C2SP tlog-proof: entry SEQ's inclusion in a signed checkpoint.

    The checkpoint of size N with --size N, else the latest; exit 2 when there
    is no checkpoint of that size or SEQ is not below it.
    """
    from axid.audit.store import NotFound, proof_text

    with open_log(db, log) as source:
        try:
            hashes, note = source.store.inclusion_proof(seq, size)
        except NotFound as e:
            fail(str(e))
        except KeyError as e:
            _stored_failure(e)
        try:
            text = proof_text(seq, hashes, note)
        except ValueError as e:
            _stored_failure(e)
    typer.echo(text, nl=False)


def _consistency(source: DatabaseSource, old: int, size: int | None) -> str:
    """The consistency proof from size ``old`` to the checkpoint of ``size``, as text."""
    from axid.audit.store import NotFound, consistency_text

    name = source.log_name
    if size is None:
        if source.max_cp < 0:
            fail(f"log {name!r} has no checkpoint yet")
        size = source.max_cp
    note = source.store.checkpoint(size)
    if note is None:
        fail(f"log {name!r} has no checkpoint at size {size}")
    if old > size:
        fail(f"old size {old} is larger than the checkpoint's size {size}")
    try:
        hashes = source.store.consistency_proof(old, size)
    except NotFound as e:
        fail(str(e))
    except KeyError as e:
        _stored_failure(e)
    try:
        return consistency_text(old, hashes, note)
    except ValueError as e:
        _stored_failure(e)


def consistency(
    old: Annotated[int, typer.Argument(help="The older tree size to prove from.", min=0)],
    size: _SizeOpt = None,
    db: DbOpt = None,
    log: LogOpt = None,
) -> None:
    """Print the consistency proof from tree size OLD to a signed checkpoint.

    The checkpoint of size N with --size N, else the latest, in the C2SP
    tlog-witness add-checkpoint request form: "old OLD", one base64 hash a
    line, an empty line, the signed checkpoint. OLD 0 and OLD = N give an
    empty proof; exit 2 when there is no checkpoint of that size or OLD > N.
    """
    with open_log(db, log) as source:
        text = _consistency(source, old, size)
    typer.echo(text, nl=False)


def vkey_cmd(db: DbOpt = None, log: LogOpt = None) -> None:
    """Print the log's verifier key line (publish it; auditors pass it as --vkey)."""
    with open_log(db, log) as source:
        v = source.vkey()
    typer.echo(v)
