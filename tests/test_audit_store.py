"""Decision-log storage (axid.audit.store) on real SQLite files and real PostgreSQL."""

from __future__ import annotations

import base64
import itertools
import os
import re
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _audit_storage_helpers import check_log, db_url, fields, fresh_log
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

import axid.audit.store as store_mod
from axid.audit.entry import DecisionFields, EntryError, parse_entry
from axid.audit.head import IntegrityFailure
from axid.audit.merkle import (
    CompactRange,
    ProofError,
    leaf_hash,
    root_from_leaf_hashes,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from axid.audit.note import Checkpoint, NoteSigner, NoteVerifier, open_checkpoint
from axid.audit.receipt import Receipt
from axid.audit.store import (
    PROOF_HEADER,
    DatabaseURLError,
    LogKeyError,
    LogKeyMismatch,
    LogNotFound,
    LogStore,
    NotFound,
    StoreError,
    create_schema,
    generate_log_key,
    list_logs,
    load_log_key,
    make_engine,
    origin_for,
    proof_text,
)

BATCHES = [1, 2, 3, 7, 16, 1, 1, 33, 4]  # 68 entries, odd sizes on purpose


@pytest.fixture(params=["sqlite", "pg"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(db_url(request.param, tmp_path))
    create_schema(eng)
    yield eng
    eng.dispose()


def _new_store(engine: Engine, log: str | None = None) -> tuple[LogStore, str]:
    log = log or fresh_log()
    signer = NoteSigner(origin_for(log), Ed25519PrivateKey.generate())
    s = LogStore(engine, log, signer=signer)
    s.ensure_log(s.origin, signer.vkey())
    return s, signer.vkey()


def _df(items: list[dict[str, object]]) -> list[DecisionFields]:
    return [DecisionFields.from_mapping(f) for f in items]


def _fill(s: LogStore, batches: list[int]) -> list[Receipt]:
    out: list[Receipt] = []
    i = 0
    for n in batches:
        out += s.append_batch(_df([fields(i + k) for k in range(n)]))
        i += n
    return out


# --------------------------------------------------------------------------- appends


def test_append_batches_build_one_chain(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    got = _fill(s, BATCHES)
    n = sum(BATCHES)
    assert [r.seq for r in got] == list(range(n))
    entries = list(s.entries())
    assert [e[0] for e in entries] == list(range(n))
    prev = "0" * 64
    for (seq, data, lh), r in zip(entries, got, strict=True):
        assert (seq, lh, data) == (r.seq, r.leaf_hash, r.entry)
        assert lh == leaf_hash(data)
        e = parse_entry(data)
        assert e["prev"] == prev
        assert e["seq"] == seq and e["log"] == s.log and e["v"] == 1
        # The caller's fields are there verbatim.
        for k, v in fields(seq).items():
            assert e[k] == v
        prev = lh.hex()
    assert s.size() == n
    chk = check_log(s, vkey)
    assert chk.checkpoint_sizes == list(itertools.accumulate(BATCHES))


def test_nodes_give_the_roots_of_every_size(engine: Engine) -> None:
    s, _ = _new_store(engine)
    _fill(s, BATCHES)
    hashes = [lh for _, _, lh in s.entries()]
    for size in range(1, len(hashes) + 1):
        want = root_from_leaf_hashes(hashes[:size])
        assert tree_root(size, s.node) == want
        assert CompactRange.from_getter(size, s.node).root() == want
    with pytest.raises(KeyError):
        s.node(0, len(hashes))
    with pytest.raises(KeyError):
        s.node(3, len(hashes) // 8)  # an incomplete subtree is never stored


def test_checkpoint_after_every_batch_verifies(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    assert s.latest_checkpoint() is None
    verifier = NoteVerifier.from_vkey(vkey)
    total = 0
    hashes: list[bytes] = []
    for n in BATCHES:
        got = s.append_batch(_df([fields(total + k) for k in range(n)]))
        total += n
        hashes += [r.leaf_hash for r in got]
        note = s.latest_checkpoint()
        assert note is not None
        cp = open_checkpoint(note, [verifier], origin=s.origin)
        assert cp == Checkpoint(s.origin, total, root_from_leaf_hashes(hashes))
        assert s.checkpoint(total) == note
    assert s.checkpoint(total + 1) is None
    assert [size for size, _ in s.checkpoints(batch=2)] == list(itertools.accumulate(BATCHES))
    assert s.vkey() == vkey


def test_inclusion_and_consistency_proofs_verify(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    _fill(s, BATCHES)
    verifier = NoteVerifier.from_vkey(vkey)
    hashes = [lh for _, _, lh in s.entries()]
    sizes = list(itertools.accumulate(BATCHES))
    for size in sizes:
        for seq in range(size):
            proof, note = s.inclusion_proof(seq, size)
            cp = open_checkpoint(note, [verifier], origin=s.origin)
            assert cp.size == size
            verify_inclusion(seq, size, hashes[seq], proof, cp.root)
    # Default: the latest checkpoint.
    proof, note = s.inclusion_proof(5)
    cp = open_checkpoint(note, [verifier])
    assert cp.size == len(hashes)
    verify_inclusion(5, cp.size, hashes[5], proof, cp.root)
    with pytest.raises(ProofError):
        verify_inclusion(6, cp.size, hashes[5], proof, cp.root)
    # Consistency between any two sizes, checkpointed or not.
    for size1, size2 in itertools.combinations_with_replacement(range(len(hashes) + 1), 2):
        if size2 % 5 and size2 != len(hashes):
            continue  # a sample keeps the test fast on PostgreSQL
        proof = s.consistency_proof(size1, size2)
        verify_consistency(
            size1,
            size2,
            root_from_leaf_hashes(hashes[:size1]),
            root_from_leaf_hashes(hashes[:size2]),
            proof,
        )
    with pytest.raises(NotFound):
        s.inclusion_proof(0, 4)  # 4 is not a checkpointed size
    with pytest.raises(NotFound):
        s.inclusion_proof(len(hashes))
    with pytest.raises(NotFound):
        s.consistency_proof(3, len(hashes) + 1)


def test_proof_text_is_c2sp_tlog_proof(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    _fill(s, BATCHES)
    hashes = [lh for _, _, lh in s.entries()]
    seq = 41
    proof, note = s.inclusion_proof(seq)
    txt = proof_text(seq, proof, note)
    head, sep, cp_text = txt.partition("\n\n")
    assert sep and cp_text.encode() == note  # the checkpoint verbatim after an empty line
    lines = head.split("\n")
    assert lines[0] == PROOF_HEADER == "c2sp.org/tlog-proof@v1"
    assert lines[1] == f"index {seq}"
    parsed = [base64.b64decode(x, validate=True) for x in lines[2:]]
    assert parsed == proof and all(len(h) == 32 for h in parsed)
    cp = open_checkpoint(cp_text.encode(), [NoteVerifier.from_vkey(vkey)])
    verify_inclusion(seq, cp.size, hashes[seq], parsed, cp.root)
    assert proof_text(0, [], note).startswith("c2sp.org/tlog-proof@v1\nindex 0\n\n")
    with pytest.raises(ValueError):
        proof_text(-1, proof, note)
    with pytest.raises(ValueError):
        proof_text(1, [b"short"], note)


def test_query_filters(engine: Engine) -> None:
    s, _ = _new_store(engine)
    _fill(s, [30, 12])
    every = [parse_entry(d) for d in s.query()]
    assert [e["seq"] for e in every] == list(range(42))
    deny = [parse_entry(d) for d in s.query(decision="deny")]
    assert deny and all(e["decision"] == "deny" for e in deny)
    assert [e["seq"] for e in deny] == [i for i in range(42) if fields(i)["decision"] == "deny"]
    both = [parse_entry(d)["seq"] for d in s.query(tenant="acme", agent="agent-1", run="run-3")]
    assert both == [
        i
        for i in range(42)
        if fields(i)["tenant"] == "acme"
        and fields(i)["agent"] == "agent-1"
        and fields(i)["run"] == "run-3"
    ]
    assert [parse_entry(d)["seq"] for d in s.query(limit=5, batch=2)] == [0, 1, 2, 3, 4]
    assert list(s.query(since_ms=2**50)) == []
    assert len(list(s.query(since_ms=0, batch=7))) == 42
    assert list(s.query(limit=0)) == []


def test_entries_ranges_and_pages(engine: Engine) -> None:
    s, _ = _new_store(engine)
    _fill(s, [25])
    assert [e[0] for e in s.entries(3, 11, batch=4)] == list(range(3, 11))
    assert [e[0] for e in s.entries(20, batch=2)] == list(range(20, 25))
    assert list(s.entries(25)) == []
    with pytest.raises(ValueError):
        list(s.entries(5, 4))


# --------------------------------------------------------------------------- logs and keys


def test_several_logs_share_one_database(engine: Engine) -> None:
    a, va = _new_store(engine)
    b, vb = _new_store(engine)
    for i in range(6):
        a.append_batch(_df([fields(i)] * (i + 1)))
        b.append_batch(_df([fields(100 + i)] * 2))
    assert a.size() == 21 and b.size() == 12
    ca, cb = check_log(a, va), check_log(b, vb)
    assert set(ca.leaf_hashes).isdisjoint(cb.leaf_hashes)
    assert {a.log, b.log} <= set(list_logs(engine)) == set(a.list_logs())
    # A checkpoint of one log does not verify as the other's.
    with pytest.raises(ValueError):
        open_checkpoint(a.latest_checkpoint() or b"", [NoteVerifier.from_vkey(vb)])


def test_one_log_one_key(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    s.append_batch(_df([fields(0)]))
    s.ensure_log(s.origin, vkey)  # idempotent with the same key
    other = NoteSigner(s.origin, Ed25519PrivateKey.generate())
    with pytest.raises(LogKeyMismatch):
        s.ensure_log(s.origin, other.vkey())
    # A store holding another key may not write checkpoints into this log.
    intruder = LogStore(engine, s.log, signer=other)
    with pytest.raises(IntegrityFailure, match="key"):
        intruder.append_batch(_df([fields(1)]))
    assert s.size() == 1
    assert s.vkey() == vkey
    with pytest.raises(StoreError):
        s.ensure_log("axid/someone-else", vkey)


def test_append_needs_log_row_and_signer(engine: Engine) -> None:
    log = fresh_log()
    signer = NoteSigner(origin_for(log), Ed25519PrivateKey.generate())
    with pytest.raises(LogNotFound):
        LogStore(engine, log, signer=signer).append_batch(_df([fields(0)]))
    with pytest.raises(LogNotFound):
        LogStore(engine, log).vkey()
    with pytest.raises(StoreError):
        LogStore(engine, log).append_batch(_df([fields(0)]))
    with pytest.raises(StoreError):
        LogStore(engine, log, signer=NoteSigner("axid/other", Ed25519PrivateKey.generate()))
    for bad in ("", "Upper", "-x", "a" * 65, "a/b", "a b"):
        with pytest.raises(StoreError):
            LogStore(engine, bad)
    assert LogStore(engine, log, signer=signer).append_batch([]) == []


def test_batches_take_only_decision_fields(engine: Engine) -> None:
    # The items are DecisionFields (checked when made), written as they are.
    s, vkey = _new_store(engine)
    got = s.append_batch(_df([fields(0), fields(1)]))
    assert [r.seq for r in got] == [0, 1]
    chk = check_log(s, vkey)
    for i in range(2):
        for k, v in fields(i).items():
            assert chk.entries[i][k] == v
    # Raw caller fields are not what append_batch takes: nothing is committed.
    with pytest.raises(EntryError):
        s.append_batch([*_df([fields(2)]), fields(3)])  # type: ignore[list-item]
    assert s.size() == 2 and [size for size, _ in s.checkpoints()] == [2]


def test_failed_batch_commits_nothing(engine: Engine) -> None:
    s, vkey = _new_store(engine)
    s.append_batch(_df([fields(0), fields(1)]))
    bad = [*_df([fields(2), fields(3)]), {"decision": "maybe", "reason": "ok"}]
    with pytest.raises(EntryError):
        s.append_batch(bad)  # type: ignore[arg-type]
    assert s.size() == 2
    assert [size for size, _ in s.checkpoints()] == [2]
    # The next batch continues the chain where the last commit left it.
    assert [r.seq for r in s.append_batch(_df([fields(2), fields(3)]))] == [2, 3]
    assert check_log(s, vkey).size == 4


def test_head_is_read_from_the_database(engine: Engine) -> None:
    """Two stores (as two processes would) interleave on one log: one chain."""
    s1, vkey = _new_store(engine)
    s2 = LogStore(engine, s1.log, signer=s1._signer)
    for i in range(10):
        (s1 if i % 3 else s2).append_batch(_df([fields(i)] * (1 + i % 4)))
    chk = check_log(s1, vkey)
    assert chk.size == sum(1 + i % 4 for i in range(10))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8))
def test_any_batching_gives_verifiable_checkpoints(
    sqlite_engine: Engine, batches: list[int]
) -> None:
    s, vkey = _new_store(sqlite_engine)
    _fill(s, batches)
    chk = check_log(s, vkey)
    assert chk.checkpoint_sizes == list(itertools.accumulate(batches))
    last = chk.size - 1
    proof, note = s.inclusion_proof(last // 2)
    cp = open_checkpoint(note, [NoteVerifier.from_vkey(vkey)])
    verify_inclusion(last // 2, cp.size, chk.leaf_hashes[last // 2], proof, cp.root)


@pytest.fixture(scope="module")
def sqlite_engine() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory() as d:
        eng = make_engine(f"sqlite:///{d}/h.db")
        create_schema(eng)
        yield eng
        eng.dispose()


# --------------------------------------------------------------------------- engines


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "axid.db"
    eng = make_engine(f"sqlite:///{path}", lock_timeout=2.5)
    create_schema(eng)
    create_schema(eng)  # idempotent
    assert path.parent.is_dir()
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    eng.dispose()
    # The file is a plain SQLite database with the four tables.
    with sqlite3.connect(path) as raw:
        names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "axid_audit_log",
        "axid_audit_entry",
        "axid_audit_node",
        "axid_audit_checkpoint",
    } <= names


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:x?mode=memory&uri=true",
        "sqlite:///x.db?timeout=1",
        "sqlite+aiosqlite:///x.db",
        "mysql://u@h/db",
        "postgresql+psycopg2://u@h/db",
        "postgresql+asyncpg://u@h/db",
        "not a url",
        "",
    ],
)
def test_make_engine_refuses(url: str) -> None:
    with pytest.raises(DatabaseURLError):
        make_engine(url)


def test_postgres_url_uses_psycopg3() -> None:
    eng = make_engine("postgresql://u:secret@127.0.0.1:1/db")
    assert eng.dialect.driver == "psycopg"
    assert "secret" not in repr(eng)
    eng.dispose()


def test_source_has_no_update_or_delete() -> None:
    # The store is store.py and the _store_* modules split from it.
    here = Path(store_mod.__file__)
    src = "".join(p.read_text() for p in [here, *sorted(here.parent.glob("_store_*.py"))])
    assert not re.search(r"\bUPDATE\b|\bDELETE\b", src)
    assert ".update(" not in src and ".delete(" not in src
    assert not re.search(r"\b(update|delete)\s*\(", src)
    assert not re.search(r"import[^\n]*\b(update|delete)\b", src)


# --------------------------------------------------------------------------- key files


@pytest.fixture
def no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AXID_KEY_PASSPHRASE", raising=False)


def test_generate_and_load_key(tmp_path: Path, no_passphrase: None) -> None:
    path = tmp_path / "keys" / "log.pem"
    key = generate_log_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_log_key(path)
    assert loaded.public_key() == key.public_key()
    assert [p.name for p in path.parent.iterdir()] == ["log.pem"]  # no temp file left
    with pytest.raises(LogKeyError):
        generate_log_key(path)  # never overwrites
    assert load_log_key(path).public_key() == key.public_key()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_readable_key(tmp_path: Path, mode: int, no_passphrase: None) -> None:
    path = tmp_path / "log.pem"
    generate_log_key(path)
    path.chmod(mode)
    with pytest.raises(LogKeyError, match="chmod 600"):
        load_log_key(path)


def test_load_refuses_bad_key_files(tmp_path: Path, no_passphrase: None) -> None:
    with pytest.raises(LogKeyError):
        load_log_key(tmp_path / "missing.pem")
    with pytest.raises(LogKeyError):
        load_log_key(tmp_path)  # a directory
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    for name, data in (("ec.pem", ec_pem), ("junk.pem", b"not a key"), ("big.pem", b"x" * 70000)):
        p = tmp_path / name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        with pytest.raises(LogKeyError):
            load_log_key(p)


def test_key_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "correct horse battery staple"
    monkeypatch.setenv("AXID_KEY_PASSPHRASE", secret)
    path = tmp_path / "enc.pem"
    key = generate_log_key(path)
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_log_key(path).public_key() == key.public_key()
    monkeypatch.setenv("AXID_KEY_PASSPHRASE", "Tr0ub4dor&3")
    with pytest.raises(LogKeyError) as ei:
        load_log_key(path)
    assert "Tr0ub4dor" not in str(ei.value) and secret not in str(ei.value)
    monkeypatch.delenv("AXID_KEY_PASSPHRASE")
    with pytest.raises(LogKeyError, match="encrypted"):
        load_log_key(path)
    plain = tmp_path / "plain.pem"
    generate_log_key(plain)
    monkeypatch.setenv("AXID_KEY_PASSPHRASE", secret)
    with pytest.raises(LogKeyError, match="not encrypted"):
        load_log_key(plain)
