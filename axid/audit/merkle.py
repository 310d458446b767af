"""RFC 6962 / RFC 9162 section 2.1 Merkle tree hashing and proofs, as pure functions.

Modelled on transparency-dev/merkle: nothing here does I/O. Proof *generation*
reads perfect-subtree hashes through a caller-supplied :data:`NodeGetter`
(``get(level, index)`` -> the hash of the perfect subtree over leaves
``[index * 2**level, (index + 1) * 2**level)``), so storage only keeps perfect
nodes and a proof costs O(log n) reads. Proof *verification* is the
bit-manipulation algorithm of RFC 9162 2.1.3.2 / 2.1.4.2, preceded by exact
proof-length checks so a malformed proof fails before any hashing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from axid.audit.errors import AuditError

__all__ = [
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "CompactRange",
    "ListNodes",
    "NodeGetter",
    "ProofError",
    "SubtreeEdge",
    "consistency_proof",
    "consistency_proof_size",
    "empty_root",
    "inclusion_proof",
    "inclusion_proof_size",
    "leaf_hash",
    "node_coords_for_leaf",
    "node_hash",
    "range_hash",
    "root_from_leaf_hashes",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
# Tree sizes are uint64 in RFC 9162 and in C2SP tlog-checkpoint.
MAX_TREE_SIZE = 2**64 - 1

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

NodeGetter = Callable[[int, int], bytes]
"""``get(level, index)``: hash of the perfect subtree covering leaves
``[index * 2**level, (index + 1) * 2**level)``."""


class ProofError(AuditError, ValueError):
    """A proof, hash or tree size failed verification (or is malformed)."""


# --------------------------------------------------------------------------- hashing


def empty_root() -> bytes:
    """MTH({}) = SHA-256 of the empty string."""
    return hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("leaf data must be bytes")
    return hashlib.sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right) for two 32-byte child hashes."""
    _check_hash(left, "left child hash")
    _check_hash(right, "right child hash")
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _node(left: bytes, right: bytes) -> bytes:
    # Unchecked inner loop variant: callers have already validated both inputs.
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProofError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {len(value)}")
    return value


def _check_int(value: object, what: str) -> int:
    # bool is an int subclass; a True "size" is a bug, not a tree size.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProofError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0 or value > MAX_TREE_SIZE:
        raise ProofError(f"{what} out of range: {value}")
    return value


def _check_proof(proof: object) -> list[bytes]:
    # bytes/str are Sequences too; a proof is a sequence of hashes, never one blob.
    if isinstance(proof, bytes | bytearray | memoryview | str) or not isinstance(proof, Sequence):
        raise ProofError(f"proof must be a sequence of hashes, got {type(proof).__name__}")
    return [_check_hash(p, f"proof[{i}]") for i, p in enumerate(proof)]


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly less than n (n > 1), the RFC 9162 split point k."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over a list of leaf hashes, iteratively in O(n) time and O(log n) memory."""
    cr = CompactRange()
    for h in hashes:
        cr.append(h)
    return cr.root()


# --------------------------------------------------------------------------- node access


def _get(get: NodeGetter, level: int, index: int) -> bytes:
    h = get(level, index)
    # Some database drivers hand back memoryview/bytearray for binary columns.
    if isinstance(h, bytearray | memoryview):
        h = bytes(h)
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise ProofError(
            f"node getter returned a malformed hash for node ({level}, {index}): "
            f"{type(h).__name__} of length {len(h) if isinstance(h, bytes) else '?'}"
        )
    return h


def range_hash(start: int, end: int, get: NodeGetter) -> bytes:
    """MTH(D[start:end]) from O(log n) perfect-subtree hashes.

    The range must be a subtree as the RFC 9162 recursion produces them:
    ``start`` aligned to the smallest power of two >= ``end - start``. Such a
    range's MTH is the right fold of its descending power-of-two decomposition.
    ``range_hash(0, 0, get)`` is the empty root.
    """
    if (
        not isinstance(start, int)
        or not isinstance(end, int)
        or isinstance(start, bool)
        or isinstance(end, bool)
    ):
        raise TypeError("start and end must be ints")
    if start < 0 or end < start or end > MAX_TREE_SIZE:
        raise ValueError(f"invalid range [{start}, {end})")
    n = end - start
    if n == 0:
        if start != 0:
            raise ValueError(f"empty range [{start}, {end}) is not a subtree")
        return empty_root()
    if start % (1 << (n - 1).bit_length()) != 0:
        raise ValueError(f"range [{start}, {end}) is not an aligned subtree")
    nodes: list[bytes] = []
    pos = start
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            nodes.append(_get(get, level, pos >> level))
            pos += 1 << level
    h = nodes[-1]
    for left in reversed(nodes[:-1]):
        h = _node(left, h)
    return h


def tree_root(size: int, get: NodeGetter) -> bytes:
    """MTH(D[0:size])."""
    return range_hash(0, size, get)


# --------------------------------------------------------------------------- proof sizes


def inclusion_proof_size(index: int, size: int) -> int:
    """Exact number of hashes in the inclusion proof of leaf ``index`` in a tree of ``size``."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} not in tree of size {size}")
    # As transparency-dev/merkle decompInclProof: the path splits into an
    # "inner" part below the point where index and size-1 diverge, plus one
    # sibling for each set bit above it (the "border" with the right edge).
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner + border


def consistency_proof_size(size1: int, size2: int) -> int:
    """Exact number of hashes in a consistency proof between two tree sizes."""
    if not 0 <= size1 <= size2:
        raise ValueError(f"invalid sizes {size1}, {size2}")
    if size1 == 0 or size1 == size2:
        return 0
    shift = (size1 & -size1).bit_length() - 1  # trailing zeros
    inner = (((size1 - 1) ^ (size2 - 1)).bit_length()) - shift
    border = ((size1 - 1) >> (inner + shift)).bit_count()
    seed = 0 if size1 == 1 << shift else 1
    return seed + inner + border


# --------------------------------------------------------------------------- generation


def inclusion_proof(index: int, size: int, get: NodeGetter) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(index, D[0:size]), deepest sibling first."""
    if not isinstance(index, int) or not isinstance(size, int):
        raise TypeError("index and size must be ints")
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise ValueError(f"leaf index {index} not in tree of size {size}")
    siblings: list[bytes] = []  # collected top-down; the proof lists them bottom-up
    lo, hi, m = 0, size, index
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if m < k:
            # PATH(m, D[lo:lo+k]) : MTH(D[lo+k:hi])
            siblings.append(range_hash(lo + k, hi, get))
            hi = lo + k
        else:
            # PATH(m-k, D[lo+k:hi]) : MTH(D[lo:lo+k]) -- a perfect subtree
            siblings.append(_get(get, k.bit_length() - 1, lo // k))
            lo, m = lo + k, m - k
    siblings.reverse()
    return siblings


def consistency_proof(size1: int, size2: int, get: NodeGetter) -> list[bytes]:
    """RFC 9162 2.1.4.1 PROOF(size1, D[0:size2]).

    Requires ``0 < size1 < size2`` (RFC 9162 defines no proof for the other
    cases; their verification needs an empty proof).
    """
    if not isinstance(size1, int) or not isinstance(size2, int):
        raise TypeError("sizes must be ints")
    if not 0 < size1 < size2 <= MAX_TREE_SIZE:
        raise ValueError(f"consistency proof needs 0 < size1 < size2, got {size1}, {size2}")
    siblings: list[bytes] = []  # top-down; reversed at the end
    lo, hi, m, complete = 0, size2, size1, True
    while m != hi - lo:
        k = _largest_pow2_below(hi - lo)
        if m <= k:
            # SUBPROOF(m, D[lo:lo+k], b) : MTH(D[lo+k:hi])
            siblings.append(range_hash(lo + k, hi, get))
            hi = lo + k
        else:
            # SUBPROOF(m-k, D[lo+k:hi], false) : MTH(D[lo:lo+k])
            siblings.append(_get(get, k.bit_length() - 1, lo // k))
            lo, m, complete = lo + k, m - k, False
    siblings.reverse()
    if not complete:
        # SUBPROOF(m, D[m], false) = {MTH(D[m])}: the old tree's last subtree.
        siblings.insert(0, range_hash(lo, hi, get))
    return siblings


# --------------------------------------------------------------------------- verification


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 2.1.3.2: raise :class:`ProofError` unless ``proof`` proves the leaf."""
    index = _check_int(index, "leaf index")
    size = _check_int(size, "tree size")
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root hash")
    path = _check_proof(proof)
    if index >= size:
        raise ProofError(f"leaf index {index} not in tree of size {size}")
    want = inclusion_proof_size(index, size)
    if len(path) != want:
        raise ProofError(f"wrong inclusion proof size {len(path)}, want {want}")

    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof too short")
    if not hmac.compare_digest(r, root):
        raise ProofError("inclusion proof does not match the root hash")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2: raise :class:`ProofError` unless the trees are consistent.

    Edge cases (RFC 9162 2.1.4.2 and transparency-dev/merkle): equal sizes need
    an empty proof and equal roots; ``size1 == 0`` needs an empty proof, and
    here also ``root1`` equal to the empty root (a size-0 tree has no other).
    """
    size1 = _check_int(size1, "size1")
    size2 = _check_int(size2, "size2")
    _check_hash(root1, "root1")
    _check_hash(root2, "root2")
    path = _check_proof(proof)
    if size1 > size2:
        raise ProofError(f"size1 ({size1}) > size2 ({size2})")
    if size1 == size2:
        if path:
            raise ProofError("size1 == size2 but the proof is not empty")
        if size1 == 0 and not hmac.compare_digest(root1, empty_root()):
            raise ProofError("root of an empty tree is not the empty root")
        if not hmac.compare_digest(root1, root2):
            raise ProofError("size1 == size2 but the roots differ")
        return
    if size1 == 0:
        if path:
            raise ProofError("size1 == 0 but the proof is not empty")
        if not hmac.compare_digest(root1, empty_root()):
            raise ProofError("root of an empty tree is not the empty root")
        return
    if not path:
        raise ProofError("empty consistency proof")
    want = consistency_proof_size(size1, size2)
    if len(path) != want:
        raise ProofError(f"wrong consistency proof size {len(path)}, want {want}")
    fr, sr = _consistency_roots(size1, size2, root1, path)
    if not hmac.compare_digest(fr, root1):
        raise ProofError("consistency proof does not match root1")
    if not hmac.compare_digest(sr, root2):
        raise ProofError("consistency proof does not match root2")


def _consistency_roots(
    size1: int, size2: int, root1: bytes, path: list[bytes]
) -> tuple[bytes, bytes]:
    """RFC 9162 2.1.4.2 steps 2-7 for ``0 < size1 < size2``: the two roots the proof gives."""
    # 2. If size1 is an exact power of 2, prepend root1.
    if size1 & (size1 - 1) == 0:
        path = [root1, *path]
    # 3-4.
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5-6.
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError("consistency proof too short")
    return fr, sr


# --------------------------------------------------------------------------- storage helpers


def node_coords_for_leaf(index: int) -> list[tuple[int, int]]:
    """The perfect nodes ``(level, index)`` completed by appending leaf ``index``.

    Always ``(0, index)``, then one node per trailing 1-bit of ``index``
    (each closes a perfect subtree ending at this leaf). Bottom-up order.
    """
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError("index must be an int")
    if not 0 <= index < MAX_TREE_SIZE:
        raise ValueError(f"leaf index out of range: {index}")
    coords = [(0, index)]
    level, i = 0, index
    while i & 1:
        level, i = level + 1, i >> 1
        coords.append((level, i))
    return coords


class CompactRange:
    """The right edge of a tree: one perfect-subtree hash per set bit of ``size``.

    Lets an appender compute every new perfect node and the root without
    reading storage. ``hashes[0]`` is the largest (leftmost) subtree.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TREE_SIZE:
            raise ValueError(f"invalid size: {size!r}")
        hs = [_check_hash(h, "compact range hash") for h in hashes]
        if len(hs) != size.bit_count():
            raise ValueError(f"a compact range of size {size} has {size.bit_count()} hashes")
        self._size = size
        self._hashes = hs

    @classmethod
    def from_getter(cls, size: int, get: NodeGetter) -> CompactRange:
        """Rebuild the compact range of a stored tree from its perfect nodes."""
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TREE_SIZE:
            raise ValueError(f"invalid size: {size!r}")
        hashes: list[bytes] = []
        pos = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                hashes.append(_get(get, level, pos >> level))
                pos += 1 << level
        return cls(size, hashes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; return the newly complete ``(level, index, hash)`` nodes."""
        _check_hash(leaf_hash, "leaf hash")
        if self._size >= MAX_TREE_SIZE:
            raise ValueError("tree is full")
        index = self._size
        h = leaf_hash
        new = [(0, index, h)]
        level, i = 0, index
        # Each trailing 1-bit of the old size is a sibling that now merges.
        while i & 1:
            h = _node(self._hashes.pop(), h)
            level, i = level + 1, i >> 1
            new.append((level, i, h))
        self._hashes.append(h)
        self._size += 1
        return new

    def root(self) -> bytes:
        """MTH of the whole range (the empty root for size 0)."""
        if not self._hashes:
            return empty_root()
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = _node(left, h)
        return h

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size})"


class SubtreeEdge:
    """The right edge of a tree being rebuilt, as in :class:`CompactRange`
    (one perfect subtree hash per set bit of ``size``, largest first), but
    also taking whole perfect subtrees: a clean range costs the verification
    pass (:mod:`axid.audit.reference`) one call per subtree, not one per leaf.
    Unchecked, for that hot path: its caller hands it hashes it computed."""

    __slots__ = ("hashes", "size")

    def __init__(self) -> None:
        self.size = 0
        self.hashes: list[bytes] = []

    def add(self, level: int, h: bytes) -> None:
        """Append the subtree of ``2**level`` leaves starting at ``size`` (a multiple of it)."""
        size = self.size
        if size & ((1 << level) - 1):  # pragma: no cover - chunks are aligned
            raise AssertionError("unaligned subtree")
        bit = 1 << level
        hashes = self.hashes
        while size & bit:  # each set bit from ``level`` up is a left sibling to merge
            h = hashlib.sha256(b"\x01" + hashes.pop() + h).digest()
            bit <<= 1
        hashes.append(h)
        self.size = size + (1 << level)

    def root(self) -> bytes:
        return CompactRange(self.size, self.hashes).root()


class ListNodes:
    """A :data:`NodeGetter` over an in-memory list of leaf hashes (tests, exports).

    Keeps every complete perfect node, level by level: O(n) memory.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf_hash: bytes) -> None:
        _check_hash(leaf_hash, "leaf hash")
        self._levels[0].append(leaf_hash)
        level = 0
        while len(self._levels[level]) % 2 == 0:
            row = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(_node(row[-2], row[-1]))
            level += 1

    def __call__(self, level: int, index: int) -> bytes:
        if level < 0 or index < 0 or level >= len(self._levels):
            raise KeyError((level, index))
        row = self._levels[level]
        if index >= len(row):
            raise KeyError((level, index))
        return row[index]

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all of them by default)."""
        return tree_root(self.size if size is None else size, self)
