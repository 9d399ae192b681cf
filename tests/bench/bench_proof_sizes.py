"""Inclusion and consistency proof sizes (and costs) in a 1,000,000-entry log.

    .venv/bin/python -m tests.bench.bench_proof_sizes            # 1,000,000 leaves
    .venv/bin/python -m tests.bench.bench_proof_sizes --quick    # 100,000 leaves

A MemoryTree of N leaf hashes (built bottom-up, not timed). Then, for the largest and smallest
indexes and sizes, every power of two +-1 and `--samples` random ones: the inclusion proof of
leaf i in the tree of N, and the consistency proof from size m to N, each verified with the
RFC 9162 verifiers. Printed: the largest proof found against the bound it must meet
(inclusion <= 20 hashes, consistency <= 21 at 1,000,000 entries, i.e. ceil(log2 N) and
ceil(log2 N) + 1), and the time to build + verify a proof against one SHA-256 of a 32-byte
leaf hash pair (the baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time

from audit.merkle import MemoryTree, leaf_hash, verify_consistency, verify_inclusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 leaves")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    size = 100_000 if args.quick else 1_000_000
    rng = random.Random(6962)

    start = time.perf_counter()
    tree = MemoryTree.from_leaf_bytes(b"".join(leaf_hash(i.to_bytes(8, "big")) for i in range(size)))
    built = time.perf_counter() - start
    root = tree.root()

    special = {1, 2, 3, size - 2, size - 1}
    for power in range(size.bit_length()):
        special |= {(1 << power) - 1, 1 << power, (1 << power) + 1}
    special = {s for s in special if 1 <= s < size}
    indexes = sorted({0, size - 1, *special, *rng.sample(range(size), args.samples)})
    old_sizes = sorted({*special, *rng.sample(range(1, size), args.samples)})

    start = time.perf_counter()
    inclusion_max = 0
    for index in indexes:
        proof = tree.inclusion_proof(index)
        verify_inclusion(tree.leaf(index), index, size, proof, root)
        inclusion_max = max(inclusion_max, len(proof))
    inclusion_time = (time.perf_counter() - start) / len(indexes)

    start = time.perf_counter()
    consistency_max = 0
    for old in old_sizes:
        proof = tree.consistency_proof(old)
        verify_consistency(old, size, proof, tree.root(old), root)
        consistency_max = max(consistency_max, len(proof))
    consistency_time = (time.perf_counter() - start) / len(old_sizes)

    pair = b"\x01" + bytes(64)
    start = time.perf_counter()
    for _ in range(100_000):
        hashlib.sha256(pair).digest()
    hash_time = (time.perf_counter() - start) / 100_000

    bound = (size - 1).bit_length()  # ceil(log2 size)
    print(f"tree: {size:,} leaves (built bottom-up in {built:.1f} s, not timed)")
    print(f"inclusion:   {len(indexes):,} proofs, largest {inclusion_max} hashes "
          f"(bound {bound}; ratio {inclusion_max / bound:.2f}); build + verify "
          f"{inclusion_time * 1e6:.1f} us = {inclusion_time / hash_time:.0f}x one node hash")
    print(f"consistency: {len(old_sizes):,} proofs, largest {consistency_max} hashes "
          f"(bound {bound + 1}; ratio {consistency_max / (bound + 1):.2f}); build + verify "
          f"{consistency_time * 1e6:.1f} us = {consistency_time / hash_time:.0f}x one node hash")
    print(f"baseline: one SHA-256 node hash {hash_time * 1e6:.2f} us")
    assert inclusion_max <= bound and consistency_max <= bound + 1
    if size == 1_000_000:
        assert inclusion_max <= 20 and consistency_max <= 21


if __name__ == "__main__":
    main()
