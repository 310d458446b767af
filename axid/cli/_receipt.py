"""`axid audit receipt check`: does the log still hold a receipted decision?

The receipt (an ``AXID-Receipt`` header value) must verify with ``--vkey``;
then the log's answers are fetched, from its database (``--db``) or from the
public read routes of the issuer or a service (``--url``), and checked by
:func:`axid.audit.receipt_check.check_receipt`.

With ``--witness VKEY ... --quorum K`` the receipt's checkpoint must also be
consistent with a checkpoint of the same or a larger size cosigned by K of the
witnesses: the receipt's own (sync witnessing), the log's latest as served, or
(``--db``) the newest stored checkpoint of at least its size with a quorum of
cosignatures. Over ``--url`` only the notes the read routes serve count.

Exit codes: 0 the log holds exactly that entry and its latest checkpoint
extends the receipt's (and, with a quorum, a witnessed checkpoint does); 1 it
does not (both signed views are printed: evidence of a rewrite, a rollback or
a fork), a cosignature by a given witness does not verify, or no witnessed
checkpoint extends the receipt's; 2 usage or I/O error, including a
malformed receipt, a receipt that does not verify with the vkey (it is then
not a receipt of this log and says nothing about it), an unreachable log and
an answer that is not a proof.
"""

from __future__ import annotations

import re
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from axid.audit.cosignature import CosignatureError
from axid.audit.merkle import ProofError
from axid.audit.note import Checkpoint, NoteVerifier
from axid.audit.quorum import QuorumError, WitnessPolicy
from axid.audit.receipt import Receipt, ReceiptError, checkpoint_of, receipt_from_text
from axid.audit.receipt_check import (
    ConsistencyProof,
    InclusionProof,
    LogEvidence,
    Missing,
    ReceiptCheck,
    ReceiptFailure,
    StoredEntry,
    check_receipt,
    open_receipt,
    parse_consistency_proof,
    parse_inclusion_proof,
)
from axid.cli._audit_common import DEFAULT_DB, WitnessOpt

if TYPE_CHECKING:
    import httpx

    from axid.audit.store import LogStore
    from axid.audit.verify import DatabaseSource

receipt_app = typer.Typer(help="Check the receipts callers keep of recorded decisions.")

EXIT_OK = 0
EXIT_NOT_HELD = 1
EXIT_USAGE = 2
_MAX_RECEIPT_FILE = 256 * 1024
_MAX_ANSWER = (1 << 20) + 16 * 1024  # a checkpoint note (at most 1 MiB) and proof lines
_TIMEOUT = 10.0
_UNPRINTABLE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


# --------------------------------------------------------------------------- the receipt


def _read_receipt(file: str) -> Receipt:
    """The receipt in FILE (``-``: standard input): a header line or its bare value."""
    try:
        if file == "-":
            raw = sys.stdin.buffer.read(_MAX_RECEIPT_FILE + 1)
        else:
            with Path(file).open("rb") as f:
                raw = f.read(_MAX_RECEIPT_FILE + 1)
    except OSError as e:
        _fail(f"cannot read {file}: {e.strerror or e}")
    if len(raw) > _MAX_RECEIPT_FILE:
        _fail(f"{file} is larger than a receipt can be")
    if not raw.isascii():
        _fail(f"{file} is not ASCII: not an AXID-Receipt header")
    try:
        return receipt_from_text(raw.decode("ascii"))
    except ReceiptError as e:
        _fail(f"bad receipt in {file}: {e}")


def _verifier(vkey: str) -> NoteVerifier:
    from axid.audit.verify import VerifyUsageError, load_vkey_arg

    try:
        return NoteVerifier.from_vkey(load_vkey_arg(vkey))
    except VerifyUsageError as e:
        _fail(str(e))


def _policy(witness: list[str], quorum: int | None) -> WitnessPolicy | None:
    from axid.audit.verify import VerifyUsageError, load_witness_arg

    try:
        return WitnessPolicy.from_options([load_witness_arg(w) for w in witness], quorum)
    except (VerifyUsageError, QuorumError) as e:
        _fail(str(e))


# --------------------------------------------------------------------------- from the database


def _log_of(db: str, origin: str) -> str | None:
    """The database's log whose stored origin is ``origin`` (the vkey's name), else
    None (then :func:`_database` takes the only log, or says which are there)."""
    from sqlalchemy.exc import SQLAlchemyError

    from axid.audit._store_engine import log_with_origin
    from axid.audit.sources import open_database
    from axid.audit.verify import VerifyUsageError

    try:
        engine = open_database(db)
    except VerifyUsageError:
        return None  # _database reports it
    try:
        return log_with_origin(engine, origin)  # one query, however many logs it holds
    except SQLAlchemyError:
        return None  # _database reports it
    finally:
        engine.dispose()


@contextmanager
def _database(db: str, log: str | None) -> Iterator[DatabaseSource]:
    """The log in the database; failing to read it is exit 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from axid.audit.verify import DatabaseSource, VerifyUsageError

    try:
        source = DatabaseSource(db, log)
    except VerifyUsageError as e:
        _fail(str(e))
    try:
        yield source
    except VerifyUsageError as e:
        _fail(str(e))
    except SQLAlchemyError as e:
        _fail(f"cannot read the database: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    finally:
        source.close()


def _from_database(
    store: LogStore,
    seq: int,
    size: int,
    source: DatabaseSource | None = None,
    policy: WitnessPolicy | None = None,
) -> LogEvidence:
    """What the database holds about entry ``seq`` of the tree of ``size``; with a
    witness ``policy``, the latest note with its stored cosignatures and the proof
    to the newest stored checkpoint cosigned by the quorum (read from ``source``)."""
    note = store.latest_checkpoint()
    if note is not None and policy is not None:
        latest_size = _size_of(note)
        note = (store.cosigned_note(latest_size) if latest_size is not None else None) or note
    latest = Missing("it has no checkpoint") if note is None else note
    witnessed = None
    if source is not None and policy is not None:
        witnessed = _db_witnessed(source, size, policy)
    return LogEvidence(
        latest=latest,
        inclusion=_db_inclusion(store, seq, size),
        consistency=_db_consistency(store, size, latest),
        entry=_db_entry(store, seq),
        witnessed=witnessed,
    )


_TREE_ERRORS: tuple[type[Exception], ...] = (KeyError, ProofError)


def _db_inclusion(store: LogStore, seq: int, size: int) -> InclusionProof | Missing:
    from axid.audit.store import StoreError

    try:
        hashes, note = store.inclusion_proof(seq, size)
    except StoreError as e:  # NotFound: no checkpoint of that size; or a malformed node
        return Missing(str(e))
    except _TREE_ERRORS as e:
        return Missing(f"its stored tree lacks node {e}")
    return InclusionProof(seq, tuple(hashes), note)


def _db_consistency(
    store: LogStore, old: int, latest: bytes | Missing
) -> ConsistencyProof | Missing:
    from axid.audit.store import StoreError

    if isinstance(latest, Missing):
        return latest
    size = _size_of(latest)
    if size is None or size < old:
        return Missing("its latest checkpoint is malformed or older")
    try:
        hashes = store.consistency_proof(old, size)
    except StoreError as e:  # NotFound: fewer entries stored than the checkpoint says
        return Missing(str(e))
    except _TREE_ERRORS as e:
        return Missing(f"its stored tree lacks node {e}")
    return ConsistencyProof(old, tuple(hashes), latest)


def _db_witnessed(
    source: DatabaseSource, old: int, policy: WitnessPolicy
) -> ConsistencyProof | Missing | None:
    """The consistency proof from ``old`` to the newest stored checkpoint of at least
    that size cosigned by the quorum (its note with its stored cosignatures); or to
    the first one whose cosignature by a given witness does not verify, for the
    check to report. None when there is neither."""
    found: tuple[int, bytes] | None = None
    for size, note in source.checkpoints():
        if size < old:
            continue
        try:
            cp = checkpoint_of(note)
            if not policy.met_by(policy.cosigners(note, cp)):
                continue
        except ReceiptError:
            continue  # not a checkpoint note: no candidate (`axid audit verify` reports it)
        except CosignatureError:
            found = (size, note)
            break
        found = (size, note)
    if found is None:
        return None
    return _db_consistency(source.store, old, found[1])


def _db_entry(store: LogStore, seq: int) -> StoredEntry | Missing:
    rows = list(store.entries(seq, seq + 1))
    if not rows:
        return Missing("its entry row is gone")
    _, data, leaf = rows[0]
    return StoredEntry(bytes(data), bytes(leaf))


def _size_of(note: bytes) -> int | None:
    """The size a checkpoint note claims (unverified), None if it is not one."""
    try:
        return checkpoint_of(note).size
    except ReceiptError:
        return None


# --------------------------------------------------------------------------- from the read routes


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes


def _base_url(url: str) -> str:
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        _fail(f"--url {url!r}: {e}")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        _fail(f"--url {url!r}: want http(s)://HOST[:PORT]/PREFIX")
    if parsed.query or parsed.fragment or parsed.userinfo:
        _fail(f"--url {url!r}: no query, fragment or userinfo")
    return url.rstrip("/")


def _tls(https: bool, cert: Path | None, key: Path | None, bundle: Path | None) -> ssl.SSLContext:
    """Verify the server against ``bundle`` (else the system's CAs) and its host name;
    present ``cert``/``key`` when given (mTLS)."""
    if not https and (cert or key or bundle):
        _fail("--cert, --key and --bundle need an https:// --url")
    if (cert is None) != (key is None):
        _fail("--cert and --key go together")
    try:
        ctx = ssl.create_default_context(cafile=str(bundle) if bundle else None)
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        _fail(f"cannot load the TLS files: {e}")
    return ctx


def _get(client: httpx.Client, url: str, params: dict[str, int]) -> _Answer:
    import httpx

    try:
        with client.stream("GET", url, params=params) as r:
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > _MAX_ANSWER:
                    _fail(f"GET {url}: the answer is too large")
            return _Answer(r.status_code, bytes(body))
    except httpx.HTTPError as e:
        _fail(f"GET {url}: {str(e) or type(e).__name__}")


def _proof_answer(answer: _Answer, url: str) -> bytes | Missing:
    """A 200 answer's body; a 404 is the log saying it has no such proof."""
    if answer.status == 404:
        return Missing(f"GET {url}: 404 {_excerpt(answer.body)}")
    if answer.status != 200:
        _fail(f"GET {url}: HTTP {answer.status} {_excerpt(answer.body)}")
    return answer.body


def _excerpt(body: bytes) -> str:
    return _UNPRINTABLE.sub("?", body[:200].decode("utf-8", "replace").replace("\n", " "))


def _from_routes(client: httpx.Client, base: str, origin: str, seq: int, size: int) -> LogEvidence:
    """What the read routes at ``base`` answer about entry ``seq`` of ``size`` of log ``origin``."""
    url = f"{base}/checkpoint"
    answer = _get(client, url, {})
    if answer.status != 200:
        _fail(f"GET {url}: HTTP {answer.status} (is --url the log's read-route prefix?)")
    latest = answer.body
    try:
        served = checkpoint_of(latest)
    except ReceiptError:
        _fail(f"GET {url}: the answer is not a checkpoint note")
    if served.origin != origin:
        _fail(f"GET {url}: the checkpoint is of log {served.origin}, the vkey is {origin}")
    newest = served.size
    url = f"{base}/proof"
    raw = _proof_answer(_get(client, url, {"seq": seq, "size": size}), url)
    inclusion = raw if isinstance(raw, Missing) else _parsed(parse_inclusion_proof, raw, url)
    consistency: ConsistencyProof | Missing = Missing("its latest checkpoint is older")
    if newest >= size:
        url = f"{base}/consistency"
        raw = _proof_answer(_get(client, url, {"old": size, "size": newest}), url)
        consistency = (
            raw if isinstance(raw, Missing) else _parsed(parse_consistency_proof, raw, url)
        )
    return LogEvidence(latest, inclusion, consistency)


_P = TypeVar("_P", InclusionProof, ConsistencyProof)


def _parsed(parse: Callable[[bytes], _P], body: bytes, url: str) -> _P:
    """A proof text parsed strictly; an answer that is not one is exit 2."""
    try:
        return parse(body)
    except ReceiptError as e:
        _fail(f"GET {url}: the answer is not a proof: {e}")


# --------------------------------------------------------------------------- output


def _printable(note: bytes) -> str:
    """A note as text, control characters (but newlines) shown as ``\\xNN``."""
    text = note.decode("utf-8", "replace")
    text = text if text.endswith("\n") else text + "\n"
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _describe(cp: Checkpoint) -> str:
    import base64

    return f"size {cp.size}, root {base64.b64encode(cp.root).decode('ascii')}"


def _report(receipt: Receipt, result: ReceiptCheck) -> int:
    if isinstance(result, ReceiptFailure):
        typer.echo(f"{'NOT WITNESSED' if result.unwitnessed else 'NOT HELD'}: {result.what}")
        typer.echo(f"entry:    {receipt.seq}")
        typer.echo("the receipt's signed checkpoint:")
        typer.echo(_printable(result.receipt_note), nl=False)
        if result.log_note is None:
            typer.echo("the log's signed checkpoint: none served")
        else:
            typer.echo("the log's signed checkpoint (as served):")
            typer.echo(_printable(result.log_note), nl=False)
        return EXIT_NOT_HELD
    typer.echo("OK: the log holds the receipted entry and extends the receipted checkpoint")
    typer.echo(f"entry:    {receipt.seq}")
    typer.echo(f"receipt:  {_describe(result.checkpoint)}")
    typer.echo(f"latest:   {_describe(result.latest)}")
    if result.witnessed is not None:
        typer.echo(
            f"witnessed: {_describe(result.witnessed)}, cosigned by {', '.join(result.cosigners)}"
        )
    typer.echo("the log's latest signed checkpoint:")
    typer.echo(_printable(result.latest_note), nl=False)
    return EXIT_OK


# --------------------------------------------------------------------------- the command


_ReceiptArg = Annotated[
    str,
    typer.Argument(
        help="A file (- for standard input) holding the receipt: the line "
        "'AXID-Receipt: ...' or just its value.",
        show_default=False,
    ),
]
_VkeyOpt = Annotated[
    str,
    typer.Option(
        "--vkey",
        metavar="VKEY_OR_FILE",
        help="The log's verifier key, obtained out of band (or a file holding it).",
        show_default=False,
    ),
]
_DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"Read the log from this database (the default when --url is not given: "
        f"{DEFAULT_DB}).",
        show_default=False,
    ),
]
_LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log",
        help="With --db: the log's name (default: the log whose origin is the vkey's "
        "name, else the database's only log).",
    ),
]
_UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        metavar="BASE",
        help="Read the log from its public read routes instead: BASE is their prefix, "
        "to which /checkpoint, /proof and /consistency are appended, e.g. "
        "https://127.0.0.1:8443/v1/audit (the issuer) or "
        "https://127.0.0.1:9443/.well-known/axid/log (a service).",
        show_default=False,
    ),
]
_CertOpt = Annotated[
    Path | None,
    typer.Option("--cert", help="With https --url: client certificate (PEM) for mTLS."),
]
_KeyOpt = Annotated[Path | None, typer.Option("--key", help="With --cert: its private key (PEM).")]
_BundleOpt = Annotated[
    Path | None,
    typer.Option(
        "--bundle",
        help="With https --url: CA certificates (PEM) to verify the server with "
        "(default: the system's); the server's certificate must name BASE's host.",
    ),
]
_QuorumOpt = Annotated[
    int | None,
    typer.Option(
        "--quorum",
        metavar="K",
        help="Require the receipt's checkpoint to be consistent with one of the same or "
        "a larger size cosigned by K distinct witnesses among --witness.",
        show_default=False,
    ),
]


@receipt_app.command()
def check(
    file: _ReceiptArg,
    vkey: _VkeyOpt,
    db: _DbOpt = None,
    log: _LogOpt = None,
    url: _UrlOpt = None,
    cert: _CertOpt = None,
    key: _KeyOpt = None,
    bundle: _BundleOpt = None,
    witness: WitnessOpt = None,
    quorum: _QuorumOpt = None,
) -> None:
    """Check a receipt: does the log still hold exactly that entry and extend its checkpoint?

    The receipt's checkpoint must verify with --vkey. Then the log's inclusion
    proof of the entry at the receipt's size, its latest signed checkpoint and
    the consistency proof from the receipt's size to the latest are checked;
    with --db the stored entry must also be the receipt's bytes (the read
    routes serve proofs, not entries: over --url a rewritten entry row shows
    only where a proof reads the tree above it; `axid audit verify` sees all).

    With --witness ... --quorum K, the receipt's checkpoint must also be
    consistent with one of the same or a larger size cosigned by K of the
    witnesses: the receipt's own, the log's latest, or (--db) a stored one.

    Exit 0 the log holds it; 1 it does not (prints both signed views: evidence
    of a rewrite, rollback or fork), a given witness's cosignature does not
    verify, or no witnessed checkpoint extends it; 2 usage or I/O error,
    including a receipt that does not verify with --vkey (not a receipt of
    this log).
    """
    if url is not None and (db is not None or log is not None):
        _fail("give either --db [--log] or --url, not both")
    if url is None and (cert or key or bundle):
        _fail("--cert, --key and --bundle go with --url")
    policy = _policy(witness or [], quorum)
    verifier = _verifier(vkey)
    receipt = _read_receipt(file)
    try:
        seq, size = receipt.seq, open_receipt(receipt, verifier).size
        evidence = _fetch(
            seq, size, verifier, db=db, log=log, url=url, tls=(cert, key, bundle), policy=policy
        )
        result = check_receipt(receipt, verifier, evidence, policy)
    except ReceiptError as e:
        _fail(str(e))
    raise typer.Exit(_report(receipt, result))


def _fetch(
    seq: int,
    size: int,
    verifier: NoteVerifier,
    *,
    db: str | None,
    log: str | None,
    url: str | None,
    tls: tuple[Path | None, Path | None, Path | None],
    policy: WitnessPolicy | None = None,
) -> LogEvidence:
    if url is None:
        db = db or DEFAULT_DB
        with _database(db, log or _log_of(db, verifier.name)) as source:
            store = source.store
            if store.origin != verifier.name:
                _fail(f"log {store.log!r} has origin {store.origin}, the vkey is {verifier.name}")
            return _from_database(store, seq, size, source if policy else None, policy)
    import httpx

    base = _base_url(url)
    ctx = _tls(base.startswith("https:"), *tls)
    with httpx.Client(verify=ctx, timeout=_TIMEOUT, trust_env=False) as client:
        return _from_routes(client, base, verifier.name, seq, size)
