"""The pure add-checkpoint decision (axid.witness.protocol): properties over random trees."""

from __future__ import annotations

import base64

import pytest
from _witness_helpers import LogSide
from hypothesis import given, settings
from hypothesis import strategies as st

from axid.witness.protocol import LogState, Refusal, Submission, decide, parse_body

ORIGIN = "example.org/axid/protocol"
LOG = LogSide(ORIGIN).grow(70)
FORK = LOG.fork(0, b"fork").grow(70)


def _submission(log: LogSide, old: int, size: int, proof: list[bytes] | None = None) -> Submission:
    return parse_body(log.body(old, size, proof=proof))


sizes = st.tuples(st.integers(0, 70), st.integers(0, 70)).map(sorted)


@settings(max_examples=150, deadline=None)
@given(sizes, st.integers(0, 2**40))
def test_a_correct_extension_is_cosigned(pair: list[int], now: int) -> None:
    old, size = pair
    stored = LogState(old, LOG.root(old), 7)
    out = decide(stored, _submission(LOG, old, size), now)
    assert out.status == 200 and not out.evidence
    assert out.new_state == LogState(size, LOG.root(size), max(now, 7))


@settings(max_examples=150, deadline=None)
@given(sizes, st.data())
def test_a_damaged_proof_is_422_evidence(pair: list[int], data: st.DataObject) -> None:
    old, size = pair
    proof = LOG.proof(old, size)
    if not proof:
        proof = [LOG.root(size)]  # an empty proof is all there is: add a line instead
    else:
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = bytes(b ^ 1 if j == 0 else b for j, b in enumerate(proof[i]))
    out = decide(LogState(old, LOG.root(old)), _submission(LOG, old, size, proof), 0)
    assert (out.status, out.evidence, out.new_state) == (422, True, None)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70))
def test_another_history_is_never_cosigned(old: int, size: int) -> None:
    old, size = min(old, size), max(old, size)
    stored = LogState(old, LOG.root(old))
    out = decide(stored, _submission(FORK, old, size), 0)
    assert (out.status, out.evidence) == (422, True)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 70), st.integers(0, 70), st.integers(0, 70))
def test_any_other_old_size_is_409(stored_size: int, old: int, size: int) -> None:
    if old == stored_size or old > size:
        return
    stored = LogState(stored_size, LOG.root(stored_size))
    for log in (LOG, FORK):
        out = decide(stored, _submission(log, old, size), 0)
        assert (out.status, out.latest_size, out.new_state) == (409, stored_size, None)
        fork_same_size = log is FORK and size == stored_size and size > 0
        assert out.evidence == fork_same_size


def test_proof_line_limit_and_size_limit() -> None:
    body = LOG.body(0, 5, proof=[bytes([i]) * 32 for i in range(63)])
    assert len(parse_body(body).proof) == 63
    with pytest.raises(Refusal) as e:
        parse_body(LOG.body(0, 5, proof=[bytes(32)] * 64))
    assert (e.value.status, e.value.reason) == (400, "more than 63 consistency proof lines")
    big = LOG.note(5).replace(b"\n5\n", f"\n{2**63}\n".encode(), 1)
    with pytest.raises(Refusal) as e:
        parse_body(b"old 0\n\n" + big)
    assert e.value.status == 400


def test_parse_round_trip() -> None:
    sub = parse_body(LOG.body(13, 40))
    assert sub.old_size == 13 and list(sub.proof) == LOG.proof(13, 40)
    assert sub.checkpoint == LOG.checkpoint(40)
    assert sub.text == LOG.checkpoint(40).to_text().encode()
    ((name, kid, sig),) = sub.signatures
    assert name == ORIGIN and kid == LOG.signer.key_id and len(sig) == 64
    assert base64.b64encode(kid + sig).decode() in LOG.note(40).decode()
