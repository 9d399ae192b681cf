"""Roots and inclusion proofs agree with an independent implementation (pymerkle 7, test-only).

pymerkle with `algorithm="sha256"` and security on (the default) hashes leaves as
SHA-256(0x00 || data) and nodes as SHA-256(0x01 || l || r), i.e. RFC 6962. Its indexes start at
1 and its inclusion path starts with the leaf hash itself, followed by the RFC audit path.

Every size up to 1,000: the root, and the inclusion proof of every index for sizes up to 64 and
of nine indexes above (first, second, middle, last two, four random). Then one tree grown to
100,000 leaves, compared at 44 sizes (random ones, 2**16 and its neighbours, the last two).
"""

from __future__ import annotations

import random

import pytest
from pymerkle import InmemoryTree

from audit.merkle import MemoryTree, verify_inclusion


def _data(i: int) -> bytes:
    return f"entry-{i}".encode()


def _indices(size: int, rng: random.Random) -> set[int]:
    if size <= 64:
        return set(range(size))
    return {0, 1, size // 2, size - 2, size - 1, *rng.sample(range(size), 4)}


def test_every_size_up_to_1000_agrees_with_pymerkle() -> None:
    rng = random.Random(1000)
    ours = MemoryTree()
    theirs = InmemoryTree(algorithm="sha256")
    for i in range(1000):
        ours.append_data(_data(i))
        theirs.append_entry(_data(i))
        size = i + 1
        assert ours.root() == theirs.get_root(size), size
        for index in _indices(size, rng):
            path = theirs.prove_inclusion(index + 1, size).path
            assert path[0] == ours.leaf(index)
            assert ours.inclusion_proof(index, size) == list(path[1:]), (index, size)


@pytest.mark.slow
def test_random_sizes_up_to_100000_agree_with_pymerkle() -> None:
    rng = random.Random(100_000)
    ours = MemoryTree()
    theirs = InmemoryTree(algorithm="sha256")
    for i in range(100_000):
        ours.append_data(_data(i))
        theirs.append_entry(_data(i))
    sizes = sorted({100_000, 65_536, 65_537, 99_999, *rng.sample(range(1001, 100_000), 40)})
    for size in sizes:
        expected_root = theirs.get_root(size)
        assert ours.root(size) == expected_root, size
        for index in _indices(size, rng):
            path = theirs.prove_inclusion(index + 1, size).path
            proof = ours.inclusion_proof(index, size)
            assert proof == list(path[1:]), (index, size)
            verify_inclusion(ours.leaf(index), index, size, proof, expected_root)
