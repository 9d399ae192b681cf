"""Memory-lean structures for verifying a long log in one pass.

Why: `audit verify` of a million entries must fit in a small, predictable amount of memory
(docs/benchmarks/audit-verify.md). `MemoryTree` keeps every level of the tree (64 bytes per
entry) and a dict of leaf prefixes costs about 100 bytes per entry; the verifier needs neither:

- `LeafTree` keeps the leaf hashes (32 bytes per entry: the state file and the naming of a forked
  entry need them) and the right frontier of the tree (O(log n) hashes), so appending and the
  current root are O(1) amortized and O(log n). A root or proof for an earlier size is computed
  from the leaves when asked (O(n) hashes, done at most a few times per run).
- `LeafIndex` remembers which 8-byte leaf prefixes were seen, in an open-addressing table of
  8-byte slots at most half full (8-16 bytes per entry); a hit is confirmed against the leaves.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence

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
    """Which 8-byte leaf-hash prefixes were added: an open-addressing set in 8-byte slots.

    `add` answers whether the prefix was there already; the caller confirms a hit against the
    full hashes (LeafTree.find), so a prefix collision never reports a false duplicate.
    """

    def __init__(self, capacity: int = 1024) -> None:
        slots = 1 << max(4, (2 * capacity - 1).bit_length())
        self._slots = array("Q", bytes(8 * slots))
        self._mask = slots - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, leaf: bytes) -> bool:
        key = int.from_bytes(leaf[:8], "big") or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        i = key & mask
        while True:
            present = slots[i]
            if present == key:
                return True
            if not present:
                break
            i = (i + 1) & mask
        slots[i] = key
        self._count += 1
        if 2 * self._count > mask:
            self._grow()
        return False

    def _grow(self) -> None:
        old: Sequence[int] = self._slots
        slots = array("Q", bytes(16 * len(old)))
        mask = len(slots) - 1
        for key in old:
            if key:
                i = key & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = key
        self._slots, self._mask = slots, mask
