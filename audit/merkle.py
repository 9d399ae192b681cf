"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Why a "node source": the log lives in memory (the verifier, tests, benchmarks) and in a database
(the coordinator's store). Both keep the hash of every *complete* subtree, addressed by
(level, index): the subtree over leaves [index * 2**level, (index + 1) * 2**level). Every root and
proof of RFC 6962 is a function of O(log n) such nodes, so the algorithms here are written once
against the `NodeSource` protocol and never rebuild a tree. An append creates the new leaf node
plus one parent per level that it completes (`append_nodes`), which is amortized O(1) and at
most O(log n) writes.

Hashes (RFC 6962 section 2.1):
    leaf_hash(d)    = SHA-256(0x00 || d)
    node_hash(l, r) = SHA-256(0x01 || l || r)
    root of the empty tree = SHA-256("")

Verification follows RFC 9162 sections 2.1.3.2 (inclusion) and 2.1.4.2 (consistency) strictly:
a proof of the wrong length, a hash that is not 32 bytes, an index outside the tree, or a
consistency check from the empty tree (size1 == 0) is rejected with `ProofError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof did not verify, or its parameters are impossible; the message says why."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return _sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(NODE_PREFIX + left + right).digest()


class NodeSource(Protocol):
    """Anything that can return the hash of a complete subtree.

    `node(level, index)` is the hash of the complete subtree over leaves
    [index * 2**level, (index + 1) * 2**level); level 0 is the leaf hashes themselves.
    Only nodes whose whole range lies inside the tree are ever asked for.
    """

    def node(self, level: int, index: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Node:
    """One complete-subtree hash to persist: (level, index, hash)."""

    level: int
    index: int
    hash: bytes


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 6962: the largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def fold_subtrees(parts: Sequence[bytes]) -> bytes:
    """MTH of the leaves under complete subtrees laid out left to right, largest first (a
    compact range from a power-of-two boundary, or a tree's right frontier): folded from the
    right, as RFC 6962's recursion splits them. `parts` must not be empty."""
    result = parts[-1]
    for part in reversed(parts[:-1]):
        result = _sha256(NODE_PREFIX + part + result).digest()
    return result


def push_frontier(frontier: list[bytes], index: int, leaf: bytes) -> None:
    """Append leaf hash `leaf` at `index` (the size before it) to `frontier`, the roots of the
    complete subtrees of the first `index` leaves, largest first: merge while the new leaf
    completes a subtree (one merge per trailing 1 bit of `index`, amortized O(1))."""
    current, n = leaf, index
    while n & 1:
        current = _sha256(NODE_PREFIX + frontier.pop() + current).digest()
        n >>= 1
    frontier.append(current)


def _range_hash(source: NodeSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range that RFC 6962's recursion produces.

    Such a range starts at a multiple of a power of two that is at least its length, so it is
    the binary decomposition of (end - start) into complete subtrees laid out from `start`,
    largest first; MTH folds them from the right. Reads popcount(end - start) nodes.
    """
    parts: list[bytes] = []
    position = start
    remaining = end - start
    while remaining:
        level = remaining.bit_length() - 1
        parts.append(source.node(level, position >> level))
        position += 1 << level
        remaining -= 1 << level
    return fold_subtrees(parts)


def root(source: NodeSource, size: int) -> bytes:
    """The root hash of the first `size` leaves (SHA-256("") for size 0)."""
    if size < 0:
        raise ValueError(f"size: must be >= 0, got {size}")
    if size == 0:
        return EMPTY_ROOT
    return _range_hash(source, 0, size)


def inclusion_proof(source: NodeSource, index: int, size: int) -> list[bytes]:
    """RFC 9162 section 2.1.3.1 PATH(index, D[0:size]), bottom-up (leaf's sibling first)."""
    if not 0 <= index < size:
        raise ValueError(f"index: {index} is not inside a tree of size {size}")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if m < k:
            path.append(_range_hash(source, start + k, end))
            end = start + k
        else:
            path.append(_range_hash(source, start, start + k))
            start += k
            m -= k
    path.reverse()
    return path


def consistency_proof(source: NodeSource, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 section 2.1.4.1 PROOF(old_size, D[0:new_size]); empty when the sizes are equal."""
    if not 0 < old_size <= new_size:
        raise ValueError(f"old_size: need 0 < old_size <= new_size, got {old_size} and {new_size}")
    if old_size == new_size:
        return []
    path: list[bytes] = []
    start, end, m, complete = 0, new_size, old_size, True
    while True:
        if m == end - start:
            if not complete:
                path.append(_range_hash(source, start, end))
            break
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            path.append(_range_hash(source, start + k, end))
            end = start + k
        else:
            path.append(_range_hash(source, start, start + k))
            start += k
            m -= k
            complete = False
    path.reverse()
    return path


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name}: must be {HASH_SIZE} bytes, got {len(value)}")


def root_from_inclusion_proof(leaf: bytes, index: int, size: int,
                              proof: Sequence[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2: the root that `proof` implies for `leaf` at `index`."""
    if index < 0 or size < 0:
        raise ProofError(f"index/size: must be >= 0, got {index}/{size}")
    if index >= size:
        raise ProofError(f"index: {index} is not inside a tree of size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, leaf
    for position, p in enumerate(proof):
        _check_hash(f"proof[{position}]", p)
        if sn == 0:
            raise ProofError(f"proof: too long for index {index} in size {size}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"proof: too short for index {index} in size {size}")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     expected_root: bytes) -> None:
    """Raise ProofError unless `proof` shows leaf hash `leaf` at `index` in the tree `expected_root`."""
    _check_hash("root", expected_root)
    computed = root_from_inclusion_proof(leaf, index, size, proof)
    if computed != expected_root:
        raise ProofError(f"root: the proof for index {index} in size {size} gives a different root")


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes,
                       new_root: bytes) -> None:
    """Raise ProofError unless `proof` shows tree (old_size, old_root) is a prefix of (new_size, new_root).

    A check from the empty tree (old_size == 0) is rejected: it proves nothing (as upstream
    transparency-dev/merkle does). Equal sizes need an empty proof and byte-equal roots.
    """
    if old_size <= 0:
        raise ProofError(f"old_size: must be > 0, got {old_size}")
    if old_size > new_size:
        raise ProofError(f"old_size: {old_size} is larger than new_size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("proof: must be empty when the sizes are equal")
        if old_root != new_root:
            raise ProofError(f"root: equal sizes {old_size} but different roots")
        return
    if not proof:
        raise ProofError("proof: empty, but the sizes differ")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for position, p in enumerate(proof):
        _check_hash(f"proof[{position}]", p)
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node itself
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"proof: too long for sizes {old_size} -> {new_size}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"proof: too short for sizes {old_size} -> {new_size}")
    if fr != old_root:
        raise ProofError(f"old root: the proof does not reproduce the root of size {old_size}")
    if sr != new_root:
        raise ProofError(f"new root: the proof does not reproduce the root of size {new_size}")


def append_nodes(source: NodeSource, size: int, leaf_hashes: Iterable[bytes]) -> list[Node]:
    """The complete-subtree nodes that appending `leaf_hashes` to a tree of `size` leaves creates.

    Returns the new leaf nodes (level 0) and every parent they complete, in creation order, so
    a database store can insert exactly these rows per append (or per group commit). Existing
    nodes are read from `source`; nodes created earlier in the same batch come from the result.
    """
    created: dict[tuple[int, int], bytes] = {}
    out: list[Node] = []
    n = size
    for h in leaf_hashes:
        _check_hash("leaf hash", h)
        level, index, current = 0, n, h
        created[(0, index)] = current
        out.append(Node(0, index, current))
        while index & 1:
            left = created.get((level, index - 1))
            if left is None:
                left = source.node(level, index - 1)
            current = node_hash(left, current)
            level += 1
            index >>= 1
            created[(level, index)] = current
            out.append(Node(level, index, current))
        n += 1
    return out


class MemoryTree:
    """An in-memory RFC 6962 tree that keeps every complete subtree hash.

    Level l is one bytearray of 32-byte hashes, so a million leaves cost about 64 MB. `append`
    is amortized O(1) hashes (at most O(log n)); roots and proofs for any earlier size read
    O(log n) nodes.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def append_data(self, data: bytes) -> int:
        """Append one leaf given its data (hashed here); return its index."""
        return self.append(leaf_hash(data))

    def append(self, leaf: bytes) -> int:
        """Append one leaf hash; return its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash: must be {HASH_SIZE} bytes, got {len(leaf)}")
        levels = self._levels
        index = self._size
        levels[0] += leaf
        current = leaf
        level = 0
        i = index
        while i & 1:
            row = levels[level]
            left = bytes(row[(i - 1) * HASH_SIZE:i * HASH_SIZE])
            current = _sha256(NODE_PREFIX + left + current).digest()
            level += 1
            i >>= 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += current
        self._size = index + 1
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def node(self, level: int, index: int) -> bytes:
        if level < 0 or index < 0 or level >= len(self._levels):
            raise IndexError(f"node ({level}, {index}) is not in the tree")
        row = self._levels[level]
        start = index * HASH_SIZE
        if start + HASH_SIZE > len(row):
            raise IndexError(f"node ({level}, {index}) is not in the tree")
        return bytes(row[start:start + HASH_SIZE])

    def leaf(self, index: int) -> bytes:
        return self.node(0, index)

    def leaf_bytes(self, size: int | None = None) -> bytes:
        """The first `size` leaf hashes, concatenated (32 bytes each)."""
        size = self._size_or_current(size)
        return bytes(self._levels[0][:size * HASH_SIZE])

    @classmethod
    def from_leaf_bytes(cls, data: bytes) -> MemoryTree:
        """A tree from concatenated 32-byte leaf hashes, built level by level."""
        if len(data) % HASH_SIZE:
            raise ValueError(f"leaf hashes: length {len(data)} is not a multiple of {HASH_SIZE}")
        tree = cls()
        tree._levels = [bytearray(data)]
        tree._size = len(data) // HASH_SIZE
        row = tree._levels[0]
        while len(row) >= 2 * HASH_SIZE:
            pairs = len(row) // (2 * HASH_SIZE)
            parent = bytearray()
            for i in range(pairs):
                start = 2 * i * HASH_SIZE
                parent += _sha256(NODE_PREFIX + row[start:start + 2 * HASH_SIZE]).digest()
            tree._levels.append(parent)
            row = parent
        return tree

    def _size_or_current(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"size: {size} is not between 0 and the tree size {self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        return root(self, self._size_or_current(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(self, index, self._size_or_current(size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return consistency_proof(self, old_size, self._size_or_current(new_size))
