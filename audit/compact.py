"""Memory-lean structures for verifying a long log in one pass.

Why: `audit verify` of a million entries must fit in a small, predictable amount of memory
(docs/benchmarks/audit-verify.md). `MemoryTree` keeps every level of the tree (64 bytes per
entry) and a dict of leaf prefixes costs about 100 bytes per entry; the verifier needs neither:

- `LeafTree` keeps the leaf hashes (32 bytes per entry: the state file and the naming of a forked
  entry need them) and the right frontier of the tree (O(log n) hashes), so appending and the
  current root are O(1) amortized and O(log n). A root or proof for an earlier size is computed
  from the leaves when asked (O(n) hashes, done at most a few times per run).
- `LeafIndex` remembers which 8-byte leaf prefixes were seen, in sorted runs of 8-byte integers
  (8 bytes per entry, numpy), checked and merged a batch at a time; a hit is confirmed against
  the leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    NODE_PREFIX,
    consistency_proof,
    fold_subtrees,
    inclusion_proof,
    push_frontier,
    root,
)

_sha256 = hashlib.sha256


class LeafTree:
    """An RFC 6962 tree of leaf hashes: the leaves plus the right frontier (see module doc).

    The same queries as `audit.merkle.MemoryTree` (it is a `NodeSource`); nodes other than
    leaves and frontier roots are recomputed from the leaves when asked.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._leaves = bytearray()
        self._size = 0
        self._frontier: list[bytes] = []  # roots of the perfect subtrees, largest first
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> int:
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash: must be {HASH_SIZE} bytes, got {len(leaf)}")
        index = self._size
        self._leaves += leaf
        push_frontier(self._frontier, index, leaf)
        self._size = index + 1
        return index

    def extend_bytes(self, data: bytes) -> None:
        """Append the leaf hashes concatenated in `data` (a multiple of 32 bytes).

        The same tree as appending them one by one, with fewer Python calls: the frontier
        takes the largest aligned perfect subtrees of the new leaves, each hashed level by
        level from the bytes (a subtree of 2^k leaves starting at a multiple of 2^k is one
        node of level k, pushed onto the frontier as `push_frontier` pushes a leaf)."""
        count, rest = divmod(len(data), HASH_SIZE)
        if rest:
            raise ValueError(f"leaf hashes: length {len(data)} is not a multiple of {HASH_SIZE}")
        start = self._size
        self._leaves += data
        frontier = self._frontier
        position = 0
        while position < count:
            index = start + position
            width = index & -index if index else 1 << 62  # the alignment of `index`
            while width > count - position:
                width >>= 1
            row = data[position * HASH_SIZE:(position + width) * HASH_SIZE]
            while len(row) > HASH_SIZE:
                row = b"".join([_sha256(NODE_PREFIX + row[i:i + 2 * HASH_SIZE]).digest()
                                for i in range(0, len(row), 2 * HASH_SIZE)])
            current, n = row, index // width
            while n & 1:
                current = _sha256(NODE_PREFIX + frontier.pop() + current).digest()
                n >>= 1
            frontier.append(current)
            position += width
        self._size = start + count

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    @classmethod
    def from_leaf_bytes(cls, data: bytes) -> LeafTree:
        if len(data) % HASH_SIZE:
            raise ValueError(f"leaf hashes: length {len(data)} is not a multiple of {HASH_SIZE}")
        return cls(data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE))

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise IndexError(f"leaf {index} is not in the tree")
        return bytes(self._leaves[index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def leaf_bytes(self, size: int | None = None) -> bytes:
        return bytes(self._leaves[:self._checked(size) * HASH_SIZE])

    def find(self, leaf: bytes) -> int | None:
        """The first index whose leaf hash is `leaf`, or None."""
        at = self._leaves.find(leaf)
        while at >= 0:
            if at % HASH_SIZE == 0:
                return at // HASH_SIZE
            at = self._leaves.find(leaf, at + 1)
        return None

    def node(self, level: int, index: int) -> bytes:
        """The root of leaves [index * 2^level, (index + 1) * 2^level), from the leaves."""
        start, width = index << level, 1 << level
        if level < 0 or index < 0 or start + width > self._size:
            raise IndexError(f"node ({level}, {index}) is not in the tree")
        data = self._leaves
        row = [bytes(data[i * HASH_SIZE:(i + 1) * HASH_SIZE]) for i in range(start, start + width)]
        while len(row) > 1:
            row = [_sha256(NODE_PREFIX + row[i] + row[i + 1]).digest()
                   for i in range(0, len(row), 2)]
        return row[0]

    def _checked(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"size: {size} is not between 0 and the tree size {self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        size = self._checked(size)
        if size != self._size:
            return root(self, size)
        if not self._frontier:
            return EMPTY_ROOT
        return fold_subtrees(self._frontier)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(self, index, self._checked(size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return consistency_proof(self, old_size, self._checked(new_size))


class LeafIndex:
    """Which 8-byte leaf-hash prefixes were added: sorted runs of integers (numpy), merged as
    they grow (at most about log2(n / YOUNG) runs), plus a set of the latest single adds.

    `add` (one leaf) and `add_many` (a batch: the verifier's common case, a few numpy calls per
    batch instead of a Python loop per leaf) answer whether a prefix was there already; the
    caller confirms a hit against the full hashes (LeafTree.find), so a prefix collision never
    reports a false duplicate. 8 bytes per leaf, and up to as much again while two runs merge.
    """

    #: single adds kept in a set before they become a run
    YOUNG = 4096

    def __init__(self, capacity: int = 0) -> None:
        """`capacity`: unused (runs grow as needed); kept for callers that size the index."""
        self._runs: list[np.ndarray] = []  # sorted uint64 arrays, longest first
        self._young: set[int] = set()
        self._count = 0

    def __len__(self) -> int:
        """How many prefixes were added (a prefix added twice counts once if `add` said so)."""
        return self._count

    def add(self, leaf: bytes) -> bool:
        key = int.from_bytes(leaf[:8], "big")
        if key in self._young or any(_holds(run, key) for run in self._runs):
            return True
        self._young.add(key)
        self._count += 1
        if len(self._young) >= self.YOUNG:
            self._flush_young()
        return False

    def add_many(self, data: bytes) -> list[int]:
        """Add the 32-byte leaf hashes concatenated in `data`; the positions (ascending) of
        those whose prefix was there already: added before, or earlier in `data`."""
        keys = np.frombuffer(data, dtype=">u8")[::4].astype(np.uint64)
        if not len(keys):
            return []
        self._flush_young()
        seen = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, keys)
            np.minimum(at, len(run) - 1, out=at)
            seen |= run[at] == keys
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        repeated = ordered[1:] == ordered[:-1]
        if repeated.any():  # equal keys keep their order: each later one was seen
            seen[order[1:][repeated]] = True
        self._push(ordered)
        self._count += len(keys) - int(seen.sum())
        return np.flatnonzero(seen).tolist()

    def _flush_young(self) -> None:
        if self._young:
            self._push(np.array(sorted(self._young), dtype=np.uint64))
            self._young = set()

    def _push(self, run: np.ndarray) -> None:
        runs = self._runs
        while runs and len(runs[-1]) <= 2 * len(run):
            run = np.concatenate((runs.pop(), run))
            run.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
        runs.append(run)


def _holds(run: np.ndarray, key: int) -> bool:
    at = int(np.searchsorted(run, np.uint64(key)))
    return at < len(run) and int(run[at]) == key
