"""The whole stored log checked from scratch (fsck): signatures, leaf hashes, every tree node."""

from __future__ import annotations

from sqlalchemy import Engine, select

from audit import merkle
from audit.entry import MalformedEntryError
from audit.keyring import Keyring, KeyringError
from audit.signing import canonical
from audit.store.entries import READ_PAGE, entry_from_leaf, log_size
from audit.store.errors import StoreCorruptError
from audit.store.schema import NODES_TABLE, audit_entries, audit_tree_nodes


def verify_storage(engine: Engine, trusted_operator_key: bytes) -> bytes:
    """Check the whole stored log and return its root; raise StoreCorruptError naming the spot.

    Re-verifies every signature against the key state replayed from the log, recomputes every
    leaf hash, rebuilds the tree in memory (audit.merkle.MemoryTree) and compares every stored
    node with it. O(n): for start-up checks, tests and operators, not for the append path.
    """
    keyring = Keyring(trusted_operator_key)
    tree = merkle.MemoryTree()
    e = audit_entries.c
    with engine.connect() as connection:
        size = log_size(connection)
        position = 0
        while position < size:
            rows = connection.execute(
                select(e.idx, e.leaf, e.leaf_hash, e.kind, e.key_id, e.time)
                .where(e.idx >= position, e.idx < position + READ_PAGE).order_by(e.idx)).all()
            for row in rows:
                index = int(row.idx)
                if index != tree.size:
                    raise StoreCorruptError(f"entry {tree.size}: missing (next stored is {index})")
                leaf = bytes(row.leaf)
                try:
                    entry = entry_from_leaf(leaf)
                except MalformedEntryError as exc:
                    raise StoreCorruptError(f"entry {index}: {exc}") from exc
                if canonical(entry.to_json()) != leaf:
                    raise StoreCorruptError(f"entry {index}: leaf is not the canonical encoding")
                if bytes(row.leaf_hash) != merkle.leaf_hash(leaf):
                    raise StoreCorruptError(f"entry {index}: leaf_hash does not match the leaf")
                if (row.kind, row.key_id, row.time) != (entry.kind, entry.key_id, entry.time):
                    raise StoreCorruptError(f"entry {index}: kind/key_id/time columns do not "
                                            f"match the envelope")
                try:
                    keyring.check(entry, index)
                    keyring.apply(entry, index)
                except KeyringError as exc:
                    raise StoreCorruptError(str(exc)) from exc
                tree.append(bytes(row.leaf_hash))
            position += READ_PAGE
        n = audit_tree_nodes.c
        stored = 0
        for node_row in connection.execute(select(n.level, n.idx, n.hash)):
            level, index = int(node_row.level), int(node_row.idx)
            if (index + 1) << level > size:
                raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                        f"lies beyond the log size {size}")
            if bytes(node_row.hash) != tree.node(level, index):
                raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                        f"has the wrong hash")
            stored += 1
        expected = sum(size >> level for level in range(size.bit_length()))
        if stored != expected:
            raise StoreCorruptError(f"{NODES_TABLE}: {stored} nodes stored, a tree of {size} "
                                    f"leaves has {expected}")
    return tree.root()
