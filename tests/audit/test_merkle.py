"""audit.merkle against RFC 9162's own recursive definitions, and its failure modes."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    Node,
    ProofError,
    append_nodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, written as the RFC says (on leaf hashes)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(m, D[n])."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    """RFC 9162 2.1.4.1 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def leaves_of(n: int, salt: str = "") -> list[bytes]:
    return [leaf_hash(f"{salt}{i}".encode()) for i in range(n)]


class DictSource(dict[tuple[int, int], bytes]):
    def node(self, level: int, index: int) -> bytes:
        return self[(level, index)]


def test_hash_prefixes_are_rfc_6962() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"l" * 32, b"r" * 32) == hashlib.sha256(b"\x01" + b"l" * 32 + b"r" * 32).digest()
    assert MemoryTree().root() == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_roots_and_proofs_match_the_rfc_recursion_for_small_trees() -> None:
    data = leaves_of(40)
    tree = MemoryTree(data)
    for n in range(1, 41):
        assert tree.root(n) == mth(data[:n])
        for m in range(n):
            assert tree.inclusion_proof(m, n) == path(m, data[:n])
        for m in range(1, n):
            assert tree.consistency_proof(m, n) == subproof(m, data[:n], True)
        assert tree.consistency_proof(n, n) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.data())
def test_random_proofs_verify_and_any_bit_flip_breaks_them(size: int, data: st.DataObject) -> None:
    tree = MemoryTree(leaves_of(size))
    index = data.draw(st.integers(0, size - 1))
    proof = tree.inclusion_proof(index, size)
    assert len(proof) <= size.bit_length()
    verify_inclusion(tree.leaf(index), index, size, proof, tree.root())
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = list(proof)
        bad[i] = bytes(b ^ (1 << (bit % 8)) if j == bit // 8 else b for j, b in enumerate(bad[i]))
        with pytest.raises(ProofError):
            verify_inclusion(tree.leaf(index), index, size, bad, tree.root())
    old = data.draw(st.integers(1, size))
    cproof = tree.consistency_proof(old, size)
    verify_consistency(old, size, cproof, tree.root(old), tree.root())
    if old < size:
        with pytest.raises(ProofError):
            verify_consistency(old, size, cproof, tree.root(old), leaf_hash(b"other"))
        with pytest.raises(ProofError):
            verify_consistency(old, size, cproof[:-1], tree.root(old), tree.root())


def test_verify_errors_name_the_problem() -> None:
    tree = MemoryTree(leaves_of(5))
    proof = tree.inclusion_proof(2)
    with pytest.raises(ProofError, match="index: 5 is not inside"):
        verify_inclusion(tree.leaf(2), 5, 5, proof, tree.root())
    with pytest.raises(ProofError, match="leaf hash: must be 32 bytes"):
        verify_inclusion(b"short", 2, 5, proof, tree.root())
    with pytest.raises(ProofError, match="too long"):
        verify_inclusion(tree.leaf(2), 2, 5, [*proof, proof[0]], tree.root())
    with pytest.raises(ProofError, match="too short"):
        verify_inclusion(tree.leaf(2), 2, 5, proof[:-1], tree.root())
    with pytest.raises(ProofError, match="different root"):
        verify_inclusion(tree.leaf(3), 2, 5, proof, tree.root())
    with pytest.raises(ProofError, match="old_size: must be > 0"):
        verify_consistency(0, 5, [], EMPTY_ROOT, tree.root())
    with pytest.raises(ProofError, match="larger than new_size"):
        verify_consistency(6, 5, [b"x" * 32], tree.root(), tree.root())
    with pytest.raises(ProofError, match="empty, but the sizes differ"):
        verify_consistency(3, 5, [], tree.root(3), tree.root())
    assert root_from_inclusion_proof(tree.leaf(2), 2, 5, proof) == tree.root()


def test_generation_refuses_impossible_parameters() -> None:
    tree = MemoryTree(leaves_of(4))
    with pytest.raises(ValueError, match="index"):
        inclusion_proof(tree, 4, 4)
    with pytest.raises(ValueError, match="old_size"):
        consistency_proof(tree, 0, 4)
    with pytest.raises(ValueError, match="old_size"):
        consistency_proof(tree, 5, 4)
    with pytest.raises(ValueError, match="size"):
        tree.root(5)
    with pytest.raises(IndexError):
        tree.node(2, 1)  # leaves 4..7 do not exist
    with pytest.raises(ValueError, match="leaf hash"):
        tree.append(b"too short")


def test_append_nodes_persisted_per_batch_reproduce_the_tree() -> None:
    rng = random.Random(7)
    data = leaves_of(700, "batch")
    store = DictSource()
    size = 0
    written = 0
    while size < len(data):
        batch = data[size:size + rng.choice([1, 1, 2, 3, 7, 16, 50])]
        nodes = append_nodes(store, size, batch)
        for node in nodes:
            assert (node.level, node.index) not in store  # never rewrites a node
            store[(node.level, node.index)] = node.hash
        written += len(nodes)
        size += len(batch)
        assert root(store, size) == mth(data[:size])
    # A tree of n leaves has sum(n >> l) complete subtrees: each written exactly once.
    assert written == sum(size >> level for level in range(size.bit_length()))
    reference = MemoryTree(data)
    for (level, index), value in store.items():
        assert reference.node(level, index) == value
    assert inclusion_proof(store, 123, 650) == reference.inclusion_proof(123, 650)
    assert consistency_proof(store, 77, 650) == reference.consistency_proof(77, 650)


def test_append_nodes_single_append_writes_at_most_log_n_plus_one() -> None:
    store = DictSource()
    for size in range(1024):
        nodes = append_nodes(store, size, [leaf_hash(str(size).encode())])
        assert nodes[0] == Node(0, size, leaf_hash(str(size).encode()))
        assert len(nodes) == 1 + ((size + 1) & -(size + 1)).bit_length() - 1
        for node in nodes:
            store[(node.level, node.index)] = node.hash


def test_proofs_read_only_logarithmically_many_nodes() -> None:
    class Counting(MemoryTree):
        reads = 0

        def node(self, level: int, index: int) -> bytes:
            Counting.reads += 1
            return super().node(level, index)

    tree = Counting(leaves_of(5000))
    for size in (4097, 4999, 5000):
        for index in (0, 1234, size - 1):
            Counting.reads = 0
            inclusion_proof(tree, index, size)
            assert Counting.reads <= 2 * size.bit_length()
        Counting.reads = 0
        consistency_proof(tree, 1000, size)
        assert Counting.reads <= 2 * size.bit_length()


def test_from_leaf_bytes_equals_incremental_build() -> None:
    data = leaves_of(1000, "bulk")
    incremental = MemoryTree(data)
    bulk = MemoryTree.from_leaf_bytes(b"".join(data))
    assert bulk.size == 1000
    for size in (1, 2, 3, 511, 512, 513, 1000):
        assert bulk.root(size) == incremental.root(size)
    assert bulk.leaf_bytes(10) == b"".join(data[:10])
    bulk.append(leaf_hash(b"more"))
    incremental.append(leaf_hash(b"more"))
    assert bulk.root() == incremental.root()
    with pytest.raises(ValueError, match="multiple of 32"):
        MemoryTree.from_leaf_bytes(b"x" * 33)
