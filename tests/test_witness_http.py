"""`axid witness serve` over loopback: every answer of POST /add-checkpoint, byte for byte.

One witness process (Ed25519 and ML-DSA-44 keys, SQLite state) serves the whole
module; every test submits for its own log (origin), so the tests do not share
state. Cosignatures are checked with tests/_spec_cosignature.py (from the spec
text), not with axid's code.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from _spec_cosignature import SpecError, verify_line
from _witness_helpers import (
    LogSide,
    WitnessDir,
    add_checkpoint,
    body_text,
    init_witness,
    serving,
    unique_origin,
    write_config,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.merkle import empty_root
from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint

N_LOGS = 40
TEXT = "text/plain; charset=utf-8"


@dataclass
class World:
    url: str
    client: httpx.Client
    witness: WitnessDir
    logs: list[LogSide]

    def log(self) -> LogSide:
        return self.logs.pop()

    def post(self, body: bytes) -> httpx.Response:
        return add_checkpoint(self.client, self.url, body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("witness")
    witness = init_witness(tmp, ml_dsa=True)
    logs = [LogSide(unique_origin()) for _ in range(N_LOGS)]
    config = write_config(
        tmp / "witness.yaml", keys=witness.keys, database="sqlite:///state.db", logs=logs
    )
    with serving(config) as url, httpx.Client(timeout=10) as client:
        yield World(url, client, witness, logs)


def assert_refused(r: httpx.Response, status: int, body: bytes) -> None:
    assert (r.status_code, r.content) == (status, body), r.content
    assert r.headers["content-type"] == TEXT


def assert_cosigned(w: World, r: httpx.Response, log: LogSide, size: int) -> list[int]:
    """200 with exactly one Ed25519 then one ML-DSA-44 cosignature line on ``size``."""
    assert r.status_code == 200, r.content
    assert r.headers["content-type"] == TEXT
    text = r.content.decode("utf-8")
    lines = text.splitlines(keepends=True)
    assert len(lines) == 2 and all(ln.endswith("\n") for ln in lines) and "".join(lines) == text
    assert w.witness.mldsa is not None
    body = body_text(log, size)
    return [
        verify_line(lines[0], body, w.witness.ed25519),
        verify_line(lines[1], body, w.witness.mldsa),
    ]


# --------------------------------------------------------------------------- 200


def test_first_checkpoint_then_growth_then_same_again(world: World) -> None:
    log = world.log().grow(20)
    t1 = assert_cosigned(world, world.post(log.body(0, 7)), log, 7)
    t2 = assert_cosigned(world, world.post(log.body(7, 20)), log, 20)
    # The same checkpoint again (old = size, empty proof): cosigned again, nothing changes.
    t3 = assert_cosigned(world, world.post(log.body(20, 20)), log, 20)
    assert t1[0] <= t2[0] <= t3[0]
    # A cosignature is of that checkpoint only: not of another size, not of another log.
    r = world.post(log.grow(21).body(20, 21))
    line = r.text.splitlines()[0]
    with pytest.raises(SpecError):
        verify_line(line, body_text(log, 20), world.witness.ed25519)


def test_size_zero_checkpoint_with_the_empty_root(world: World) -> None:
    log = world.log()
    assert_cosigned(world, world.post(log.body(0, 0)), log, 0)
    log.grow(3)
    assert_cosigned(world, world.post(log.body(0, 3)), log, 3)


def test_extension_lines_and_unknown_signatures_are_fine(world: World) -> None:
    log = world.log().grow(5)
    cp = Checkpoint(log.origin, 5, log.root(5), ("ext line one",))
    other = NoteSigner("someone.else/key", Ed25519PrivateKey.generate())
    note = sign_checkpoint(cp, log.signer)
    extra = sign_checkpoint(cp, other).decode().rsplit("\n\n", 1)[1]
    r = world.post(log.body(0, 5, note=note + extra.encode()))
    assert r.status_code == 200, r.content
    assert world.witness.mldsa is not None
    lines = r.text.splitlines(keepends=True)
    verify_line(lines[0], cp.to_text(), world.witness.ed25519)
    verify_line(lines[1], cp.to_text(), world.witness.mldsa)


def test_keep_alive_one_connection(world: World) -> None:
    log = world.log().grow(12)
    seen: set[object] = set()
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        for old, size in ((0, 4), (4, 9), (9, 12)):
            r = client.post(
                f"{world.url}/add-checkpoint",
                content=log.body(old, size),
                extensions={"trace": lambda name, info: seen.add(name)},
            )
            assert r.status_code == 200
    assert sum(1 for n in seen if str(n).startswith("connection.connect_tcp.complete")) == 1


# --------------------------------------------------------------------------- 404 / 403


def test_unknown_origin_is_404(world: World) -> None:
    stranger = LogSide(unique_origin("unknown.example")).grow(3)
    assert_refused(world.post(stranger.body(0, 3)), 404, b"unknown log origin\n")


def test_no_trusted_signature_is_403(world: World) -> None:
    log = world.log().grow(3)
    impostor = NoteSigner(log.origin, Ed25519PrivateKey.generate())  # same name, other key
    r = world.post(log.body(0, 3, note=log.note(3, impostor)))
    assert_refused(r, 403, b"no signature by a trusted log key\n")


def test_a_failing_trusted_signature_is_403_even_next_to_a_good_one(world: World) -> None:
    log = world.log().grow(3)
    good = log.note(3)
    text, sig = good.decode().rsplit("\n\n", 1)
    raw = bytearray(base64.b64decode(sig.split(" ")[2]))
    raw[-1] ^= 1
    bad_line = f"\u2014 {log.origin} {base64.b64encode(bytes(raw)).decode()}\n"
    # Alone: 403. Next to a valid signature by another trusted-looking line: still 403.
    r = world.post(log.body(0, 3, note=f"{text}\n\n{bad_line}".encode()))
    assert_refused(r, 403, b"a signature by a trusted log key does not verify\n")
    other = NoteSigner("other.example/k", Ed25519PrivateKey.generate())
    extra = sign_checkpoint(log.checkpoint(3), other).decode().rsplit("\n\n", 1)[1]
    r = world.post(log.body(0, 3, note=f"{text}\n\n{bad_line}{extra}".encode()))
    assert_refused(r, 403, b"a signature by a trusted log key does not verify\n")
    # A different-but-valid checkpoint text under the good signature: 403 as well.
    forged = good.replace(b"\n3\n", b"\n4\n", 1)
    assert_refused(
        world.post(log.body(0, 3, note=forged)),
        403,
        b"a signature by a trusted log key does not verify\n",
    )


# --------------------------------------------------------------------------- 400


def test_old_size_larger_than_checkpoint_is_400(world: World) -> None:
    log = world.log().grow(5)
    body = b"old 6\n\n" + log.note(5)
    assert_refused(world.post(body), 400, b"old size is larger than the checkpoint size\n")


def test_more_than_63_proof_lines_is_400(world: World) -> None:
    log = world.log().grow(5)
    lines = [bytes([i]) * 32 for i in range(64)]
    r = world.post(log.body(0, 5, proof=lines))
    assert_refused(r, 400, b"more than 63 consistency proof lines\n")
    # 63 lines are parsed (and then fail as a proof: 422, not 400).
    r = world.post(log.body(0, 5, proof=lines[:63]))
    assert_refused(r, 422, b"non-empty consistency proof with old size 0\n")


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (
            lambda b: b.replace(b"old 0\n", b"old 00\n", 1),
            b"malformed body: first line must be 'old <size>'\n",
        ),
        (
            lambda b: b.replace(b"old 0\n", b"old -1\n", 1),
            b"malformed body: first line must be 'old <size>'\n",
        ),
        (
            lambda b: b.replace(b"old 0\n", b"Old 0\n", 1),
            b"malformed body: first line must be 'old <size>'\n",
        ),
        (
            lambda b: b.replace(b"old 0\n", b"old  0\n", 1),
            b"malformed body: first line must be 'old <size>'\n",
        ),
        (
            lambda b: b.replace(b"\n", b"\r\n"),
            b"malformed body: control character other than newline\n",
        ),
        (lambda b: b"", b"malformed body: first line must be 'old <size>'\n"),
        (
            lambda b: b.replace(b"old 0\n\n", b"old 0\n", 1),
            b"malformed body: proof line is not base64\n",
        ),
        (
            lambda b: b.replace(b"old 0\n\n", b"old 0\nAAAA\n\n", 1),
            b"malformed body: proof line is not one canonical base64 hash\n",
        ),
        (lambda b: b[:-1], b"malformed body: the checkpoint is not a signed note\n"),
        (
            lambda b: b.rsplit(b"\n\n", 1)[0] + b"\n\n",
            b"malformed body: the checkpoint has no signature lines\n",
        ),
        (
            lambda b: b.replace(b"\xe2\x80\x94 ", b"- "),
            b"malformed body: signature line does not start with an em dash\n",
        ),
        (lambda b: b + b.rsplit(b"\n\n", 1)[1], b"malformed body: two signatures by one key\n"),
        (lambda b: b + b"\xff", b"malformed body: not UTF-8\n"),
    ],
)
def test_malformed_bodies_are_400(world: World, mangle: object, reason: bytes) -> None:
    log = world.logs[0].fork(0, b"x").grow(2)  # never submitted: any log's key would do
    body = log.body(0, 2)
    assert callable(mangle)
    assert_refused(world.post(mangle(body)), 400, reason)


def test_malformed_checkpoint_text_is_400(world: World) -> None:
    log = world.log().grow(2)
    note = log.note(2).replace(b"\n2\n", b"\n02\n", 1)
    assert_refused(
        world.post(log.body(0, 2, note=note)), 400, b"malformed body: invalid checkpoint\n"
    )


# --------------------------------------------------------------------------- 409


def test_old_size_other_than_latest_is_409_with_the_size(world: World) -> None:
    log = world.log().grow(9)
    assert world.post(log.body(0, 5)).status_code == 200
    for old in (0, 3, 4, 6):
        r = world.post(log.body(old, 9))
        assert (r.status_code, r.content) == (409, b"5\n")
        assert r.headers["content-type"] == "text/x.tlog.size"
    # The client retries from the size it was told: cosigned.
    assert_cosigned(world, world.post(log.body(5, 9)), log, 9)
    # An older checkpoint, proved from an older size: 409 again (no rollback).
    r = world.post(log.body(3, 5))
    assert (r.status_code, r.content, r.headers["content-type"]) == (
        409,
        b"9\n",
        "text/x.tlog.size",
    )


def test_never_cosigned_log_answers_409_zero(world: World) -> None:
    log = world.log().grow(9)
    r = world.post(log.body(4, 9))
    assert (r.status_code, r.content, r.headers["content-type"]) == (
        409,
        b"0\n",
        "text/x.tlog.size",
    )


# --------------------------------------------------------------------------- 422


def test_bad_consistency_proof_is_422(world: World) -> None:
    log = world.log().grow(11)
    assert world.post(log.body(0, 6)).status_code == 200
    proof = log.proof(6, 11)
    proof[0] = bytes(32)
    assert_refused(
        world.post(log.body(6, 11, proof=proof)), 422, b"consistency proof does not verify\n"
    )
    assert_refused(
        world.post(log.body(6, 11, proof=[])), 422, b"consistency proof does not verify\n"
    )
    assert_refused(
        world.post(log.body(6, 11, proof=[*log.proof(6, 11), bytes(32)])),
        422,
        b"consistency proof does not verify\n",
    )


def test_nonempty_proof_with_old_zero_is_422(world: World) -> None:
    log = world.log().grow(4)
    r = world.post(log.body(0, 4, proof=[log.root(2)]))
    assert_refused(r, 422, b"non-empty consistency proof with old size 0\n")


def test_size_zero_with_another_root_is_422(world: World) -> None:
    log = world.log()
    cp = Checkpoint(log.origin, 0, b"\x01" * 32)
    assert cp.root != empty_root()
    r = world.post(b"old 0\n\n" + sign_checkpoint(cp, log.signer))
    assert_refused(r, 422, b"size-0 checkpoint with another root than the empty tree's\n")


def test_same_size_with_another_root_is_422(world: World) -> None:
    log = world.log().grow(8)
    assert world.post(log.body(0, 8)).status_code == 200
    fork = log.fork(5).grow(8)
    r = world.post(fork.body(8, 8))
    assert_refused(r, 422, b"same size as the latest cosigned checkpoint with another root\n")
    # The same checkpoint with a non-empty "proof": not consistent either.
    r = world.post(log.body(8, 8, proof=[log.root(8)]))
    assert_refused(r, 422, b"consistency proof does not verify\n")


# --------------------------------------------------------------------------- check order


def test_check_order(world: World) -> None:
    """parse -> origin -> signatures -> old > size -> 409 -> proof (422)."""
    log = world.log().grow(6)
    impostor = NoteSigner(log.origin, Ed25519PrivateKey.generate())
    stranger = LogSide(unique_origin("unknown.example")).grow(6)
    # malformed beats unknown origin
    r = world.post(b"old 01\n\n" + stranger.note(6))
    assert r.status_code == 400
    # unknown origin beats a bad signature and old > size
    assert world.post(b"old 9\n\n" + stranger.note(6)).status_code == 404
    # a bad signature beats old > size and 409
    assert world.post(b"old 9\n\n" + log.note(6, impostor)).status_code == 403
    assert world.post(log.body(3, 6, note=log.note(6, impostor))).status_code == 403
    # old > size beats 409
    assert world.post(b"old 9\n\n" + log.note(6)).status_code == 400
    # 409 beats a bad proof
    assert world.post(log.body(2, 6, proof=[bytes(32)])).status_code == 409
    assert world.post(log.body(0, 6, proof=[bytes(32)])).status_code == 422


# --------------------------------------------------------------------------- HTTP surface


def test_only_post_on_add_checkpoint(world: World) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = world.client.request(method, f"{world.url}/add-checkpoint")
        assert (r.status_code, r.headers["allow"], r.content) == (
            405,
            "POST",
            b"method not allowed: use POST\n",
        )
    for path in ("/", "/add-checkpoint/", "/Add-Checkpoint", "/add-checkpoint/x", "/checkpoint"):
        r = world.client.post(f"{world.url}{path}", content=b"old 0\n")
        assert_refused(r, 404, b"not found\n")


def test_body_cap_is_413(world: World) -> None:
    r = world.post(b"old 0\n" + b"A" * (64 * 1024))
    assert_refused(r, 413, b"request body larger than 65536 bytes\n")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, counted as it comes
        for _ in range(70):
            yield b"A" * 1024

    r = world.client.post(f"{world.url}/add-checkpoint", content=chunks())
    assert_refused(r, 413, b"request body larger than 65536 bytes\n")
