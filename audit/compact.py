"""Constant-memory structures for verifying a long log in one pass.

Why: `audit verify` of any length must fit in a small, fixed amount of memory
(docs/benchmarks/audit-verify.md). The verifier needs the root of the tree at its final size
(and at the sizes of the checkpoints it compares against), which the right frontier gives in
O(log n) hashes; everything that needs the leaves themselves (naming a forked entry, saving the
state, a proof for an earlier size, finding a replayed entry) reads them back from a temporary
file:

- `LeafTree` keeps the right frontier of the tree (O(log n) hashes) and the leaf hashes in a
  temporary file once more than `LEAVES_IN_MEMORY` of them are held (the file is unnamed and goes
  when the tree is closed or collected). Appending and the current root are O(1) amortized and
  O(log n); the roots at `watch`ed sizes are taken while the leaves stream by; a root or proof
  for any other earlier size is computed from the leaves read back a chunk at a time.
- `first_repeat` finds the first leaf hash equal to an earlier one (a replayed entry) once all
  leaves are in: their 8-byte prefixes are sorted (numpy), in memory up to
  `REPEATS_SORTED_IN_MEMORY` of them, beyond that first partitioned by their leading bits into
  temporary files, each sorted alone; a prefix seen twice is confirmed against the full hashes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import BinaryIO

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
#: Leaf hashes a `LeafTree` holds in memory before it writes them to its temporary file; also
#: how many it reads back at a time (a power of two, so that chunks are aligned subtrees).
LEAVES_IN_MEMORY = 1 << 15
#: Leaf-hash prefixes `first_repeat` sorts at once; a longer log is partitioned first.
REPEATS_SORTED_IN_MEMORY = 1 << 18
_DEFAULT = -1
_RECORD = np.dtype([("key", "<u8"), ("index", "<i8")])


def _row_root(row: bytes) -> bytes:
    """The root of the perfect subtree whose leaf hashes are concatenated in `row` (a power of
    two of them), hashed level by level."""
    while len(row) > HASH_SIZE:
        row = b"".join([_sha256(NODE_PREFIX + row[i:i + 2 * HASH_SIZE]).digest()
                        for i in range(0, len(row), 2 * HASH_SIZE)])
    return row


class LeafTree:
    """An RFC 6962 tree of leaf hashes: the right frontier in memory, the leaves in a temporary
    file past `spill_after` of them (default `LEAVES_IN_MEMORY`; None: always in memory).

    The same queries as `audit.merkle.MemoryTree` (it is a `NodeSource`); nodes other than
    leaves and frontier roots are recomputed from the leaves when asked.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = (), *,
                 spill_after: int | None = _DEFAULT) -> None:
        if spill_after == _DEFAULT:
            spill_after = LEAVES_IN_MEMORY
        self._buffer = bytearray()  # the leaves after the `_stored` ones in the file
        self._limit = None if spill_after is None else max(1, spill_after) * HASH_SIZE
        self._file: BinaryIO | None = None
        self._stored = 0
        self._size = 0
        self._frontier: list[bytes] = []  # roots of the perfect subtrees, largest first
        self._watched: dict[int, bytes | None] = {}  # size -> root at that size, once reached
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def spilled(self) -> bool:
        """Whether leaves were written to the temporary file."""
        return self._file is not None

    def watch(self, size: int) -> None:
        """Keep the root at `size` when the tree reaches it (a later `root(size)` is then free).
        A size already passed is computed from the leaves when asked."""
        if size > self._size:
            self._watched.setdefault(size, None)
        elif size == self._size:
            self._watched[size] = self.root()

    def append(self, leaf: bytes) -> int:
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash: must be {HASH_SIZE} bytes, got {len(leaf)}")
        index = self._size
        self._buffer += leaf
        push_frontier(self._frontier, index, leaf)
        self._size = index + 1
        if self._watched:
            self._reached()
        if self._limit is not None and len(self._buffer) >= self._limit:
            self._spill()
        return index

    def extend_bytes(self, data: bytes) -> None:
        """Append the leaf hashes concatenated in `data` (a multiple of 32 bytes).

        The same tree as appending them one by one, with fewer Python calls: the frontier
        takes the largest aligned perfect subtrees of the new leaves, each hashed level by
        level from the bytes (a subtree of 2^k leaves starting at a multiple of 2^k is one
        node of level k, pushed onto the frontier as `push_frontier` pushes a leaf). A watched
        size inside `data` splits it there, so that its root is taken."""
        count, rest = divmod(len(data), HASH_SIZE)
        if rest:
            raise ValueError(f"leaf hashes: length {len(data)} is not a multiple of {HASH_SIZE}")
        if self._watched:
            end = self._size + count
            cut = min((size for size in self._watched if self._size < size < end), default=None)
            if cut is not None:
                split = (cut - self._size) * HASH_SIZE
                self.extend_bytes(data[:split])
                self.extend_bytes(data[split:])
                return
        start = self._size
        self._buffer += data
        frontier = self._frontier
        position = 0
        while position < count:
            index = start + position
            width = index & -index if index else 1 << 62  # the alignment of `index`
            while width > count - position:
                width >>= 1
            current = _row_root(data[position * HASH_SIZE:(position + width) * HASH_SIZE])
            n = index // width
            while n & 1:
                current = _sha256(NODE_PREFIX + frontier.pop() + current).digest()
                n >>= 1
            frontier.append(current)
            position += width
        self._size = start + count
        if self._watched:
            self._reached()
        if self._limit is not None and len(self._buffer) >= self._limit:
            self._spill()

    def _reached(self) -> None:
        if self._size in self._watched and self._watched[self._size] is None:
            self._watched[self._size] = fold_subtrees(self._frontier)

    def _spill(self) -> None:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="audit-leaves-", buffering=0)  # noqa: SIM115 (closed by `close`)
            self._file.seek(0, os.SEEK_END)
            self._file.write(self._buffer)
        except OSError:
            # No writable temporary folder (or it is full): keep the leaves in memory rather
            # than fail a verification; only the memory bound is lost. The file's first
            # `_stored` leaves stay valid (reads never go past them).
            self._limit = None
            return
        self._stored += len(self._buffer) // HASH_SIZE
        self._buffer = bytearray()

    def close(self) -> None:
        """Delete the temporary file (the tree cannot be queried for its leaves afterwards)."""
        if self._file is not None:
            self._file.close()

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    @classmethod
    def from_leaf_bytes(cls, data: bytes) -> LeafTree:
        if len(data) % HASH_SIZE:
            raise ValueError(f"leaf hashes: length {len(data)} is not a multiple of {HASH_SIZE}")
        tree = cls()
        for at in range(0, len(data), LEAVES_IN_MEMORY * HASH_SIZE):
            tree.extend_bytes(data[at:at + LEAVES_IN_MEMORY * HASH_SIZE])
        return tree

    def _read(self, start: int, stop: int) -> bytes:
        """The leaf hashes [start, stop), concatenated (the caller checked the range)."""
        parts = []
        if start < self._stored:
            assert self._file is not None
            end = min(stop, self._stored)
            want, offset = (end - start) * HASH_SIZE, start * HASH_SIZE
            while want:
                chunk = os.pread(self._file.fileno(), want, offset)
                if not chunk:
                    raise OSError("temporary leaf file: ended early")
                parts.append(chunk)
                want -= len(chunk)
                offset += len(chunk)
        if stop > self._stored:
            first = max(start, self._stored) - self._stored
            parts.append(bytes(self._buffer[first * HASH_SIZE:(stop - self._stored) * HASH_SIZE]))
        return b"".join(parts)

    def iter_leaf_bytes(self, start: int = 0, stop: int | None = None,
                        chunk: int | None = None) -> Iterator[bytes]:
        """The leaf hashes [start, stop) concatenated, `chunk` leaves at a time (default
        `LEAVES_IN_MEMORY`: bounded memory)."""
        stop = self._checked(stop)
        chunk = chunk or LEAVES_IN_MEMORY
        for at in range(start, stop, chunk):
            yield self._read(at, min(at + chunk, stop))

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise IndexError(f"leaf {index} is not in the tree")
        return self._read(index, index + 1)

    def leaf_bytes(self, size: int | None = None) -> bytes:
        """All leaf hashes of the first `size` (O(size) memory: `iter_leaf_bytes` streams)."""
        return self._read(0, self._checked(size))

    def find(self, leaf: bytes) -> int | None:
        """The first index whose leaf hash is `leaf`, or None (reads the leaves back)."""
        base = 0
        for data in self.iter_leaf_bytes():
            at = data.find(leaf)
            while at >= 0:
                if at % HASH_SIZE == 0:
                    return base + at // HASH_SIZE
                at = data.find(leaf, at + 1)
            base += len(data) // HASH_SIZE
        return None

    def node(self, level: int, index: int) -> bytes:
        """The root of leaves [index * 2^level, (index + 1) * 2^level), from the leaves (read
        back a chunk at a time: each chunk is an aligned perfect subtree)."""
        start, width = index << level, 1 << level
        if level < 0 or index < 0 or start + width > self._size:
            raise IndexError(f"node ({level}, {index}) is not in the tree")
        if width <= LEAVES_IN_MEMORY:
            return _row_root(self._read(start, start + width))
        frontier: list[bytes] = []
        for position, data in enumerate(self.iter_leaf_bytes(start, start + width)):
            push_frontier(frontier, position, _row_root(data))
        return frontier[0]

    def _checked(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"size: {size} is not between 0 and the tree size {self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        size = self._checked(size)
        if size != self._size:
            kept = self._watched.get(size)
            return kept if kept is not None else root(self, size)
        if not self._frontier:
            return EMPTY_ROOT
        return fold_subtrees(self._frontier)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(self, index, self._checked(size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return consistency_proof(self, old_size, self._checked(new_size))


def first_repeat(tree: LeafTree, size: int | None = None) -> tuple[int, int] | None:
    """The smallest index among the first `size` leaves whose hash equals an earlier leaf's,
    with the first index of that hash: (index, earlier); None if all are distinct.

    Bounded memory at any size (module doc): the leaves' 8-byte prefixes are sorted, at most
    `REPEATS_SORTED_IN_MEMORY` at a time, and each prefix seen twice is confirmed against the
    full hashes, so a prefix collision is never reported.
    """
    size = tree._checked(size)
    if size > REPEATS_SORTED_IN_MEMORY:
        try:
            return _partitioned_repeat(tree, size)
        except OSError:  # no room for the partitions: sort in memory (the bound is lost)
            pass
    return _repeat_in(tree, _records(tree, 0, size))


def _partitioned_repeat(tree: LeafTree, size: int) -> tuple[int, int] | None:
    """`first_repeat` of a long log: the records partitioned by their prefixes' leading bits
    into temporary files, each sorted alone (a repeat's two records share a partition)."""
    bits = min(12, max(1, (size // REPEATS_SORTED_IN_MEMORY).bit_length() + 1))
    shift = np.uint64(64 - bits)
    with ExitStack() as files:
        parts = [files.enter_context(tempfile.TemporaryFile(prefix="audit-repeats-"))
                 for _ in range(1 << bits)]
        for start in range(0, size, LEAVES_IN_MEMORY):
            records = _records(tree, start, min(start + LEAVES_IN_MEMORY, size))
            bucket = (records["key"] >> shift).astype(np.int64)
            order = np.argsort(bucket, kind="stable")  # indexes stay ascending in each bucket
            ends = np.cumsum(np.bincount(bucket, minlength=len(parts)))
            ordered = records[order]
            begin = 0
            for part, end in zip(parts, ends.tolist(), strict=True):
                if end > begin:
                    part.write(ordered[begin:end].tobytes())
                begin = end
        best: tuple[int, int] | None = None
        for part in parts:
            part.seek(0)
            found = _repeat_in(tree, np.frombuffer(part.read(), dtype=_RECORD))
            if found is not None and (best is None or found < best):
                best = found
        return best


def _records(tree: LeafTree, start: int, stop: int) -> np.ndarray:
    """(prefix, index) of the leaves [start, stop)."""
    keys = [np.frombuffer(data, dtype=">u8")[::4] for data in tree.iter_leaf_bytes(start, stop)]
    records = np.empty(stop - start, dtype=_RECORD)
    records["key"] = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
    records["index"] = np.arange(start, stop, dtype=np.int64)
    return records


def _repeat_in(tree: LeafTree, records: np.ndarray) -> tuple[int, int] | None:
    """`first_repeat` over `records` (indexes ascending): sort by prefix, confirm equal ones."""
    if len(records) < 2:
        return None
    order = np.argsort(records["key"], kind="stable")
    keys = records["key"][order]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if not len(same):
        return None
    indexes = records["index"][order]
    best: tuple[int, int] | None = None
    groups: dict[int, list[int]] = {}
    for position in same.tolist():  # runs of one prefix, indexes ascending within each
        members = groups.setdefault(int(keys[position]), [int(indexes[position])])
        members.append(int(indexes[position + 1]))
    for members in groups.values():
        first: dict[bytes, int] = {}
        for index in members:
            leaf = tree.leaf(index)
            if leaf in first:
                if best is None or index < best[0]:
                    best = (index, first[leaf])
                break
            first[leaf] = index
    return best
