"""LeafTree and LeafIndex give exactly MemoryTree's answers in a fraction of the memory."""

from __future__ import annotations

import random

import pytest

from audit.compact import LeafIndex, LeafTree
from audit.merkle import EMPTY_ROOT, MemoryTree, leaf_hash


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 9, 255, 256, 257, 1000])
def test_roots_and_proofs_equal_memory_tree(size: int) -> None:
    leaves = [leaf_hash(str(i).encode()) for i in range(size)]
    lean, full = LeafTree(leaves), MemoryTree(leaves)
    assert lean.root() == full.root() == (EMPTY_ROOT if size == 0 else full.root())
    assert lean.leaf_bytes() == full.leaf_bytes()
    rng = random.Random(size)
    for _ in range(20 if size else 0):
        old = rng.randint(1, size)
        new = rng.randint(old, size)
        index = rng.randrange(new)
        assert lean.root(old) == full.root(old)
        assert lean.inclusion_proof(index, new) == full.inclusion_proof(index, new)
        assert lean.consistency_proof(old, new) == full.consistency_proof(old, new)
    assert LeafTree.from_leaf_bytes(full.leaf_bytes()).root() == full.root()


def test_find_is_aligned_and_index_confirms_nothing_by_prefix_alone() -> None:
    tree = LeafTree()
    # A hash whose bytes straddle two stored leaves must not be found at an unaligned offset.
    a, b = bytes(range(32)), bytes(range(32, 64))
    tree.extend([a, b])
    assert tree.find(a) == 0 and tree.find(b) == 1 and tree.find(a[16:] + b[:16]) is None
    index = LeafIndex(capacity=4)
    hashes = [leaf_hash(str(i).encode()) for i in range(5000)]
    assert not any(index.add(h) for h in hashes)  # grows past its first capacity
    assert all(index.add(h) for h in hashes[::97]) and len(index) == 5000
    # Same 8-byte prefix, different hash: the index says "seen", the tree says "no".
    twin = hashes[0][:8] + bytes(24)
    assert index.add(twin)
    assert LeafTree(hashes).find(twin) is None
    assert not LeafIndex().add(bytes(32))  # an all-zero prefix is stored too
