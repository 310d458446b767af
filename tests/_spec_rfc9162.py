"""RFC 9162 Merkle tree hashing and proof verification, written from the RFC text only.

A test oracle, independent of ``axid.audit.merkle``: each function follows the
numbered steps of the RFC section it names, with the RFC's variable names.
Nothing here imports the project.

- 2.1.1  MTH({}) = HASH(), MTH({d(0)}) = HASH(0x00 || d(0)),
         MTH(D_n) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n])), k the largest
         power of two smaller than n.
- 2.1.3.2  verifying an inclusion proof.
- 2.1.4.2  verifying a consistency proof.

HASH is SHA-256 (the hash of the log's algorithm, RFC 9162 section 4.2 lists
SHA-256 only), so every hash, in a proof or given, is 32 bytes; anything
else is not a hash of this tree and fails. Verification returns a bool, as
the RFC's "fail the proof verification" / "the log has proven" wording; it
never raises on a proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def HASH(data: bytes) -> bytes:  # the RFC's name
    return hashlib.sha256(data).digest()


def leaf_hash(entry: bytes) -> bytes:
    """MTH({d(0)}) = HASH(0x00 || d(0)) (2.1.1)."""
    return HASH(b"\x00" + entry)


def node_hash(left: bytes, right: bytes) -> bytes:
    """HASH(0x01 || left || right) (2.1.1)."""
    return HASH(b"\x01" + left + right)


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1) (2.1.1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(entries: Sequence[bytes]) -> bytes:
    """MTH(D_n) over the entries themselves (2.1.1), recursively as written."""
    n = len(entries)
    if n == 0:
        return HASH(b"")
    if n == 1:
        return leaf_hash(entries[0])
    k = _k(n)
    return node_hash(mth(entries[:k]), mth(entries[k:]))


def mth_of_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """MTH over already hashed leaves (the same recursion, leaves given as their hashes)."""
    n = len(leaves)
    if n == 0:
        return HASH(b"")
    if n == 1:
        return leaves[0]
    k = _k(n)
    return node_hash(mth_of_leaf_hashes(leaves[:k]), mth_of_leaf_hashes(leaves[k:]))


HASH_SIZE = 32  # SHA-256


def _are_hashes(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def _lsb(x: int) -> bool:
    return x & 1 == 1


def verify_inclusion(
    leaf_index: int,
    tree_size: int,
    hash: bytes,  # the RFC's name for the leaf hash
    inclusion_path: Sequence[bytes],
    root_hash: bytes,
) -> bool:
    """RFC 9162 2.1.3.2, step by step."""
    if not _are_hashes(hash, root_hash, *inclusion_path):
        return False
    # 1. If leaf_index >= tree_size, fail.
    if leaf_index >= tree_size:
        return False
    # 2. Set fn to leaf_index and sn to tree_size - 1.
    fn, sn = leaf_index, tree_size - 1
    # 3. Set r to hash.
    r = hash
    # 4. For each value p in the inclusion_path array:
    for p in inclusion_path:
        # a. If sn is 0, stop the iteration and fail the proof verification.
        if sn == 0:
            return False
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if _lsb(fn) or fn == sn:
            # i. Set r to HASH(0x01 || p || r).
            r = node_hash(p, r)
            # ii. If LSB(fn) is not set, then right-shift both fn and sn equally
            #     until either LSB(fn) is set or fn is 0.
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        # Otherwise: i. Set r to HASH(0x01 || r || p).
        else:
            r = node_hash(r, p)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 5. Compare sn to 0. Compare r against the root_hash. If sn is equal to 0
    #    and r and the root_hash are equal, the log has proven the inclusion.
    return sn == 0 and r == root_hash


def verify_consistency(
    first: int,
    second: int,
    first_hash: bytes,
    second_hash: bytes,
    consistency_path: Sequence[bytes],
) -> bool:
    """RFC 9162 2.1.4.2, step by step, for 0 < first < second.

    The RFC's algorithm starts from a non-empty proof between two different
    sizes; the cases it leaves out are decided as its 2.1.4 says a proof
    between them is: equal sizes are consistent iff the roots are equal (the
    proof is empty), and the empty tree (first = 0, whose root is HASH()) is a
    prefix of every tree (the proof is empty).
    """
    if first > second or not _are_hashes(first_hash, second_hash, *consistency_path):
        return False
    if first == second:
        return not consistency_path and first_hash == second_hash
    if first == 0:
        return not consistency_path and first_hash == HASH(b"")
    path = list(consistency_path)
    # 1. If consistency_path is an empty array, stop and fail the proof verification.
    if not path:
        return False
    # 2. If first is an exact power of 2, then prepend first_hash to the consistency_path array.
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # 3. Set fn to first - 1 and sn to second - 1.
    fn, sn = first - 1, second - 1
    # 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set.
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    # 5. Set both fr and sr to the first value in the consistency_path array.
    fr = sr = path[0]
    # 6. For each subsequent value c in the consistency_path array:
    for c in path[1:]:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            return False
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if _lsb(fn) or fn == sn:
            # i. Set fr to HASH(0x01 || c || fr).  ii. Set sr to HASH(0x01 || c || sr).
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # iii. If LSB(fn) is not set, then right-shift both fn and sn equally
            #      until either LSB(fn) is set or fn is 0.
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        # Otherwise: i. Set sr to HASH(0x01 || sr || c).
        else:
            sr = node_hash(sr, c)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 7. Verify that fr equals first_hash, sr equals second_hash, and sn is 0.
    return fr == first_hash and sr == second_hash and sn == 0
