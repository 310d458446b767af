"""`axid approvals`: an approver's (and a waiting agent's) client for approval requests.

Each command talks to the issuer over mTLS with the caller's own SVID (the
connection options of ``axid token mint``: ``--issuer --cert --key --bundle``):

* ``list [--status pending]``: one line per request (id, status, method, path,
  service, agent, run, expiry), or ``--json``;
* ``show ID``: the request as JSON (the token left out);
* ``approve ID [--note ...]`` / ``deny ID [--note ...]``: decide (approvers only,
  never the request's own agent); prints the decided request as JSON;
* ``wait ID [--interval S] [--timeout S]``: poll as the requesting agent; prints the
  approval token and exits 0 once approved; exits 1 printing no token once denied or
  expired (or when ``--timeout`` passes first).

Exit codes: 0 success; 1 the issuer refused (``REASON: detail`` on stderr), or
``wait`` ended without an approval; 2 usage, I/O or an unreachable issuer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

app = typer.Typer(help="List, show, approve, deny and wait for approval requests.")

_T = TypeVar("_T")

Issuer = Annotated[str, typer.Option("--issuer", help="Issuer URL, https://HOST:PORT.")]
Cert = Annotated[Path, typer.Option("--cert", help="Your SVID certificate (PEM).")]
Key = Annotated[Path, typer.Option("--key", help="Your SVID private key (PEM).")]
Bundle = Annotated[Path, typer.Option("--bundle", help="Trust bundle (PEM).")]
IssuerId = Annotated[
    str | None, typer.Option("--issuer-id", help="Expected issuer SPIFFE ID or pattern.")
]
Note = Annotated[str | None, typer.Option("--note", help="Why (recorded with the decision).")]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _call(
    issuer: str,
    cert: Path,
    key: Path,
    bundle: Path,
    issuer_id: str | None,
    action: Callable[[Any], _T],
) -> _T:
    """Run ``action(client)`` over one mTLS connection, mapping failures to exits."""
    from axid.issuer.client import IssuerClient, IssuerError, check_issuer_url
    from mtls.sources import FileSource, SourceError

    try:
        check_issuer_url(issuer)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        source = FileSource(cert, key, bundle)
    except SourceError as exc:
        _fail(f"cannot load the SVID: {exc}", 2)
    try:
        with IssuerClient(issuer, source, issuer_id=issuer_id) as client:
            return action(client)
    except IssuerError as exc:
        typer.echo(f"{exc.reason}: {exc.detail}", err=True)
        raise typer.Exit(2 if exc.status is None else 1) from None
    except ValueError as exc:
        _fail(str(exc), 2)
    finally:
        source.close()


def _line(item: dict[str, Any]) -> str:
    req = item.get("req") or {}
    return "  ".join(
        str(x)
        for x in (
            item.get("id"),
            item.get("status"),
            req.get("method"),
            req.get("path"),
            item.get("service"),
            item.get("agent"),
            item.get("run"),
            f"expires_at={item.get('expires_at')}",
        )
    )


@app.command("list")
def list_(
    issuer: Issuer,
    cert: Cert,
    key: Key,
    bundle: Bundle,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, approved, denied or expired.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    issuer_id: IssuerId = None,
) -> None:
    """List the approval requests you may decide."""
    items = _call(issuer, cert, key, bundle, issuer_id, lambda c: c.approvals(status))
    if as_json:
        typer.echo(json.dumps(items, indent=2, sort_keys=True))
        return
    for item in items:
        typer.echo(_line(item))


@app.command("show")
def show(
    approval_id: Annotated[str, typer.Argument(metavar="ID")],
    issuer: Issuer,
    cert: Cert,
    key: Key,
    bundle: Bundle,
    issuer_id: IssuerId = None,
) -> None:
    """Show one approval request (JSON, without its token)."""
    doc = _call(issuer, cert, key, bundle, issuer_id, lambda c: c.approval(approval_id))
    doc.pop("token", None)
    typer.echo(json.dumps(doc, indent=2, sort_keys=True))


def _decision_command(decision: str, summary: str) -> Callable[..., None]:
    """The ``approve`` or ``deny`` command: the same options, one decision."""

    def command(
        approval_id: Annotated[str, typer.Argument(metavar="ID")],
        issuer: Issuer,
        cert: Cert,
        key: Key,
        bundle: Bundle,
        note: Note = None,
        issuer_id: IssuerId = None,
    ) -> None:
        doc = _call(
            issuer, cert, key, bundle, issuer_id, lambda c: c.decide(approval_id, decision, note)
        )
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))

    command.__doc__ = summary
    return command


approve = app.command("approve")(
    _decision_command("approve", "Approve one request (exactly the request it describes, once).")
)
deny = app.command("deny")(_decision_command("deny", "Deny one request."))


@app.command("wait")
def wait(
    approval_id: Annotated[str, typer.Argument(metavar="ID")],
    issuer: Issuer,
    cert: Cert,
    key: Key,
    bundle: Bundle,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds.")] = 2.0,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Give up after (seconds).")
    ] = None,
    issuer_id: IssuerId = None,
) -> None:
    """Wait as the requesting agent: print the approval token once approved (exit 0);
    exit 1 with no token once denied or expired."""

    def poll(client: Any) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            doc = client.approval(approval_id)
            status = doc["status"]
            if status == "approved" and isinstance(doc.get("token"), str):
                return str(doc["token"])
            if status != "pending":
                typer.echo(f"approval {approval_id} {status}", err=True)
                return None
            if deadline is not None and time.monotonic() >= deadline:
                typer.echo(f"approval {approval_id} still pending", err=True)
                return None
            time.sleep(interval)

    token = _call(issuer, cert, key, bundle, issuer_id, poll)
    if token is None:
        raise typer.Exit(1)
    typer.echo(token)
