"""`axid certs`: the development PKI."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mtls.devpki import (
    DEV_WORKLOADS,
    DevPkiError,
    DevPkiExistsError,
    init_dev_pki,
    load_dev_pki,
)
from mtls.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

app = typer.Typer(help="Development PKI: a dev CA and X.509-SVIDs.", no_args_is_help=True)

# markup off: paths and IDs are printed as given, never interpreted.
_out = Console(highlight=False, markup=False)
_err = Console(stderr=True, highlight=False, markup=False)

_TTL_RE = re.compile(r"([1-9][0-9]{0,5})([smhd])")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _TtlError(ValueError):
    pass


def _parse_ttl(value: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d`` -> timedelta (a positive integer and one unit)."""
    m = _TTL_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise _TtlError(
            f"invalid TTL {value!r}: expected a positive integer and a unit s, m, h or d "
            "(e.g. 90s, 15m, 1h, 2d)"
        )
    return timedelta(seconds=int(m.group(1)) * _TTL_UNITS[m.group(2)])


def _fail(message: str, code: int) -> typer.Exit:
    _err.print("error:", message, style="bold red", soft_wrap=True)
    return typer.Exit(code)


def _ttl_or_exit(value: str) -> timedelta:
    try:
        return _parse_ttl(value)
    except _TtlError as e:
        raise _fail(str(e), 2) from None


@app.command("init")
def init(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory to write the dev PKI into.")
    ] = Path("certs"),
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="SPIFFE trust domain of the dev CA.")
    ] = "example.org",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing dev PKI.")] = False,
    ttl: Annotated[str, typer.Option("--ttl", help="SVID lifetime: 90s, 15m, 1h, 2d.")] = "24h",
) -> None:
    """Write a dev CA, bundle.pem and SVIDs for issuer, payments, planner and worker."""
    svid_ttl = _ttl_or_exit(ttl)
    try:
        td = TrustDomain.parse(trust_domain)
    except SpiffeIdError as e:
        raise _fail(f"invalid trust domain {trust_domain!r}: {e}", 2) from None
    try:
        pki = init_dev_pki(directory, td.name, force=force, svid_ttl=svid_ttl)
    except DevPkiExistsError as e:
        raise _fail(str(e), 1) from None
    except (DevPkiError, OSError) as e:
        raise _fail(str(e), 1) from None

    _out.print(f"dev PKI for trust domain {td.name} written:", style="bold")
    rows = [
        (pki.ca_cert, "dev CA certificate"),
        (pki.ca_key, "dev CA private key (0600)"),
        (pki.bundle, "trust bundle"),
    ]
    for name in DEV_WORKLOADS:
        rows.append((pki.cert(name), f"X.509-SVID {pki.spiffe_id(name)}"))
        rows.append((pki.key(name), f"private key of {name} (0600)"))
    for path, what in rows:
        # One line per file, never wrapped, so the output stays greppable.
        _out.print(f"  {path}  {what}", soft_wrap=True)
    _out.print(
        f"SVIDs valid for {svid_ttl}; "
        f"CA valid until {pki.ca.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        soft_wrap=True,
    )


@app.command("issue")
def issue(
    spiffe_id: Annotated[str, typer.Argument(help="SPIFFE ID, e.g. spiffe://example.org/agent/x")],
    out: Annotated[
        str, typer.Option("--out", help="Output prefix: writes PREFIX.pem and PREFIX.key.")
    ],
    ttl: Annotated[str, typer.Option("--ttl", help="SVID lifetime: 90s, 15m, 1h, 2d.")] = "1h",
    directory: Annotated[
        Path, typer.Option("--dir", help="Dev PKI directory holding ca.pem and ca.key.")
    ] = Path("certs"),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite existing PREFIX.pem / PREFIX.key.")
    ] = False,
) -> None:
    """Issue an X.509-SVID signed by the dev CA."""
    svid_ttl = _ttl_or_exit(ttl)
    try:
        sid = SpiffeId.parse(spiffe_id)
    except SpiffeIdError as e:
        raise _fail(f"invalid SPIFFE ID {spiffe_id!r}: {e}", 2) from None
    if not sid.path:
        raise _fail(f"invalid SPIFFE ID {spiffe_id!r}: names no workload [empty_path]", 2)
    try:
        pki = load_dev_pki(directory)
    except DevPkiError as e:
        raise _fail(str(e), 1) from None
    if not sid.member_of(pki.trust_domain):
        raise _fail(
            f"{sid} is outside the dev CA's trust domain {pki.trust_domain.name} "
            "[trust_domain_mismatch]",
            2,
        )
    cert_path, key_path = Path(out + ".pem"), Path(out + ".key")
    if not force:
        for p in (cert_path, key_path):
            if p.exists() or p.is_symlink():
                raise _fail(f"{p} already exists; use --force to overwrite", 1)
    try:
        svid = pki.ca.issue_svid(sid, ttl=svid_ttl)
        if not cert_path.parent.is_dir():
            raise DevPkiError(f"directory {cert_path.parent} does not exist")
        svid.write(out)
    except (DevPkiError, OSError) as e:
        raise _fail(str(e), 1) from None
    _out.print(
        f"issued {sid}, valid until {svid.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        soft_wrap=True,
    )
    _out.print(f"  {cert_path}  X.509-SVID", soft_wrap=True)
    _out.print(f"  {key_path}  private key (0600)", soft_wrap=True)
