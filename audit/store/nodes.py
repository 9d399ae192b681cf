"""Tree nodes over the database: every complete subtree's hash, read O(log n) at a time.

Why store every complete subtree: RFC 6962's roots and proofs are functions of O(log n)
complete-subtree hashes, so `root`, `inclusion_proof` and `consistency_proof` for any size read
them in ONE query (a dry run of the algorithm over a recording source lists the nodes it will
ask for; the choice never depends on hash values), and an append writes only the leaf and the
parents it completes (`audit.merkle.append_nodes`: amortized 2 rows, at most log2(n) + 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, bindparam, or_, select

from audit import merkle
from audit.store.errors import StoreCorruptError
from audit.store.schema import NODES_TABLE, audit_tree_nodes

T = TypeVar("T")

# Statements are built once per length and cached, not per call: building and cache-keying a
# SQLAlchemy construct costs more than executing it on these small look-ups (several per
# append_in; docs/benchmarks/api.md). Lists are fixed-length sets of bind parameters (up to
# LOOKUP_CHUNK), not `expanding` ones: those rewrite the SQL string on every execution.
LOOKUP_CHUNK = 64
_ZERO_HASH = bytes(merkle.HASH_SIZE)
_n = audit_tree_nodes.c


class Recorder:
    """A NodeSource that records which nodes an algorithm asks for (its values are dummies).

    RFC 6962's root and proof algorithms choose which nodes to read from the sizes alone, never
    from the hash values, so one dry run lists every node they need; one query then fetches them.
    """

    def __init__(self) -> None:
        self.wanted: list[tuple[int, int]] = []

    def node(self, level: int, index: int) -> bytes:
        self.wanted.append((level, index))
        return _ZERO_HASH


class DictSource:
    """A NodeSource over nodes already read; a missing one is a corrupt store."""

    def __init__(self, nodes: Mapping[tuple[int, int], bytes]) -> None:
        self._nodes = nodes

    def node(self, level: int, index: int) -> bytes:
        try:
            return self._nodes[(level, index)]
        except KeyError:
            raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                    f"is missing") from None


@functools.lru_cache(maxsize=128)
def _nodes_at(count: int) -> Any:
    """SELECT the nodes at `count` (level, idx) pairs: `(level = :l0 AND idx = :i0) OR ...`, an
    index look-up per pair on both databases. (A row-value `(level, idx) IN (VALUES ...)` made
    SQLite scan the whole table; docs/audit-store.md.)"""
    return select(_n.level, _n.idx, _n.hash).where(or_(*(
        and_(_n.level == bindparam(f"l{i}"), _n.idx == bindparam(f"i{i}")) for i in range(count))))


def fetch_nodes(connection: Connection, wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The stored hashes at the `wanted` (level, idx) coordinates that exist."""
    coordinates = sorted(set(wanted))
    if not coordinates:
        return {}
    found: dict[tuple[int, int], bytes] = {}
    for start in range(0, len(coordinates), LOOKUP_CHUNK):  # a proof wants ~2 log2(n)
        chunk = coordinates[start:start + LOOKUP_CHUNK]
        parameters: dict[str, int] = {}
        for i, (level, index) in enumerate(chunk):
            parameters[f"l{i}"], parameters[f"i{i}"] = level, index
        for row in connection.execute(_nodes_at(len(chunk)), parameters):
            found[(row.level, row.idx)] = bytes(row.hash)
    return found


def with_nodes(connection: Connection, algorithm: Callable[[merkle.NodeSource], T]) -> T:
    """Run a root/proof algorithm over the stored nodes, reading them in one query."""
    recorder = Recorder()
    algorithm(recorder)
    return algorithm(DictSource(fetch_nodes(connection, recorder.wanted)))


def frontier_coordinates(size: int) -> list[tuple[int, int]]:
    """The complete subtrees that make up a tree of `size` leaves, largest first: the tree's
    right edge, all an append needs to compute the nodes it completes."""
    out: list[tuple[int, int]] = []
    position = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            out.append((level, position >> level))
            position += 1 << level
    return out


def advance_frontier(frontier: Mapping[tuple[int, int], bytes], created: Iterable[merkle.Node],
                     size: int) -> dict[tuple[int, int], bytes]:
    """The right edge of the tree of `size` leaves, from the edge before an append and the
    nodes the append created; coordinates known to neither are left out (read when needed)."""
    known = {(n.level, n.index): n.hash for n in created}
    edge: dict[tuple[int, int], bytes] = {}
    for coordinate in frontier_coordinates(size):
        node = known.get(coordinate, frontier.get(coordinate))
        if node is not None:
            edge[coordinate] = node
    return edge
