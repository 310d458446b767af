"""Receipts: the AXID-Receipt header, the proof-text parsers and `axid audit receipt check`.

The header is checked against the RFC 8941 oracle (tests/_spec_rfc8941.py) and
the proofs the check accepts against the RFC 9162 oracle (tests/_spec_rfc9162.py),
both written from the RFC texts. The check runs end to end on real SQLite and
PostgreSQL logs built by DecisionLog, tampered with as an insider who can write
the database but does not hold the log key would, and over HTTP(S) against a
small server of the public read routes backed by the same store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from _audit_helpers import CP_SIZES, N_ENTRIES, LogFx, pg_fx, runner, sqlite_fx, sqlite_template
from _pki_helpers import make_ca, make_leaf, pem
from _spec_rfc8941 import parse_dictionary
from _spec_rfc9162 import leaf_hash as spec_leaf_hash
from _spec_rfc9162 import mth_of_leaf_hashes
from _spec_rfc9162 import verify_consistency as spec_consistency
from _spec_rfc9162 import verify_inclusion as spec_inclusion
from _tls_helpers import run_server
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from axid.audit.log import DecisionLog
from axid.audit.note import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint
from axid.audit.receipt import Receipt, ReceiptError, receipt_from_text
from axid.audit.receipt_check import (
    TLOG_PROOF_HEADER,
    ConsistencyProof,
    InclusionProof,
    LogEvidence,
    Missing,
    ReceiptFailure,
    ReceiptOk,
    StoredEntry,
    check_receipt,
    parse_consistency_proof,
    parse_inclusion_proof,
)
from axid.audit.store import PROOF_HEADER, LogStore, NotFound, consistency_text, proof_text
from axid.cli import app

LOG = "payments"
SIGNER = NoteSigner("axid/test", Ed25519PrivateKey.generate())


# --------------------------------------------------------------------------- helpers


def _note(size: int, root: bytes, signer: NoteSigner = SIGNER) -> bytes:
    return sign_checkpoint(Checkpoint(signer.name, size, root), signer)


def _receipt(seq: int, entry: bytes, size: int, root: bytes = b"\x07" * 32) -> Receipt:
    return Receipt(seq, spec_leaf_hash(entry), entry, _note(size, root))


def _members(r: Receipt) -> dict[str, int | bytes]:
    return {"seq": r.seq, "leaf": r.leaf_hash, "entry": r.entry, "checkpoint": r.checkpoint}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _cp_fields(note: bytes) -> tuple[int, bytes]:
    """Size and root of a checkpoint note, read by hand (tlog-checkpoint: origin, size, root)."""
    _, size, root = note.split(b"\n")[:3]
    return int(size), base64.b64decode(root, validate=True)


_receipts = st.builds(
    lambda seq, extra, entry, root: _receipt(seq, entry, seq + 1 + extra, root),
    st.integers(0, 2**40),
    st.integers(0, 2**20),
    st.binary(max_size=300),
    st.binary(min_size=32, max_size=32),
)


# --------------------------------------------------------------------------- the header


@settings(max_examples=50)
@given(_receipts)
def test_header_value_is_the_rfc8941_dictionary(r: Receipt) -> None:
    value = r.header_value()
    assert parse_dictionary(value.encode("ascii")) == _members(r)
    assert Receipt.from_header(value) == r
    assert Receipt.from_header(value.encode("ascii")) == r
    assert receipt_from_text(f"AXID-Receipt: {value}\r\n") == r
    assert receipt_from_text(f"axid-receipt:{value}\n") == r
    assert receipt_from_text(value) == r


@given(st.one_of(st.binary(max_size=400), st.text(max_size=400)))
def test_from_header_garbage_raises_only_receipt_error(value: bytes | str) -> None:
    with contextlib.suppress(ReceiptError):
        Receipt.from_header(value)


_VALID = _receipt(3, b'{"decision":"allow"}', 8).header_value()
_edits = st.lists(
    st.tuples(
        st.integers(0, len(_VALID)),
        st.integers(0, 6),
        st.text(alphabet=' \t,;=:-0123456789abAZ+/*"?()\x00\u00e9', max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(base: str, edits: list[tuple[int, int, str]]) -> str:
    for pos, cut, insert in edits:
        base = base[:pos] + insert + base[pos + cut :]
    return base


@given(_edits)
def test_from_header_mutations_agree_with_the_rfc8941_oracle(edits: list[Any]) -> None:
    # Anything from_header accepts, the RFC oracle parses to the same members;
    # anything else is a ReceiptError and nothing else.
    value = _mutate(_VALID, edits)
    try:
        r = Receipt.from_header(value)
    except ReceiptError:
        return
    assert parse_dictionary(value.strip(" \t").encode("ascii")) == _members(r)


_SPELLINGS = [
    # Valid RFC 8941 spellings of the same dictionary: all accepted, all equal.
    lambda r: r.header_value(),
    lambda r: f"  {r.header_value()}\t",  # OWS around the field value (HTTP trims it)
    lambda r: r.header_value().replace(", ", ",\t "),
    lambda r: r.header_value().replace(", ", ","),
    lambda r: f"seq=00{r.seq}" + r.header_value()[len(f"seq={r.seq}") :],  # leading zeros
    lambda r: ", ".join(reversed(r.header_value().split(", "))),  # member order
    lambda r: f"seq=999, {r.header_value()}",  # a later member overwrites (RFC 8941 4.2.2)
]


@pytest.mark.parametrize("spell", _SPELLINGS)
def test_from_header_accepts_every_rfc8941_spelling(spell: Any) -> None:
    r = _receipt(5, b"entry bytes", 9)
    value = spell(r)
    assert parse_dictionary(value.strip(" \t").encode()) == _members(r)
    assert Receipt.from_header(value) == r


def _with(r: Receipt, **members: str) -> str:
    m = {
        "seq": str(r.seq),
        "leaf": f":{_b64(r.leaf_hash)}:",
        "entry": f":{_b64(r.entry)}:",
        "checkpoint": f":{_b64(r.checkpoint)}:",
    }
    m.update(members)
    return ", ".join(f"{k}={v}" for k, v in m.items() if v != "")


_R = _receipt(5, b"entry bytes", 9)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (_with(_R, seq=""), "exactly the members"),
        (_with(_R) + ", extra=1", "exactly the members"),
        (_with(_R, seq="5;p=1"), "without parameters"),
        (_with(_R, leaf=f":{_b64(_R.leaf_hash)}:;x"), "without parameters"),
        (_with(_R, seq="-1"), "non-negative"),
        (_with(_R, seq="?1"), "must be int"),
        (_with(_R, seq="5.0"), "must be int"),
        (_with(_R, seq='"5"'), "must be int"),
        (_with(_R, leaf="7"), "must be bytes"),
        (_with(_R, seq="9"), "does not cover"),
        (_with(_R, leaf=f":{_b64(bytes(32))}:"), "not the hash of its entry"),
        (_with(_R, leaf=":AAAA:"), "32 bytes"),
        (_with(_R, checkpoint=":AAAA:"), "not a checkpoint note"),
        (_with(_R, entry=f":{_b64(_R.entry)[:-1]}:"), "not an RFC 8941 dictionary"),
        (_with(_R, entry=":ZW50cnkgYnl0ZXN=:"), "not canonical base64"),  # non-zero pad bits
        (_with(_R, entry=f":{_b64(_R.entry)}AAAA:"), "not canonical base64"),  # after padding
        (_with(_R) + ",", "not an RFC 8941 dictionary"),
        (_with(_R) + "\n", "not an RFC 8941 dictionary"),
        ("seq=5, leaf=:\u00e9:", "not ASCII"),
        ("", "not an RFC 8941 dictionary"),
        ("x" * (128 * 1024 + 1), "acceptable size"),
    ],
)
def test_from_header_rejects(value: str, match: str) -> None:
    with pytest.raises(ReceiptError, match=match):
        Receipt.from_header(value)


def test_non_canonical_base64_is_valid_rfc8941_but_refused() -> None:
    # RFC 8941 4.2.7 tolerates non-zero pad bits; a receipt's byte sequences,
    # like every base64 in the log's formats, must be canonical.
    value = _with(_R, entry=":ZW50cnkgYnl0ZXN=:")
    assert parse_dictionary(value.encode())["entry"] == _R.entry
    with pytest.raises(ReceiptError):
        Receipt.from_header(value)


@pytest.mark.parametrize(
    "text",
    [
        "AXID-Receipt: x\nAXID-Receipt: y\n",
        "X-Other: " + _R.header_value(),
        "\n" + _R.header_value(),
    ],
)
def test_receipt_from_text_rejects(text: str) -> None:
    with pytest.raises(ReceiptError):
        receipt_from_text(text)


# --------------------------------------------------------------------------- proof texts

_hash = st.binary(min_size=32, max_size=32)
_note_text = st.text(max_size=200).map(lambda s: s + "\n")


def test_proof_header_is_the_stores() -> None:
    assert TLOG_PROOF_HEADER == PROOF_HEADER == "c2sp.org/tlog-proof@v1"


@given(st.integers(0, 2**64 - 1), st.lists(_hash, max_size=64), _note_text)
def test_inclusion_proof_round_trip(index: int, hashes: list[bytes], note: str) -> None:
    text = proof_text(index, hashes, note.encode()).encode()
    assert parse_inclusion_proof(text) == InclusionProof(index, tuple(hashes), note.encode())


@given(st.integers(0, 2**64 - 1), st.lists(_hash, max_size=63), _note_text)
def test_consistency_proof_round_trip(old: int, hashes: list[bytes], note: str) -> None:
    text = consistency_text(old, hashes, note.encode()).encode()
    assert parse_consistency_proof(text) == ConsistencyProof(old, tuple(hashes), note.encode())


@given(st.binary(max_size=300))
def test_proof_parsers_garbage_raises_only_receipt_error(data: bytes) -> None:
    for parse in (parse_inclusion_proof, parse_consistency_proof):
        with contextlib.suppress(ReceiptError):
            parse(data)


_H = _b64(bytes(range(32)))
_PROOF = f"{PROOF_HEADER}\nindex 5\n{_H}\n{_H}\n\naxid/x\n9\n{_H}\n\n\u2014 k sig\n".encode()


@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_PROOF)),
            st.integers(0, 4),
            st.binary(max_size=3).filter(lambda b: b"\n" not in b) | st.just(b"\n"),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_proof_parser_mutations_raise_only_receipt_error(edits: list[Any]) -> None:
    data = _PROOF
    for pos, cut, insert in edits:
        data = data[:pos] + insert + data[pos + cut :]
    for parse in (parse_inclusion_proof, parse_consistency_proof):
        with contextlib.suppress(ReceiptError):
            parse(data)


def test_inclusion_proof_extra_line() -> None:
    text = f"{PROOF_HEADER}\nextra {_b64(b'ctx')}\nindex 0\n\nn\n".encode()
    assert parse_inclusion_proof(text) == InclusionProof(0, (), b"n\n", b"ctx")


_NOTE = "axid/x\n9\n" + _H + "\n\n\u2014 k sig\n"


@pytest.mark.parametrize(
    "text",
    [
        f"{PROOF_HEADER}\nindex 05\n\n{_NOTE}",  # leading zero
        f"{PROOF_HEADER}\nindex -1\n\n{_NOTE}",
        f"{PROOF_HEADER}\nindex {2**64}\n\n{_NOTE}",  # beyond uint64
        f"{PROOF_HEADER}\nindex  1\n\n{_NOTE}",
        f"{PROOF_HEADER}\nindex 1\r\n\n{_NOTE}",
        f"{PROOF_HEADER}\nindex \u0661\n\n{_NOTE}",  # a non-ASCII digit
        f"c2sp.org/tlog-proof@v2\nindex 1\n\n{_NOTE}",
        f"{PROOF_HEADER}\n\n{_NOTE}",  # no index
        f"{PROOF_HEADER}\nindex 1\n{_NOTE}",  # no blank line before the note
        f"{PROOF_HEADER}\nindex 1\n{_H}",  # no note at all
        f"{PROOF_HEADER}\nindex 1\n\n",  # an empty note
        f"{PROOF_HEADER}\nindex 1\n\n{_NOTE[:-1]}",  # note without its final newline
        f"{PROOF_HEADER}\nindex 1\n{_H[:-1]}\n\n{_NOTE}",  # not base64
        f"{PROOF_HEADER}\nindex 1\n{_b64(bytes(31))}\n\n{_NOTE}",  # 31 bytes
        f"{PROOF_HEADER}\nindex 1\n{_H[:-2]}B=\n\n{_NOTE}",  # non-canonical
        f"{PROOF_HEADER}\nindex 1\n" + f"{_H}\n" * 65 + f"\n{_NOTE}",  # too many hashes
        f"{PROOF_HEADER}\nextra \nindex 1\n\n{_NOTE}",  # empty extra
        f"{PROOF_HEADER}\nindex 1\nextra {_H}\n\n{_NOTE}",  # extra after the index
        f"{PROOF_HEADER}\r\nindex 1\n\n{_NOTE}",
        f"old 3\n\n{_NOTE}",  # a consistency proof is not a tlog-proof
    ],
)
def test_inclusion_proof_rejects(text: str) -> None:
    with pytest.raises(ReceiptError):
        parse_inclusion_proof(text.encode())


@pytest.mark.parametrize(
    "data",
    [
        f"old 03\n\n{_NOTE}".encode(),
        f"old\n\n{_NOTE}".encode(),
        f"old 3\n{_H}\n{_NOTE}".encode(),
        ("old 3\n" + f"{_H}\n" * 64 + f"\n{_NOTE}").encode(),  # tlog-witness: at most 63
        f"old 3\n\n{_NOTE}".encode()[:-1],
        b"old 3\n\nnot utf-8 \xff\n",
        f"{PROOF_HEADER}\nindex 1\n\n{_NOTE}".encode(),
        b"old 3\n\n" + b"x" * (1 << 20) + b"\n",  # a note larger than any
    ],
)
def test_consistency_proof_rejects(data: bytes) -> None:
    with pytest.raises(ReceiptError):
        parse_consistency_proof(data)


# --------------------------------------------------------------------------- real logs


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
        yield from pg_fx(tmp_path)


def receipt_of(fx: LogFx, seq: int) -> Receipt:
    """The receipt DecisionLog gave for ``seq``: its batch's checkpoint, its stored bytes."""
    size = next(s for s in CP_SIZES if s > seq)
    data, leaf = fx.entry(seq)
    return Receipt(seq, leaf, data, fx.checkpoint(size))


def check(fx: LogFx, receipt: Receipt, *source: str, vkey: str | None = None) -> Any:
    """Run ``axid audit receipt check FILE --vkey ... SOURCE`` in-process."""
    path = fx.tmp / f"receipt-{receipt.seq}.txt"
    path.write_text(f"AXID-Receipt: {receipt.header_value()}\n")
    args = ["audit", "receipt", "check", str(path), "--vkey", vkey or fx.vkey]
    return runner.invoke(app, [*args, *(source or fx.db_args())])


def assert_held(result: Any) -> None:
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK: the log holds the receipted entry"), result.stdout


def assert_not_held(result: Any, what: str, receipt: Receipt) -> None:
    assert result.exit_code == 1, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("NOT HELD: ") and what in first, first
    # Both signed views: the receipt's checkpoint verbatim, then the log's.
    views = result.stdout.split("the receipt's signed checkpoint:\n", 1)[1]
    assert views.startswith(receipt.checkpoint.decode())
    assert "the log's signed checkpoint" in views


# Receipts of the first, a middle and the last entry of several batches.
SEQS = (0, 49, 50, 63, 89, 120, 179, 200, 289, 290, 299)


@pytest.mark.parametrize("seq", SEQS)
def test_receipt_of_an_intact_log_holds(sfx: LogFx, seq: int) -> None:
    r = receipt_of(sfx, seq)
    result = check(sfx, r)
    assert_held(result)
    # The same evidence, checked by the RFC 9162 oracle.
    size, root = _cp_fields(r.checkpoint)
    latest = sfx.checkpoint(CP_SIZES[-1])
    n, latest_root = _cp_fields(latest)
    store = LogStore(sfx.engine, LOG)
    hashes, note = store.inclusion_proof(seq, size)
    assert note == r.checkpoint and spec_leaf_hash(r.entry) == r.leaf_hash
    assert spec_inclusion(seq, size, r.leaf_hash, hashes, root)
    assert spec_consistency(size, n, root, latest_root, store.consistency_proof(size, n))
    assert f"receipt:  size {size}, root {_b64(root)}" in result.stdout
    assert f"latest:   size {n}, root {_b64(latest_root)}" in result.stdout
    assert result.stdout.endswith(latest.decode())


def test_intact_log_holds(fx: LogFx) -> None:
    # Both databases; the log name comes from the vkey (axid/<log>).
    for seq in (0, 89, 90, 299):
        assert_held(check(fx, receipt_of(fx, seq), "--db", fx.url))


def test_receipts_from_append_hold(tmp_path: Path) -> None:
    # DecisionLog.append's own receipts (not rebuilt from the store), on a fresh log.
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"

    async def build() -> tuple[str, list[Receipt]]:
        dlog = await DecisionLog.open(url, log=LOG, key=tmp_path / "log.pem", create_key=True)
        try:
            out = []
            for n in (1, 4, 2):
                fields = {"decision": "allow", "reason": "ok", "method": "GET", "path": "/p"}
                out += await asyncio.gather(*(dlog.append(fields) for _ in range(n)))
            return dlog.vkey, out
        finally:
            await dlog.close()

    vkey, receipts = asyncio.run(build())
    assert [r.seq for r in receipts] == list(range(7))
    fx = LogFx(url, LOG, tmp_path / "log.pem", vkey, tmp_path)
    try:
        for r in receipts:
            assert Receipt.from_header(r.header_value()) == r
            assert_held(check(fx, r))
    finally:
        fx.close()


def test_receipt_from_stdin_and_bare_value(sfx: LogFx) -> None:
    r = receipt_of(sfx, 7)
    args = ["audit", "receipt", "check", "-", "--vkey", sfx.vkey, *sfx.db_args()]
    assert_held(runner.invoke(app, args, input=r.header_value()))
    assert_held(runner.invoke(app, args, input=f"AXID-Receipt: {r.header_value()}\r\n"))


def test_log_name_comes_from_the_vkey(sfx: LogFx) -> None:
    r = receipt_of(sfx, 7)
    assert_held(check(sfx, r, "--db", sfx.url))


def test_vkey_from_a_file(sfx: LogFx) -> None:
    (sfx.tmp / "vkey").write_text(sfx.vkey + "\n")
    assert_held(check(sfx, receipt_of(sfx, 7), vkey=str(sfx.tmp / "vkey")))


# -------------------------------------------------------- an insider without the key


def _leaves(fx: LogFx) -> list[bytes]:
    return [
        bytes(r[0])
        for r in fx.rows("SELECT leaf_hash FROM axid_audit_entry WHERE log = :log ORDER BY seq")
    ]


def rewrite_entry(
    fx: LogFx, seq: int, *, resign: NoteSigner | None = None, chain: bool = True
) -> None:
    """Flip entry ``seq``'s decision and make the database agree with itself again.

    Rewrites the entry's data and leaf hash, with ``chain`` the hash chain
    after it (each later entry's ``prev``), and every stored tree node; with ``resign``, also
    every checkpoint that covers the entry, signed with the insider's own key
    under the log's key name. Without it the stored checkpoints stay as the
    log signed them (the insider cannot sign).
    """
    rows = fx.rows(
        "SELECT seq, data, leaf_hash FROM axid_audit_entry WHERE log = :log ORDER BY seq"
    )
    old_prev, new_prev = None, None
    for s, data, leaf in rows:
        data, leaf = bytes(data), bytes(leaf)
        if s == seq:
            flipped = (
                b'"decision":"deny"' if b'"decision":"allow"' in data else b'"decision":"allow"'
            )
            data = data.replace(b'"decision":"allow"', flipped).replace(
                b'"decision":"deny"', flipped
            )
        elif s > seq and chain:
            data = data.replace(old_prev.hex().encode(), new_prev.hex().encode())  # type: ignore[union-attr]
        else:
            continue
        new_leaf = spec_leaf_hash(data)
        fx.set_entry(s, data, new_leaf)
        old_prev, new_prev = leaf, new_leaf
    _restore_tree(fx)
    if resign is not None:
        leaves = _leaves(fx)
        for (size,) in fx.rows("SELECT size FROM axid_audit_checkpoint WHERE log = :log"):
            if size > seq:
                cp = Checkpoint(f"axid/{fx.log}", size, mth_of_leaf_hashes(leaves[:size]))
                fx.set_checkpoint(size, sign_checkpoint(cp, resign))


def _restore_tree(fx: LogFx) -> None:
    """Recompute every stored node (level >= 1) from the stored leaf hashes."""
    leaves = _leaves(fx)
    for level, idx in fx.rows("SELECT level, idx FROM axid_audit_node WHERE log = :log"):
        span = leaves[idx << level : (idx + 1) << level]
        fx.sql(
            "UPDATE axid_audit_node SET hash = :h WHERE log = :log AND level = :lv AND idx = :ix",
            h=mth_of_leaf_hashes(span),
            lv=level,
            ix=idx,
        )


def _insider() -> NoteSigner:
    return NoteSigner(f"axid/{LOG}", Ed25519PrivateKey.generate())


def test_rewritten_entry_and_resigned_checkpoints(fx: LogFx) -> None:
    target = 120  # in the batch 90..150: checkpoints 150 and later cover it
    receipts = {s: receipt_of(fx, s) for s in (10, 95, 120, 121, 200)}
    rewrite_entry(fx, target, resign=NoteSigner(f"axid/{fx.log}", Ed25519PrivateKey.generate()))
    for s in (95, 120, 121, 200):  # their checkpoints were re-signed with another key
        r = receipts[s]
        assert_not_held(check(fx, r), "the log's checkpoint of size", r)
    # Seq 10's checkpoint (size 50) is untouched, but the latest is not the log's.
    r = receipts[10]
    assert_not_held(check(fx, r), "the log's latest checkpoint does not verify", r)


def test_rewritten_entry_under_the_logs_own_checkpoints(fx: LogFx) -> None:
    # The insider leaves the signed checkpoints alone: the stored entry, the
    # tree over it and the chain after it no longer match what was signed.
    receipts = {s: receipt_of(fx, s) for s in (120, 121, 130, 10)}
    rewrite_entry(fx, 120)
    r = receipts[120]  # its sibling, 121, was rewritten too (the chain)
    assert_not_held(check(fx, r), "the log's tree no longer holds entry 120 at size 150", r)
    r = receipts[121]  # its leaf was rewritten too (the chain), and 120 is its sibling
    assert_not_held(check(fx, r), "the log's tree no longer holds entry 121 at size 150", r)
    r = receipts[130]  # its inclusion proof covers the rewritten leaves
    assert_not_held(check(fx, r), "the log's tree no longer holds entry 130", r)
    r = receipts[10]  # its size-50 tree is intact; the tree up to 300 is not what was signed
    assert_not_held(check(fx, r), "the log's latest checkpoint does not extend the receipt's", r)


def test_rewritten_entry_alone(fx: LogFx) -> None:
    # Only the entry row and the nodes above it: no proof of seq 120 at size 150
    # reads them, the stored entry shows it.
    r = receipt_of(fx, 120)
    rewrite_entry(fx, 120, chain=False)
    assert_not_held(check(fx, r), "the log's stored entry 120 is not the receipt's", r)


def test_removed_entry(fx: LogFx) -> None:
    r = receipt_of(fx, 120)
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = 120")
    assert_not_held(check(fx, r), "the log no longer stores entry 120", r)


def test_removed_entry_whose_sibling_is_receipted(fx: LogFx) -> None:
    r = receipt_of(fx, 121)
    fx.sql("DELETE FROM axid_audit_entry WHERE log = :log AND seq = 120")
    assert_not_held(check(fx, r), "the log gives no inclusion proof of entry 121 at size 150", r)


def test_rollback(sfx: LogFx) -> None:
    # The database restored from an old copy: everything after size 90 is gone.
    keep = 90
    before, after = receipt_of(sfx, 60), receipt_of(sfx, 150)
    for table, col in (("axid_audit_entry", "seq"), ("axid_audit_checkpoint", "size")):
        sfx.sql(
            f"DELETE FROM {table} WHERE log = :log AND {col} {'>=' if col == 'seq' else '>'} :k",
            k=keep,
        )
    sfx.sql("DELETE FROM axid_audit_node WHERE log = :log AND ((idx + 1) << level) > :k", k=keep)
    assert_not_held(check(sfx, after), "rollback: the log's latest checkpoint (size 90)", after)
    # The rolled-back log still holds entry 60 and extends its checkpoint (size 90).
    assert_held(check(sfx, before))


def test_latest_checkpoint_older_than_the_receipt(sfx: LogFx) -> None:
    r = receipt_of(sfx, 60)  # size 90
    sfx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > 90")
    store = LogStore(sfx.engine, LOG)
    evidence = LogEvidence(
        latest=sfx.checkpoint(50),
        inclusion=InclusionProof(60, tuple(store.inclusion_proof(60, 90)[0]), sfx.checkpoint(90)),
        consistency=Missing("not asked"),
    )
    got = check_receipt(r, NoteVerifier.from_vkey(sfx.vkey), evidence)
    assert isinstance(got, ReceiptFailure)
    assert got.what.startswith("rollback: the log's latest checkpoint (size 50) is older")
    assert got.log_note == sfx.checkpoint(50)


def test_forged_checkpoint_note(sfx: LogFx) -> None:
    r = receipt_of(sfx, 60)
    sfx.set_checkpoint(90, b"axid/payments\n90\n" + _b64(bytes(32)).encode() + b"\n\n")
    assert_not_held(check(sfx, r), "the log's checkpoint of size 90 does not verify", r)


def test_fork_signed_by_the_log_key(sfx: LogFx, tmp_path: Path) -> None:
    # The key holder shows another history with the same sizes: two signed
    # checkpoints of size 50 with different roots are the evidence.
    other = tmp_path / "fork.sqlite"
    key = sfx.key

    async def build() -> None:
        dlog = await DecisionLog.open(f"sqlite:///{other}", log=LOG, key=key)
        try:
            fields = {"decision": "deny", "reason": "forked", "method": "GET", "path": "/f"}
            await asyncio.gather(*(dlog.append(fields) for _ in range(50)))
            await asyncio.gather(*(dlog.append(fields) for _ in range(10)))
        finally:
            await dlog.close()

    asyncio.run(build())
    r = receipt_of(sfx, 7)
    result = check(sfx, r, "--db", f"sqlite:///{other}")
    assert_not_held(result, "fork: the log's signed checkpoint of size 50 has another root", r)
    fork_note = result.stdout.split("the log's signed checkpoint (as served):\n", 1)[1]
    assert fork_note.startswith("axid/payments\n50\n") and fork_note != r.checkpoint.decode()


# --------------------------------------------------------------------------- usage and I/O: exit 2


def _exit2(result: Any, match: str) -> None:
    assert result.exit_code == 2, result.output
    assert match in result.stderr, result.stderr


def test_receipt_of_another_log_key(sfx: LogFx) -> None:
    other = _insider()
    r = receipt_of(sfx, 7)
    size, root = _cp_fields(r.checkpoint)
    forged = Receipt(
        r.seq, r.leaf_hash, r.entry, sign_checkpoint(Checkpoint(other.name, size, root), other)
    )
    _exit2(check(sfx, forged), "not a receipt of log axid/payments")


def test_receipt_of_another_origin(sfx: LogFx) -> None:
    other = NoteSigner("axid/other", Ed25519PrivateKey.generate())
    r = Receipt(0, spec_leaf_hash(b"x"), b"x", _note(1, bytes(32), other))
    _exit2(check(sfx, r), "not a receipt of log axid/payments")


def test_bad_receipt_file(sfx: LogFx) -> None:
    path = sfx.tmp / "bad"
    path.write_text("AXID-Receipt: seq=1\n")
    args = ["audit", "receipt", "check", str(path), "--vkey", sfx.vkey, *sfx.db_args()]
    _exit2(runner.invoke(app, args), "bad receipt")
    path.write_bytes(b"\xff\xfe")
    _exit2(runner.invoke(app, args), "not ASCII")
    args[3] = str(sfx.tmp / "missing")
    _exit2(runner.invoke(app, args), "cannot read")


def test_usage_errors(sfx: LogFx) -> None:
    path = sfx.tmp / "r"
    path.write_text(receipt_of(sfx, 7).header_value())
    base = ["audit", "receipt", "check", str(path)]
    vkey = ["--vkey", sfx.vkey]
    _exit2(runner.invoke(app, [*base, "--vkey", "nonsense", "--db", sfx.url]), "not a vkey")
    _exit2(runner.invoke(app, [*base, *vkey, "--db", sfx.url, "--log", "nope"]), "no log 'nope'")
    both = [*base, *vkey, "--db", sfx.url, "--url", "http://127.0.0.1:1/v1/audit"]
    _exit2(runner.invoke(app, both), "either --db [--log] or --url")
    _exit2(runner.invoke(app, [*base, *vkey, "--bundle", "b.pem"]), "go with --url")
    missing = runner.invoke(app, [*base, "--db", sfx.url])
    assert missing.exit_code == 2 and "--vkey" in missing.output


def test_missing_database(sfx: LogFx) -> None:
    r = receipt_of(sfx, 7)
    _exit2(check(sfx, r, "--db", f"sqlite:///{sfx.tmp / 'none.sqlite'}"), "no database file")


def test_log_whose_origin_is_not_the_vkeys(sfx: LogFx, tmp_path: Path) -> None:
    # The database holds another log too; --log names it while the vkey is payments'.
    asyncio.run(_one_entry_log(sfx.url, "issuer", tmp_path / "issuer.pem"))
    r = receipt_of(sfx, 7)
    _exit2(check(sfx, r, "--db", sfx.url, "--log", "issuer"), "has origin axid/issuer")


async def _one_entry_log(url: str, log: str, key: Path) -> None:
    dlog = await DecisionLog.open(url, log=log, key=key, create_key=True)
    try:
        await dlog.append({"decision": "allow", "reason": "ok", "method": "GET", "path": "/"})
    finally:
        await dlog.close()


# --------------------------------------------------------------------------- the pure check


def test_check_receipt_answers_to_another_question(sfx: LogFx) -> None:
    r = receipt_of(sfx, 60)  # size 90
    v = NoteVerifier.from_vkey(sfx.vkey)
    store = LogStore(sfx.engine, LOG)
    hashes, note = store.inclusion_proof(60, 90)
    latest = sfx.checkpoint(300)
    cons = ConsistencyProof(90, tuple(store.consistency_proof(90, 300)), latest)
    good = LogEvidence(latest, InclusionProof(60, tuple(hashes), note), cons)
    ok = check_receipt(r, v, good)
    assert isinstance(ok, ReceiptOk) and ok.latest.size == 300 and ok.checkpoint.size == 90
    with pytest.raises(ReceiptError, match="for entry 61, not 60"):
        check_receipt(r, v, LogEvidence(latest, InclusionProof(61, tuple(hashes), note), cons))
    wrong = InclusionProof(60, tuple(store.inclusion_proof(60, 150)[0]), sfx.checkpoint(150))
    with pytest.raises(ReceiptError, match="for size 150, not 90"):
        check_receipt(r, v, LogEvidence(latest, wrong, cons))
    with pytest.raises(ReceiptError, match="from size 50, not 90"):
        check_receipt(r, v, LogEvidence(latest, good.inclusion, ConsistencyProof(50, (), latest)))
    older = ConsistencyProof(90, tuple(store.consistency_proof(90, 290)), sfx.checkpoint(290))
    with pytest.raises(ReceiptError, match="to size 290, not 300"):
        check_receipt(r, v, LogEvidence(latest, good.inclusion, older))
    entry = StoredEntry(r.entry, r.leaf_hash)
    assert isinstance(
        check_receipt(r, v, LogEvidence(latest, good.inclusion, cons, entry)), ReceiptOk
    )


def test_check_receipt_two_signed_latest_checkpoints(sfx: LogFx) -> None:
    # The consistency proof comes with another signed checkpoint of the latest size.
    r = receipt_of(sfx, 60)
    v = NoteVerifier.from_vkey(sfx.vkey)
    store = LogStore(sfx.engine, LOG)
    hashes, note = store.inclusion_proof(60, 90)
    latest = sfx.checkpoint(300)
    other = sign_checkpoint(
        Checkpoint(f"axid/{LOG}", 300, bytes(32)), NoteSigner(f"axid/{LOG}", sfx.key)
    )
    cons = ConsistencyProof(90, tuple(store.consistency_proof(90, 300)), other)
    got = check_receipt(r, v, LogEvidence(latest, InclusionProof(60, tuple(hashes), note), cons))
    assert isinstance(got, ReceiptFailure)
    assert got.what == "fork: the log signed two checkpoints of size 300"
    assert got.log_note == other


def test_check_receipt_missing_answers(sfx: LogFx) -> None:
    r = receipt_of(sfx, 60)
    v = NoteVerifier.from_vkey(sfx.vkey)
    got = check_receipt(r, v, LogEvidence(Missing("gone"), Missing("gone"), Missing("gone")))
    assert isinstance(got, ReceiptFailure) and got.log_note is None
    assert got.receipt_note == r.checkpoint


# -------------------------------------------------------- over the public read routes


def _problem(status: int, detail: str) -> Response:
    reason = {400: "bad_request", 404: "not_found"}[status]
    return JSONResponse(
        {"type": "about:blank", "status": status, "reason": reason, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def routes_app(store: LogStore) -> Starlette:
    """The public read routes, from a real store (as the issuer and services serve them)."""

    def _int(request: Request, name: str) -> int | None:
        value = request.query_params.get(name)
        return None if value is None else int(value)

    def checkpoint(request: Request) -> Response:
        note = store.latest_checkpoint()
        if note is None:
            return _problem(404, "no checkpoint yet")
        return PlainTextResponse(note)

    def proof(request: Request) -> Response:
        seq, size = _int(request, "seq"), _int(request, "size")
        assert seq is not None
        try:
            hashes, note = store.inclusion_proof(seq, size)
        except NotFound as e:
            return _problem(404, str(e))
        return PlainTextResponse(proof_text(seq, hashes, note))

    def consistency(request: Request) -> Response:
        old, size = _int(request, "old"), _int(request, "size")
        assert old is not None and size is not None
        note = store.checkpoint(size)
        if note is None:
            return _problem(404, f"no checkpoint of size {size}")
        try:
            hashes = store.consistency_proof(old, size)
        except NotFound as e:
            return _problem(404, str(e))
        return PlainTextResponse(consistency_text(old, hashes, note))

    routes = [
        Route("/checkpoint", checkpoint),
        Route("/proof", proof),
        Route("/consistency", consistency),
    ]
    return Starlette(
        routes=[Mount("/v1/audit", routes=routes), Mount("/.well-known/axid/log", routes=routes)]
    )


@pytest.fixture
def served(sfx: LogFx) -> Iterator[tuple[LogFx, int]]:
    config = uvicorn.Config(
        routes_app(LogStore(sfx.engine, LOG)), host="127.0.0.1", port=0, log_level="warning"
    )
    with run_server(config) as server:
        yield sfx, server.port


@pytest.mark.parametrize("prefix", ["/v1/audit", "/.well-known/axid/log", "/v1/audit/"])
@pytest.mark.parametrize("seq", [0, 60, 299])
def test_over_the_read_routes(served: tuple[LogFx, int], prefix: str, seq: int) -> None:
    fx, port = served
    assert_held(check(fx, receipt_of(fx, seq), "--url", f"http://127.0.0.1:{port}{prefix}"))


def test_over_the_read_routes_tampered(served: tuple[LogFx, int]) -> None:
    fx, port = served
    url = f"http://127.0.0.1:{port}/v1/audit"
    receipts = {s: receipt_of(fx, s) for s in (121, 10, 120)}
    rewrite_entry(fx, 120)
    r = receipts[121]
    assert_not_held(check(fx, r, "--url", url), "the log's tree no longer holds entry 121", r)
    r = receipts[10]
    assert_not_held(check(fx, r, "--url", url), "does not extend the receipt's", r)
    fx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size = 150")
    r = receipts[120]
    assert_not_held(check(fx, r, "--url", url), "the log gives no inclusion proof of entry 120", r)


def test_over_the_read_routes_entry_rewritten_alone(served: tuple[LogFx, int]) -> None:
    # The read routes serve proofs, never entries. A rewrite of the entry's row
    # and of the nodes above it shows over them only where a proof reads those
    # nodes. A receipt of the latest size needs no consistency proof, and no
    # inclusion proof reads the entry's own ancestors: the signed tree the
    # routes prove still holds the receipted entry (it is the stored row that
    # no longer matches what was signed). --db compares the stored entry, and
    # `axid audit verify` re-hashes every row against the signed roots.
    fx, port = served
    url = f"http://127.0.0.1:{port}/v1/audit"
    r, latest = receipt_of(fx, 120), receipt_of(fx, 295)  # sizes 150 and 300 (the latest)
    rewrite_entry(fx, 295, chain=False)
    assert_held(check(fx, latest, "--url", url))
    assert_not_held(check(fx, latest), "the log's stored entry 295 is not the receipt's", latest)
    # From a size that is not a power of two, the consistency proof rebuilds the
    # receipt's root from nodes over all of it: there the rewrite shows.
    rewrite_entry(fx, 120, chain=False)
    assert_not_held(check(fx, r, "--url", url), "does not extend the receipt's (from size 150", r)


def test_over_the_read_routes_rolled_back(served: tuple[LogFx, int]) -> None:
    fx, port = served
    r = receipt_of(fx, 150)  # size 180
    fx.sql("DELETE FROM axid_audit_checkpoint WHERE log = :log AND size > 90")
    url = f"http://127.0.0.1:{port}/.well-known/axid/log"
    assert_not_held(
        check(fx, r, "--url", url), "rollback: the log's latest checkpoint (size 90)", r
    )


def test_over_the_read_routes_usage_errors(served: tuple[LogFx, int]) -> None:
    fx, port = served
    r = receipt_of(fx, 7)
    _exit2(check(fx, r, "--url", f"http://127.0.0.1:{port}/nothing"), "HTTP 404")
    _exit2(check(fx, r, "--url", f"http://127.0.0.1:{_closed_port()}/v1/audit"), "GET http")
    _exit2(check(fx, r, "--url", "ftp://127.0.0.1/v1/audit"), "want http(s)")
    _exit2(check(fx, r, "--url", f"http://127.0.0.1:{port}/v1/audit?x=1"), "no query")
    _exit2(
        check(fx, r, "--url", f"http://127.0.0.1:{port}/v1/audit", "--bundle", "ca.pem"),
        "need an https:// --url",
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_over_the_read_routes_not_a_proof(sfx: LogFx) -> None:
    def garbage(request: Request) -> Response:
        return PlainTextResponse("<html>hello</html>")

    def note(request: Request) -> Response:
        return PlainTextResponse(sfx.checkpoint(300))

    def other_log(request: Request) -> Response:
        return PlainTextResponse(_note(300, bytes(32)))

    routes = [Route("/checkpoint", note), Route("/proof", garbage)]
    routes += [Route("/other/checkpoint", other_log), Route("/bad/checkpoint", garbage)]
    config = uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=0, log_level="warning")
    with run_server(config) as server:
        r = receipt_of(sfx, 7)
        base = f"http://127.0.0.1:{server.port}"
        _exit2(check(sfx, r, "--url", base), "not a proof")
        _exit2(
            check(sfx, r, "--url", f"{base}/other"), "of log axid/test, the vkey is axid/payments"
        )
        _exit2(check(sfx, r, "--url", f"{base}/bad"), "not a checkpoint note")


# ---------------------------------------------------------------------- over mTLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    server, server_key = make_leaf(ca, dns_names=("localhost",))
    client, client_key = make_leaf(ca, uris=("spiffe://example.org/auditor",))
    (d / "ca.pem").write_bytes(ca.pem())
    for name, cert, key in (("server", server, server_key), ("client", client, client_key)):
        (d / f"{name}.pem").write_bytes(pem(cert))
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return d


@pytest.fixture
def served_tls(sfx: LogFx, pki: Path) -> Iterator[tuple[LogFx, int]]:
    config = uvicorn.Config(
        routes_app(LogStore(sfx.engine, LOG)),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        ssl_certfile=str(pki / "server.pem"),
        ssl_keyfile=str(pki / "server.key"),
        ssl_ca_certs=str(pki / "ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    with run_server(config) as server:
        yield sfx, server.port


def test_over_mtls(served_tls: tuple[LogFx, int], pki: Path) -> None:
    fx, port = served_tls
    r = receipt_of(fx, 60)
    tls = ["--bundle", str(pki / "ca.pem"), "--cert", str(pki / "client.pem")]
    tls += ["--key", str(pki / "client.key")]
    assert_held(check(fx, r, "--url", f"https://localhost:{port}/v1/audit", *tls))
    # The server's certificate names localhost, not 127.0.0.1: hostname checking refuses.
    _exit2(check(fx, r, "--url", f"https://127.0.0.1:{port}/v1/audit", *tls), "GET https")
    # No client certificate: the server refuses the handshake.
    no_cert = ["--bundle", str(pki / "ca.pem")]
    _exit2(check(fx, r, "--url", f"https://localhost:{port}/v1/audit", *no_cert), "GET https")
    # Without the bundle the server's CA is unknown.
    _exit2(check(fx, r, "--url", f"https://localhost:{port}/v1/audit", *tls[2:]), "GET https")
    _exit2(check(fx, r, "--url", f"https://localhost:{port}/v1/audit", *tls[:4]), "go together")
    missing = ["--bundle", str(pki / "none.pem")]
    _exit2(check(fx, r, "--url", f"https://localhost:{port}/v1/audit", *missing), "TLS files")


# --------------------------------------------------------------------------- misc


def test_entry_count_of_the_template() -> None:
    # The receipts above are taken at these sizes; keep the helper's log in step.
    assert N_ENTRIES == 300 and CP_SIZES == (50, 90, 150, 180, 230, 290, 300)


@settings(
    max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(st.sampled_from(range(300)))
def test_every_receipt_holds_in_process(template: Path, seq: int) -> None:
    # The pure check on the database evidence for any seq (no CLI, no copies).
    from axid.audit.store import make_engine

    engine = make_engine(f"sqlite:///{template / 'db.sqlite'}")
    try:
        store = LogStore(engine, LOG)
        size = next(s for s in CP_SIZES if s > seq)
        ((_, data, leaf),) = store.entries(seq, seq + 1)
        r = Receipt(seq, leaf, data, store.checkpoint(size) or b"")
        hashes, note = store.inclusion_proof(seq, size)
        latest = store.latest_checkpoint() or b""
        cons = ConsistencyProof(size, tuple(store.consistency_proof(size, 300)), latest)
        got = check_receipt(
            r,
            NoteVerifier.from_vkey(store.vkey()),
            LogEvidence(latest, InclusionProof(seq, tuple(hashes), note), cons),
        )
        assert isinstance(got, ReceiptOk)
        assert spec_inclusion(seq, size, leaf, hashes, _cp_fields(note)[1])
    finally:
        engine.dispose()
