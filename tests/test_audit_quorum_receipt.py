"""`axid audit receipt check ... --witness VKEY ... --quorum K`.

The receipt's checkpoint must be consistent with a checkpoint of the same or a
larger size cosigned by K distinct witnesses among those given: the receipt's
own note (sync witnessing), the log's latest, or (``--db``) a stored
checkpoint in between, with the cosignatures the log stored
(``LogStore.add_cosignatures``). A cosignature by a given key that does not
verify, on any note the check reads, is exit 1; lines by other keys are
ignored. Real logs in SQLite and PostgreSQL, and over HTTP a small server of
the read routes backed by the same store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from _audit_helpers import CP_SIZES, LogFx, runner, sqlite_fx, sqlite_template
from _quorum_helpers import (
    IMPOSTOR,
    STRANGER,
    W1,
    W1_ML,
    W2,
    W3,
    add_lines,
    cosign,
    cosign_stored,
    flipped_line,
    forged_line,
    garbage_line,
    pg_quorum_fx,
    witness_args,
)
from _tls_helpers import run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from axid.audit.note import NoteVerifier
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import Receipt, ReceiptError
from axid.audit.receipt_check import (
    ConsistencyProof,
    InclusionProof,
    LogEvidence,
    ReceiptFailure,
    ReceiptOk,
    StoredEntry,
    check_receipt,
)
from axid.audit.store import LogStore, consistency_text, proof_text
from axid.cli import app

LOG = "payments"
LAST = CP_SIZES[-1]  # 300


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory, LOG)


@pytest.fixture
def sfx(template: Path, tmp_path: Path) -> Iterator[LogFx]:
    f = sqlite_fx(template, tmp_path, LOG)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fx(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> Iterator[LogFx]:
    if request.param == "sqlite":
        f = sqlite_fx(template, tmp_path, LOG)
        try:
            yield f
        finally:
            f.close()
    else:
        yield from pg_quorum_fx(tmp_path)


def receipt_of(fx: LogFx, seq: int, note: bytes | None = None) -> Receipt:
    """The receipt DecisionLog gave for ``seq`` (its batch's checkpoint), or with ``note``."""
    size = next(s for s in CP_SIZES if s > seq)
    data, leaf = fx.entry(seq)
    return Receipt(seq, leaf, data, fx.checkpoint(size) if note is None else note)


def check(fx: LogFx, receipt: Receipt, *args: str, source: list[str] | None = None) -> Any:
    """``axid audit receipt check FILE --vkey ... (--db ... | SOURCE) ARGS`` in-process."""
    path = fx.tmp / f"receipt-{receipt.seq}.txt"
    path.write_text(f"AXID-Receipt: {receipt.header_value()}\n")
    base = ["audit", "receipt", "check", str(path), "--vkey", fx.vkey]
    return runner.invoke(app, [*base, *(fx.db_args() if source is None else source), *args])


def assert_witnessed(result: Any, size: int, cosigners: str) -> None:
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK: the log holds the receipted entry"), result.stdout
    assert f"witnessed: size {size}, root " in result.stdout, result.stdout
    assert (
        result.stdout.split(f"witnessed: size {size}, root ")[1]
        .split("\n")[0]
        .endswith(f", cosigned by {cosigners}")
    )


def assert_unwitnessed(result: Any, what: str) -> None:
    assert result.exit_code == 1, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("NOT WITNESSED: ") and what in first, first


def assert_bad_cosignature(result: Any, size: int, witness: str) -> None:
    assert result.exit_code == 1, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(
        f"NOT HELD: the log's checkpoint of size {size} carries a witness cosignature "
        "that does not verify"
    ), first
    assert witness in first, first


QUORUM_2 = witness_args(W1, W2, W3, quorum=2)


# --------------------------------------------------------------------------- quorum met


def test_met_by_the_receipts_own_cosignatures(fx: LogFx) -> None:
    # Sync witnessing: the receipt's note carries the cosignatures itself.
    plain = receipt_of(fx, 63)
    r = receipt_of(fx, 63, cosign(plain.checkpoint, W1, W2, STRANGER))
    assert_witnessed(check(fx, r, *QUORUM_2), 90, "w1.example, w2.example")
    # An ML-DSA cosignature in the header too (a few KiB of base64).
    r = receipt_of(fx, 63, cosign(plain.checkpoint, W1_ML, W3))
    assert_witnessed(check(fx, r, *witness_args(W1_ML, W3, quorum=2)), 90, "w1.example, w3.example")


def test_met_by_the_logs_latest(fx: LogFx) -> None:
    cosign_stored(fx, LAST, W1, W2)
    assert_witnessed(check(fx, receipt_of(fx, 63), *QUORUM_2), LAST, "w1.example, w2.example")
    assert_witnessed(check(fx, receipt_of(fx, 299), *QUORUM_2), LAST, "w1.example, w2.example")


def test_met_by_a_stored_checkpoint_in_between(fx: LogFx) -> None:
    # Async witnessing: the newest checkpoints are not cosigned yet.
    cosign_stored(fx, 90, W1, W2, W3)
    cosign_stored(fx, 180, W1_ML, W3)
    given = witness_args(W1, W1_ML, W2, W3, quorum=2)
    assert_witnessed(check(fx, receipt_of(fx, 63), *given), 180, "w1.example, w3.example")
    assert_witnessed(check(fx, receipt_of(fx, 150), *given), 180, "w1.example, w3.example")
    # A receipt of a later size: 180 is older, so it witnesses nothing about it.
    assert_unwitnessed(
        check(fx, receipt_of(fx, 200), *given),
        "no checkpoint of size 230 or more cosigned by 2 of the given witnesses",
    )
    # Three of three: only 90.
    given = witness_args(W1, W2, W3, quorum=3)
    assert_witnessed(
        check(fx, receipt_of(fx, 63), *given), 90, "w1.example, w2.example, w3.example"
    )
    assert_unwitnessed(check(fx, receipt_of(fx, 90), *given), "of size 150 or more")


# --------------------------------------------------------------------------- quorum not met


def test_not_met(fx: LogFx) -> None:
    result = check(fx, receipt_of(fx, 63), *QUORUM_2)
    assert_unwitnessed(
        result,
        "no checkpoint of size 90 or more cosigned by 2 of the given witnesses "
        "(w1.example, w2.example, w3.example): cosigned are the receipt's (size 90) by none, "
        "the log's latest (size 300) by none",
    )
    # Both signed views are printed, as for any failure.
    assert "the receipt's signed checkpoint:\n" in result.stdout
    assert "the log's signed checkpoint (as served):\n" in result.stdout
    cosign_stored(fx, LAST, W1)
    r = receipt_of(fx, 63, cosign(receipt_of(fx, 63).checkpoint, W3))
    assert_unwitnessed(
        check(fx, r, *QUORUM_2),
        "the receipt's (size 90) by w3.example, the log's latest (size 300) by w1.example",
    )


def test_one_witness_with_two_keys_counts_once(fx: LogFx) -> None:
    plain = receipt_of(fx, 10)
    r = receipt_of(fx, 10, cosign(plain.checkpoint, W1, W1_ML))
    given = witness_args(W1, W1_ML, W2, quorum=2)
    assert_unwitnessed(check(fx, r, *given), "the receipt's (size 50) by w1.example")
    cosign_stored(fx, LAST, W1, W1_ML)
    assert_unwitnessed(check(fx, r, *given), "the log's latest (size 300) by w1.example")
    cosign_stored(fx, LAST, W2)
    assert_witnessed(check(fx, r, *given), LAST, "w1.example, w2.example")


def test_unknown_witness_lines_are_ignored(sfx: LogFx) -> None:
    plain = receipt_of(sfx, 63)
    extra = (
        STRANGER.cosign(_cp(plain), 1).encode()
        + IMPOSTOR.cosign(_cp(plain), 1).encode()
        + garbage_line()
        + garbage_line("w2.example")
    )
    r = receipt_of(sfx, 63, plain.checkpoint + extra)
    assert_unwitnessed(check(sfx, r, *QUORUM_2), "the receipt's (size 90) by none")
    r = receipt_of(sfx, 63, cosign(plain.checkpoint + extra, W1, W2))
    assert_witnessed(check(sfx, r, *QUORUM_2), 90, "w1.example, w2.example")


def _cp(r: Receipt) -> Any:
    from axid.audit.receipt import checkpoint_of

    return checkpoint_of(r.checkpoint)


# --------------------------------------------------------------------------- invalid cosignatures


@pytest.mark.parametrize("signer", [W1, W2], ids=["ed25519", "mldsa"])
def test_invalid_cosignature_on_the_receipt(fx: LogFx, signer: Any) -> None:
    cosign_stored(fx, LAST, W1, W2)  # the quorum itself is met by the log's latest
    plain = receipt_of(fx, 63)
    for make in (flipped_line, forged_line):
        r = receipt_of(fx, 63, plain.checkpoint + make(plain.checkpoint, signer))
        assert_bad_cosignature(check(fx, r, *QUORUM_2), 90, signer.name)
        # Without --witness, the receipt is only checked against the log: it holds.
        assert check(fx, r).exit_code == 0


def test_invalid_cosignature_in_the_log(fx: LogFx) -> None:
    cosign_stored(fx, 90, W1, W2)
    add_lines(fx, LAST, flipped_line(fx.checkpoint(LAST), W3))
    # The latest stored checkpoint: found even though the receipt's own is witnessed.
    r = receipt_of(fx, 63, cosign(receipt_of(fx, 63).checkpoint, W1, W2))
    assert_bad_cosignature(check(fx, r, *QUORUM_2), LAST, "w3.example")


def test_invalid_cosignature_in_between(sfx: LogFx) -> None:
    cosign_stored(sfx, 90, W1, W2)
    add_lines(sfx, 180, forged_line(sfx.checkpoint(180), W2))
    assert_bad_cosignature(check(sfx, receipt_of(sfx, 63), *QUORUM_2), 180, "w2.example")
    # A receipt past 180 does not read it.
    assert_unwitnessed(check(sfx, receipt_of(sfx, 200), *QUORUM_2), "of size 230 or more")


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quorum", "1"], "--quorum needs the witnesses' keys"),
        (witness_args(W1), "--witness needs --quorum K"),
        (witness_args(W1, quorum=0), "--quorum must be an integer of at least 1"),
        (witness_args(W1, W2, quorum=3), "--quorum 3 but only 2 distinct witness names"),
        (witness_args(W1, W1_ML, quorum=2), "only 1 distinct witness name given"),
        (["--witness", "nonsense", "--quorum", "1"], "no such file, and not a vkey"),
        (["--quorum", "many", *witness_args(W1)], ""),
    ],
)
def test_usage_errors(sfx: LogFx, args: list[str], message: str) -> None:
    result = check(sfx, receipt_of(sfx, 63), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr


def test_witness_from_a_file(sfx: LogFx) -> None:
    cosign_stored(sfx, LAST, W1, W2)
    files = []
    for s in (W1, W2):
        p = sfx.tmp / f"{s.name}.vkey"
        p.write_text(s.public().vkey() + "\n")
        files += ["--witness", str(p)]
    assert_witnessed(
        check(sfx, receipt_of(sfx, 5), *files, "--quorum", "2"), LAST, "w1.example, w2.example"
    )


# --------------------------------------------------------------------------- the check itself


def _evidence(fx: LogFx, seq: int, size: int, witnessed: int) -> LogEvidence:
    store = LogStore(fx.engine, fx.log)
    hashes, note = store.inclusion_proof(seq, size)
    latest = store.latest_checkpoint()
    assert latest is not None
    data, leaf = fx.entry(seq)
    cosigned = store.cosigned_note(witnessed)
    assert cosigned is not None
    return LogEvidence(
        latest=latest,
        inclusion=InclusionProof(seq, tuple(hashes), note),
        consistency=ConsistencyProof(size, tuple(store.consistency_proof(size, LAST)), latest),
        entry=StoredEntry(data, leaf),
        witnessed=ConsistencyProof(size, tuple(store.consistency_proof(size, witnessed)), cosigned),
    )


def test_check_receipt_with_a_witnessed_proof(sfx: LogFx) -> None:
    cosign_stored(sfx, 180, W1, W2)
    policy = WitnessPolicy.from_options([W1.public(), W2.public()], 2)
    verifier = NoteVerifier.from_vkey(sfx.vkey)
    r = receipt_of(sfx, 63)
    evidence = _evidence(sfx, 63, 90, 180)
    result = check_receipt(r, verifier, evidence, policy)
    assert isinstance(result, ReceiptOk), result
    assert result.witnessed is not None and result.witnessed.size == 180
    assert result.cosigners == ("w1.example", "w2.example")
    # Without a policy, the witnessed proof is not looked at.
    plain = check_receipt(r, verifier, evidence)
    assert isinstance(plain, ReceiptOk) and plain.witnessed is None
    # A proof that does not lead from the receipt's tree to the cosigned one: a fork.
    w = evidence.witnessed
    assert isinstance(w, ConsistencyProof)
    bad = dataclasses.replace(w, hashes=(b"\x00" * 32, *w.hashes[1:]))
    result = check_receipt(r, verifier, dataclasses.replace(evidence, witnessed=bad), policy)
    assert isinstance(result, ReceiptFailure) and not result.unwitnessed
    assert result.what.startswith("fork: the log's checkpoint of size 180 cosigned by")
    # A proof from another size answers another question.
    other = dataclasses.replace(w, old=50)
    with pytest.raises(ReceiptError, match="answered from size 50, not 90"):
        check_receipt(r, verifier, dataclasses.replace(evidence, witnessed=other), policy)


# --------------------------------------------------------------------------- over the read routes


def routes_app(store: LogStore, cosigned: bool) -> Starlette:
    """The read routes: ``/checkpoint`` serves the latest note as stored, or (``cosigned``)
    with its stored cosignatures, as the routes would once they serve cosigned notes."""

    def checkpoint(request: Request) -> Response:
        size = store.size()
        note = store.cosigned_note(size) if cosigned else store.checkpoint(size)
        assert note is not None
        return PlainTextResponse(note)

    def proof(request: Request) -> Response:
        seq, size = int(request.query_params["seq"]), int(request.query_params["size"])
        hashes, note = store.inclusion_proof(seq, size)
        return PlainTextResponse(proof_text(seq, hashes, note))

    def consistency(request: Request) -> Response:
        old, size = int(request.query_params["old"]), int(request.query_params["size"])
        note = store.cosigned_note(size) if cosigned else store.checkpoint(size)
        assert note is not None
        return PlainTextResponse(consistency_text(old, store.consistency_proof(old, size), note))

    routes = [
        Route("/checkpoint", checkpoint),
        Route("/proof", proof),
        Route("/consistency", consistency),
    ]
    return Starlette(routes=routes)


@pytest.mark.parametrize("cosigned", [False, True], ids=["as-stored", "cosigned"])
def test_over_the_read_routes(sfx: LogFx, cosigned: bool) -> None:
    cosign_stored(sfx, LAST, W1, W2)
    store = LogStore(sfx.engine, LOG)
    config = uvicorn.Config(
        routes_app(store, cosigned), host="127.0.0.1", port=0, log_level="warning"
    )
    with run_server(config) as server:
        url = ["--url", f"http://127.0.0.1:{server.port}"]
        plain = receipt_of(sfx, 63)
        result = check(sfx, plain, *QUORUM_2, source=url)
        if cosigned:
            assert_witnessed(result, LAST, "w1.example, w2.example")
        else:
            # The routes serve the note as stored, without its cosignatures: over
            # --url only the receipt's own cosignatures can make the quorum.
            assert_unwitnessed(result, "the log's latest (size 300) by none")
        r = receipt_of(sfx, 63, cosign(plain.checkpoint, W2, W3))
        assert_witnessed(check(sfx, r, *QUORUM_2, source=url), 90, "w2.example, w3.example")
        r = receipt_of(sfx, 63, plain.checkpoint + flipped_line(plain.checkpoint, W1))
        assert_bad_cosignature(check(sfx, r, *QUORUM_2, source=url), 90, "w1.example")
