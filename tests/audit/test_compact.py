"""LeafTree and first_repeat give exactly MemoryTree's answers in bounded memory: the same with
the leaves in memory and spilled to the temporary file."""

from __future__ import annotations

import random

import pytest

from audit import compact
from audit.compact import LeafTree, first_repeat
from audit.merkle import EMPTY_ROOT, MemoryTree, leaf_hash


@pytest.mark.parametrize("spill_after", [None, 1, 4, 100])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 9, 255, 256, 257, 1000])
def test_roots_and_proofs_equal_memory_tree(size: int, spill_after: int | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks, so that reading back crosses chunks, file and buffer.
    monkeypatch.setattr(compact, "LEAVES_IN_MEMORY", 8)
    leaves = [leaf_hash(str(i).encode()) for i in range(size)]
    lean, full = LeafTree(leaves, spill_after=spill_after), MemoryTree(leaves)
    assert lean.spilled == (spill_after is not None and size >= spill_after)
    assert lean.root() == full.root() == (EMPTY_ROOT if size == 0 else full.root())
    assert lean.leaf_bytes() == full.leaf_bytes()
    assert b"".join(lean.iter_leaf_bytes(1 if size else 0)) == full.leaf_bytes()[32:]
    rng = random.Random(size)
    for _ in range(20 if size else 0):
        old = rng.randint(1, size)
        new = rng.randint(old, size)
        index = rng.randrange(new)
        assert lean.leaf(index) == leaves[index]
        assert lean.root(old) == full.root(old)
        assert lean.inclusion_proof(index, new) == full.inclusion_proof(index, new)
        assert lean.consistency_proof(old, new) == full.consistency_proof(old, new)
    assert LeafTree.from_leaf_bytes(full.leaf_bytes()).root() == full.root()
    lean.close()


def test_extend_bytes_equals_append_and_keeps_watched_roots() -> None:
    leaves = [leaf_hash(str(i).encode()) for i in range(3000)]
    full = MemoryTree(leaves)
    one, batched = LeafTree(spill_after=64), LeafTree(spill_after=64)
    for size in (0, 1, 5, 128, 129, 1000, 2999, 3000):
        one.watch(size)
        batched.watch(size)
    for leaf in leaves:
        one.append(leaf)
    for start in range(0, len(leaves), 128):
        batched.extend_bytes(b"".join(leaves[start:start + 128]))
    for tree in (one, batched):
        assert tree.root() == full.root() and tree.spilled
        for size in (0, 1, 5, 128, 129, 1000, 2999, 3000):
            assert tree._watched.get(size, EMPTY_ROOT) == full.root(size)
            assert tree.root(size) == full.root(size)
    assert one.leaf_bytes() == batched.leaf_bytes() == full.leaf_bytes()


def test_find_is_aligned() -> None:
    # A hash whose bytes straddle two stored leaves must not be found at an unaligned offset.
    a, b = bytes(range(32)), bytes(range(32, 64))
    for spill_after in (None, 1):
        tree = LeafTree([a, b], spill_after=spill_after)
        assert tree.find(a) == 0 and tree.find(b) == 1 and tree.find(a[16:] + b[:16]) is None


@pytest.mark.parametrize("sorted_in_memory", [1 << 20, 100])
def test_first_repeat_finds_the_first_copy_and_confirms_prefixes(
        sorted_in_memory: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In memory and partitioned through temporary files (a small sort limit): the smallest
    index repeating an earlier leaf, with the first index of that leaf; an equal 8-byte prefix
    alone is no repeat."""
    monkeypatch.setattr(compact, "REPEATS_SORTED_IN_MEMORY", sorted_in_memory)
    monkeypatch.setattr(compact, "LEAVES_IN_MEMORY", 64)
    hashes = [leaf_hash(str(i).encode()) for i in range(3000)]
    assert first_repeat(LeafTree(hashes, spill_after=64)) is None
    assert first_repeat(LeafTree()) is None
    twin = hashes[7][:8] + bytes(24)  # same prefix, another hash
    assert first_repeat(LeafTree([*hashes, twin], spill_after=64)) is None
    copies = [*hashes[:2500], hashes[2400], *hashes[2500:], hashes[3], hashes[2400]]
    tree = LeafTree(copies, spill_after=64)
    assert first_repeat(tree) == (2500, 2400)
    assert first_repeat(tree, 2500) is None
    late = [*hashes, twin, hashes[7], hashes[2999]]  # the prefix twin comes first
    assert first_repeat(LeafTree(late, spill_after=64)) == (3001, 7)


def test_without_a_writable_temporary_folder_everything_stays_in_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No temporary file can be made (no writable folder, disk full): the tree keeps its
    leaves and `first_repeat` sorts in memory; the answers are the same. A tree that made its
    file before keeps writing to it."""
    monkeypatch.setattr(compact, "REPEATS_SORTED_IN_MEMORY", 64)
    hashes = [leaf_hash(str(i).encode()) for i in range(500)]
    full = MemoryTree(hashes)
    partly = LeafTree(hashes[:64], spill_after=32)
    assert partly.spilled

    def refuse(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compact.tempfile, "TemporaryFile", refuse)
    partly.extend([*hashes[64:], hashes[3]])
    assert partly.root(500) == full.root() and partly.leaf_bytes(500) == full.leaf_bytes()
    assert first_repeat(partly) == (500, 3)
    fresh = LeafTree([*hashes, hashes[321]], spill_after=32)
    assert not fresh.spilled
    assert fresh.root(500) == full.root() and first_repeat(fresh) == (500, 321)
    partly.close()
