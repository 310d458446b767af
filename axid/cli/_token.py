"""`axid token`: an agent's client for minting, and offline/online verification.

``axid token mint`` asks the issuer over mTLS (the agent's SVID files) and prints
the token only. ``axid token verify`` checks a token exactly as a service would
(:func:`axid.tokens.verify`) and prints its claims as JSON.

Exit codes: 0 success; 1 the issuer refused (mint: ``REASON: detail`` on stderr)
or the token is invalid (verify: the reason code on stdout, details on stderr);
2 usage or I/O errors (unreadable files, a JWKS that cannot be fetched or parsed,
an unreachable issuer, an ``--issuer`` URL that is not ``https://HOST[:PORT]`` or
carries userinfo, a query or a fragment).

A token or parent token given as ``-`` is read from standard input, which keeps
it out of the process list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(help="Mint and verify action tokens.", no_args_is_help=True)

_MAX_JWKS_BYTES = 256 * 1024
_MAX_STDIN = 64 * 1024


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _token_arg(value: str, what: str) -> str:
    if value != "-":
        return value.strip()
    data = sys.stdin.read(_MAX_STDIN + 1)
    if len(data) > _MAX_STDIN:
        _fail(f"{what} on stdin is too large", 2)
    return data.strip()


def _source(cert: Path, key: Path, bundle: Path) -> Any:
    from mtls.sources import FileSource, SourceError

    try:
        return FileSource(cert, key, bundle)
    except SourceError as exc:
        _fail(f"cannot load the SVID: {exc}", 2)


@app.command("mint")
def mint(
    issuer: Annotated[str, typer.Option("--issuer", help="Issuer URL, https://HOST:PORT.")],
    cert: Annotated[Path, typer.Option("--cert", help="The agent's SVID certificate (PEM).")],
    key: Annotated[Path, typer.Option("--key", help="The agent's SVID private key (PEM).")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Trust bundle (PEM).")],
    agent: Annotated[str, typer.Option("--agent", help="Agent slug.")],
    run: Annotated[str, typer.Option("--run", help="Run id.")],
    aud: Annotated[list[str], typer.Option("--aud", help="Audience (repeat for several).")],
    scope: Annotated[str, typer.Option("--scope", help='Actions, e.g. "payments:read".')],
    parent: Annotated[
        str | None, typer.Option("--parent", help="Parent token ('-' reads stdin).")
    ] = None,
    ttl: Annotated[
        int | None, typer.Option("--ttl", min=1, max=300, help="Token lifetime, seconds.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Assert the tenant (refused if not ours).")
    ] = None,
    issuer_id: Annotated[
        str | None,
        typer.Option(
            "--issuer-id",
            help="Expected issuer SPIFFE ID or pattern "
            "(default spiffe://<trust domain>/axid/issuer).",
        ),
    ] = None,
) -> None:
    """Mint an action token for this agent workload; prints the token only."""
    from axid.issuer.client import IssuerClient, IssuerError, check_issuer_url

    # Refuse a non-https (or otherwise unsafe) URL before reading any parent token.
    try:
        check_issuer_url(issuer)
    except ValueError as exc:
        _fail(str(exc), 2)
    parent_token = _token_arg(parent, "parent token") if parent is not None else None
    source = _source(cert, key, bundle)
    try:
        client = IssuerClient(issuer, source, issuer_id=issuer_id)
    except (ValueError, TypeError) as exc:
        _fail(str(exc), 2)
    try:
        with client:
            result = client.mint(
                agent=agent,
                run=run,
                audience=aud[0] if len(aud) == 1 else list(aud),
                scope=scope,
                parent_token=parent_token,
                ttl_seconds=ttl,
                tenant=tenant,
            )
    except IssuerError as exc:
        typer.echo(f"{exc.reason}: {exc.detail}", err=True)
        raise typer.Exit(2 if exc.status is None else 1) from None
    finally:
        source.close()
    typer.echo(result.token)


def _fetch_jwks(
    url: str, cert: Path | None, key: Path | None, bundle: Path | None, issuer_id: str | None
) -> bytes:
    import httpx

    if not url.startswith("https://"):
        _fail("a JWKS URL must be https://", 2)
    if cert is not None or key is not None:
        if cert is None or key is None or bundle is None:
            _fail("--cert, --key and --bundle go together", 2)
        from axid.issuer.client import issuer_id_matcher
        from mtls.tlsconfig import client_context

        source = _source(cert, key, bundle)
        try:
            server_id = issuer_id_matcher(issuer_id, source)
        except ValueError as exc:
            _fail(str(exc), 2)
        verify: Any = client_context(source, server_id=server_id)
    else:
        verify = str(bundle) if bundle is not None else True
    try:
        with httpx.Client(verify=verify, timeout=10, trust_env=False) as http:
            response = http.get(url)
    except httpx.HTTPError as exc:
        _fail(f"cannot fetch the JWKS: {type(exc).__name__}: {exc}", 2)
    if response.status_code != 200:
        _fail(f"cannot fetch the JWKS: HTTP {response.status_code}", 2)
    return response.content


@app.command("verify")
def verify(
    token: Annotated[str, typer.Argument(help="The token ('-' reads stdin).")],
    jwks: Annotated[str, typer.Option("--jwks", help="JWKS file or https:// URL.")],
    iss: Annotated[str, typer.Option("--iss", help="Expected issuer (exact).")],
    aud: Annotated[str, typer.Option("--aud", help="This service's audience name.")],
    now: Annotated[
        float | None, typer.Option("--now", help="Verify at this Unix time (default: now).")
    ] = None,
    leeway: Annotated[int, typer.Option("--leeway", min=0, max=30, help="Seconds.")] = 0,
    cert: Annotated[Path | None, typer.Option("--cert", help="mTLS client SVID.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="mTLS client key.")] = None,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="CA bundle for an https JWKS URL (and mTLS)."),
    ] = None,
    issuer_id: Annotated[
        str | None, typer.Option("--issuer-id", help="Expected issuer SPIFFE ID (mTLS).")
    ] = None,
) -> None:
    """Verify a token; print its claims as JSON (exit 0) or the reason code (exit 1)."""
    from axid.keys import KeyringError, KeySet
    from axid.tokens import TokenError
    from axid.tokens import verify as verify_token

    value = _token_arg(token, "token")
    if jwks.startswith(("https://", "http://")):
        data = _fetch_jwks(jwks, cert, key, bundle, issuer_id)
    else:
        try:
            with Path(jwks).open("rb") as handle:
                data = handle.read(_MAX_JWKS_BYTES + 1)
        except OSError as exc:
            _fail(f"cannot read {jwks}: {exc.strerror or exc}", 2)
    try:
        keys = KeySet.from_jwks(data)
    except KeyringError as exc:
        _fail(f"invalid JWKS: {exc}", 2)
    try:
        claims = verify_token(value, keys, issuer=iss, audience=aud, now=now, leeway=leeway)
    except TokenError as exc:
        typer.echo(exc.reason)
        typer.echo(f"invalid token: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except (TypeError, ValueError) as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps(claims.to_json(), indent=2, sort_keys=True))
