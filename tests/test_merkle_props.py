"""Merkle proofs: exhaustive generate-then-verify against a naive RFC 9162 reference,
compact ranges, storage coordinates, and hypothesis mutation tests."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axid.audit.merkle import (
    HASH_SIZE,
    CompactRange,
    ListNodes,
    ProofError,
    consistency_proof,
    consistency_proof_size,
    empty_root,
    inclusion_proof,
    inclusion_proof_size,
    leaf_hash,
    node_coords_for_leaf,
    node_hash,
    range_hash,
    root_from_leaf_hashes,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

N_MAX = 128
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(N_MAX)]
NODES = ListNodes(LEAVES)


# --------------------------------------------------------------------------- naive reference
# A direct transcription of the RFC 9162 recursive definitions over the leaf
# list, sharing no code with the module under test (memoised for speed only).


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@functools.cache
def naive_mth(lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return _h(b"")
    if n == 1:
        return LEAVES[lo]
    k = _k(n)
    return _h(b"\x01" + naive_mth(lo, lo + k) + naive_mth(lo + k, hi))


def naive_path(m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*naive_path(m, lo, lo + k), naive_mth(lo + k, hi)]
    return [*naive_path(m - k, lo + k, hi), naive_mth(lo, lo + k)]


def naive_subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if b else [naive_mth(lo, hi)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, lo, lo + k, b), naive_mth(lo + k, hi)]
    return [*naive_subproof(m - k, lo + k, hi, False), naive_mth(lo, lo + k)]


class CountingGetter:
    """Counts node reads, to check the O(log n) claim."""

    def __init__(self, get: Callable[[int, int], bytes]) -> None:
        self.get, self.reads = get, 0

    def __call__(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.get(level, index)


def _read_bound(n: int) -> int:
    # At most one imperfect range per proof (O(log n) reads) plus one read per level.
    return 2 * n.bit_length() + 1


# --------------------------------------------------------------------------- exhaustive


def test_roots_and_ranges_match_naive() -> None:
    for n in range(N_MAX + 1):
        assert tree_root(n, NODES) == naive_mth(0, n)
        assert root_from_leaf_hashes(LEAVES[:n]) == naive_mth(0, n)
    # Every aligned subtree range, as the RFC recursion produces them.
    for size in range(1, N_MAX + 1):
        align = 1 << (size - 1).bit_length()
        for start in range(0, N_MAX - size + 1, align):
            assert range_hash(start, start + size, NODES) == naive_mth(start, start + size)


def test_unaligned_ranges_rejected() -> None:
    for start, end in [(1, 3), (2, 5), (4, 9), (3, 3), (5, 4), (-1, 1)]:
        with pytest.raises(ValueError):
            range_hash(start, end, NODES)
    assert range_hash(0, 0, NODES) == empty_root()


def test_inclusion_exhaustive() -> None:
    for n in range(1, N_MAX + 1):
        root = naive_mth(0, n)
        for m in range(n):
            get = CountingGetter(NODES)
            proof = inclusion_proof(m, n, get)
            assert proof == naive_path(m, 0, n), (m, n)
            assert len(proof) == inclusion_proof_size(m, n)
            assert get.reads <= _read_bound(n), (m, n, get.reads)
            verify_inclusion(m, n, LEAVES[m], proof, root)


def test_consistency_exhaustive() -> None:
    for n in range(1, N_MAX + 1):
        root2 = naive_mth(0, n)
        for m in range(1, n + 1):
            root1 = naive_mth(0, m)
            if m == n:
                verify_consistency(m, n, root1, root2, [])
                assert consistency_proof_size(m, n) == 0
                continue
            get = CountingGetter(NODES)
            proof = consistency_proof(m, n, get)
            assert proof == naive_subproof(m, 0, n, True), (m, n)
            assert len(proof) == consistency_proof_size(m, n)
            assert get.reads <= _read_bound(n), (m, n, get.reads)
            verify_consistency(m, n, root1, root2, proof)


def test_empty_tree_consistency() -> None:
    for n in (0, 1, 7):
        verify_consistency(0, n, empty_root(), naive_mth(0, n), [])
    with pytest.raises(ProofError, match="empty root"):
        verify_consistency(0, 3, LEAVES[0], naive_mth(0, 3), [])
    with pytest.raises(ProofError):
        verify_consistency(0, 3, empty_root(), naive_mth(0, 3), [LEAVES[0]])


def test_generation_argument_errors() -> None:
    for m, n in [(0, 0), (5, 5), (-1, 3), (6, 5)]:
        with pytest.raises(ValueError):
            inclusion_proof(m, n, NODES)
    for m, n in [(0, 3), (3, 3), (4, 3), (-1, 2)]:
        with pytest.raises(ValueError):
            consistency_proof(m, n, NODES)


def test_node_getter_must_return_hashes() -> None:
    with pytest.raises(ProofError, match="malformed hash"):
        inclusion_proof(0, 4, lambda level, index: b"short")


class UniformTree:
    """A consistent NodeGetter for a huge tree whose leaves are all equal:
    node (level, i) is the same hash for every i, so sizes near 2**64 are cheap."""

    def __init__(self) -> None:
        self.levels = [leaf_hash(b"same")]
        for _ in range(64):
            self.levels.append(node_hash(self.levels[-1], self.levels[-1]))

    def __call__(self, level: int, index: int) -> bytes:
        assert 0 <= index < 2 ** (64 - level)
        return self.levels[level]


UNIFORM = UniformTree()
_big = st.integers(1, 2**64 - 1)


@settings(max_examples=200, deadline=None)
@given(_big, st.data())
def test_huge_trees(size: int, data: st.DataObject) -> None:
    # O(log n) generation and verification at sizes no list could hold.
    root = tree_root(size, UNIFORM)
    assert CompactRange.from_getter(size, UNIFORM).root() == root
    index = data.draw(st.integers(0, size - 1))
    get = CountingGetter(UNIFORM)
    proof = inclusion_proof(index, size, get)
    assert get.reads <= _read_bound(size)
    verify_inclusion(index, size, UNIFORM.levels[0], proof, root)
    size1 = data.draw(st.integers(1, size))
    root1 = tree_root(size1, UNIFORM)
    proof = consistency_proof(size1, size, get) if size1 < size else []
    verify_consistency(size1, size, root1, root, proof)


# --------------------------------------------------------------------------- compact range


def test_compact_range_matches_list_nodes() -> None:
    cr = CompactRange()
    assert cr.size == 0 and cr.root() == empty_root()
    for i, h in enumerate(LEAVES):
        new = cr.append(h)
        assert [(lvl, idx) for lvl, idx, _ in new] == node_coords_for_leaf(i)
        for lvl, idx, nh in new:
            assert nh == NODES(lvl, idx)
        assert cr.size == i + 1
        assert cr.root() == root_from_leaf_hashes(LEAVES[: i + 1]) == naive_mth(0, i + 1)
        rebuilt = CompactRange.from_getter(i + 1, NODES)
        assert rebuilt.hashes == cr.hashes
        assert CompactRange(i + 1, cr.hashes).root() == cr.root()


def test_node_coords_known() -> None:
    assert node_coords_for_leaf(0) == [(0, 0)]
    assert node_coords_for_leaf(1) == [(0, 1), (1, 0)]
    assert node_coords_for_leaf(6) == [(0, 6)]
    assert node_coords_for_leaf(7) == [(0, 7), (1, 3), (2, 1), (3, 0)]
    with pytest.raises(ValueError):
        node_coords_for_leaf(-1)


def test_compact_range_rejects_bad_state() -> None:
    with pytest.raises(ValueError):
        CompactRange(3, [LEAVES[0]])  # size 3 needs two hashes
    with pytest.raises(ProofError):
        CompactRange(1, [b"x" * 31])
    with pytest.raises(ProofError):
        CompactRange().append(b"x" * 33)


# --------------------------------------------------------------------------- strictness


def test_verify_rejects_malformed_inputs() -> None:
    root = naive_mth(0, 5)
    proof = naive_path(2, 0, 5)
    ok = (2, 5, LEAVES[2], proof, root)
    verify_inclusion(*ok)
    bad_cases = [
        (5, 5, LEAVES[2], proof, root),  # index == size
        (-1, 5, LEAVES[2], proof, root),
        (True, 5, LEAVES[2], proof, root),  # bool is not an index
        (2, 5, LEAVES[2][:31], proof, root),
        (2, 5, LEAVES[2], proof, root + b"\x00"),
        (2, 5, LEAVES[2], b"".join(proof), root),  # one blob is not a proof
        (2, 5, LEAVES[2], [*proof[:-1], bytearray(proof[-1])], root),
        (2, 2**64, LEAVES[2], proof, root),
    ]
    for case in bad_cases:
        with pytest.raises(ProofError):
            verify_inclusion(*case)
    with pytest.raises(ProofError, match=r"size1 .* > size2"):
        verify_consistency(5, 4, root, root, [])
    with pytest.raises(ProofError, match="not empty"):
        verify_consistency(5, 5, root, root, [root])
    with pytest.raises(ProofError, match="roots differ"):
        verify_consistency(5, 5, root, LEAVES[0], [])
    with pytest.raises(ProofError, match="empty consistency proof"):
        verify_consistency(4, 5, naive_mth(0, 4), root, [])


# --------------------------------------------------------------------------- hypothesis

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flip(b: bytes, bit: int) -> bytes:
    bit %= HASH_SIZE * 8
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def inclusion_case(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, N_MAX))
    return draw(st.integers(0, n - 1)), n


@st.composite
def consistency_case(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, N_MAX))
    return draw(st.integers(1, n)), n


@_SETTINGS
@given(inclusion_case(), st.integers(0, 10_000), st.integers(0, 255))
def test_inclusion_bit_flips_fail(case: tuple[int, int], which: int, bit: int) -> None:
    m, n = case
    root, proof = naive_mth(0, n), inclusion_proof(m, n, NODES)
    leaf = LEAVES[m]
    targets = len(proof) + 2
    t = which % targets
    if t < len(proof):
        proof = [*proof]
        proof[t] = _flip(proof[t], bit)
    elif t == len(proof):
        root = _flip(root, bit)
    else:
        leaf = _flip(leaf, bit)
    with pytest.raises(ProofError):
        verify_inclusion(m, n, leaf, proof, root)


@_SETTINGS
@given(consistency_case(), st.integers(0, 10_000), st.integers(0, 255))
def test_consistency_bit_flips_fail(case: tuple[int, int], which: int, bit: int) -> None:
    m, n = case
    root1, root2 = naive_mth(0, m), naive_mth(0, n)
    proof = consistency_proof(m, n, NODES) if m < n else []
    t = which % (len(proof) + 2)
    if t < len(proof):
        proof = [*proof]
        proof[t] = _flip(proof[t], bit)
    elif t == len(proof):
        root1 = _flip(root1, bit)
    else:
        root2 = _flip(root2, bit)
    with pytest.raises(ProofError):
        verify_consistency(m, n, root1, root2, proof)


@_SETTINGS
@given(inclusion_case(), st.integers(0, 10_000), st.booleans())
def test_inclusion_truncated_or_extended_fails(
    case: tuple[int, int], where: int, extend: bool
) -> None:
    m, n = case
    proof = inclusion_proof(m, n, NODES)
    if extend:
        i = where % (len(proof) + 1)
        proof = [*proof[:i], LEAVES[where % N_MAX], *proof[i:]]
    elif proof:
        i = where % len(proof)
        proof = proof[:i] + proof[i + 1 :]
    else:
        return  # nothing to remove from an empty proof
    with pytest.raises(ProofError):
        verify_inclusion(m, n, LEAVES[m], proof, naive_mth(0, n))


@_SETTINGS
@given(consistency_case(), st.integers(0, 10_000), st.booleans())
def test_consistency_truncated_or_extended_fails(
    case: tuple[int, int], where: int, extend: bool
) -> None:
    m, n = case
    proof = consistency_proof(m, n, NODES) if m < n else []
    if extend:
        i = where % (len(proof) + 1)
        proof = [*proof[:i], LEAVES[where % N_MAX], *proof[i:]]
    elif proof:
        i = where % len(proof)
        proof = proof[:i] + proof[i + 1 :]
    else:
        return
    with pytest.raises(ProofError):
        verify_consistency(m, n, naive_mth(0, m), naive_mth(0, n), proof)


@_SETTINGS
@given(inclusion_case(), st.integers(-3, 3))
def test_inclusion_wrong_index_fails(case: tuple[int, int], dm: int) -> None:
    # A valid proof presented for another leaf index must not verify. (Another
    # tree *size* can share a path shape, e.g. leaf 0 in sizes 3 and 4: that is
    # why a checkpoint signs the size together with the root.)
    m, n = case
    if dm == 0:
        return
    proof = inclusion_proof(m, n, NODES)
    with pytest.raises(ProofError):
        verify_inclusion(m + dm, n, LEAVES[m], proof, naive_mth(0, n))


@_SETTINGS
@given(
    st.integers(0, 2**64 + 1),
    st.integers(0, 2**64 + 1),
    st.lists(st.binary(min_size=0, max_size=40), max_size=70),
    st.binary(min_size=30, max_size=34),
    st.binary(min_size=30, max_size=34),
)
def test_verify_random_inputs_only_raise_proof_error(
    a: int, b: int, proof: list[bytes], h1: bytes, h2: bytes
) -> None:
    # Arbitrary garbage: either verifies (never, in practice) or raises ProofError.
    for call in (
        lambda: verify_inclusion(a, b, h1, proof, h2),
        lambda: verify_consistency(a, b, h1, h2, proof),
    ):
        with contextlib.suppress(ProofError):
            call()
