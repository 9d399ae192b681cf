"""Audit entries written in the SAME database transaction as the state change they record.

Why not `audit.store.AuditLog.append`: that method commits the entry in its own transaction
(a writer thread with group commit). A study submitted in one transaction and its
`study.escrow` entry committed in another could be split by a crash, leaving state the log
does not show (or the reverse). The coordinator must never acknowledge a state change whose
entry is not committed, so it appends inside its own transaction, here, with the audit
package's own building blocks:

- the same tables (`audit.store.audit_entries`, `audit_tree_nodes`) and Merkle node layout
  (`audit.merkle.append_nodes`), so `AuditLog` reads, proofs and checkpoints see these rows;
- the same write lock (SQLite: the coordinator's write transactions begin with BEGIN IMMEDIATE;
  PostgreSQL: `pg_advisory_xact_lock(audit.store.ADVISORY_LOCK_KEY)`), so appends by an
  `AuditLog` writer and by this module are serialized and indexes never collide;
- the same signer rules (`audit.keyring.Keyring`), replayed from the log under the lock.

This is an adapter: the audit package is asked (see the coordinator report) to provide
`AuditLog.append_in(connection, entries)` with exactly this behaviour; then this module
delegates to it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, and_, event, func, select, text

from audit import merkle
from audit.entry import Entry, MalformedEntryError
from audit.keyring import KEY_KINDS, Keyring, KeyringError
from audit.signing import canonical
from audit.store import (
    ADVISORY_LOCK_KEY,
    MAX_ENTRY_BYTES,
    audit_entries,
    audit_tree_nodes,
    entry_from_leaf,
)
from audit.verify import envelope_from_json


class EntryRejectedError(ValueError):
    """The log refused an entry (bad form, unknown or inactive signer, bad signature)."""


class DuplicateEntryError(EntryRejectedError):
    """The entry is byte for byte one already in the log (a replay)."""


_PENDING = "exchange.audit.pending_appends"


def track_transactions(engine: Engine) -> None:
    """Clear the "this transaction appended" mark when a transaction ends (connection.info
    outlives transactions: it belongs to the pooled DBAPI connection)."""

    def _clear(connection: Connection) -> None:
        connection.info.pop(_PENDING, None)

    event.listen(engine, "commit", _clear)
    event.listen(engine, "rollback", _clear)


class _ConnectionSource:
    """Merkle nodes read from the current transaction (sees this transaction's own inserts)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def node(self, level: int, index: int) -> bytes:
        n = audit_tree_nodes.c
        value = self._connection.execute(
            select(n.hash).where(and_(n.level == level, n.idx == index))).scalar_one_or_none()
        if value is None:
            raise RuntimeError(f"audit_tree_nodes: node ({level}, {index}) missing")
        return bytes(value)


def log_size(connection: Connection) -> int:
    top = connection.execute(select(func.max(audit_entries.c.idx))).scalar_one()
    return 0 if top is None else int(top) + 1


class TransactionalAppender:
    """Appends entries to the audit log inside a caller's transaction (see module docstring)."""

    def __init__(self, trusted_operator_key: bytes) -> None:
        self._trusted_operator_key = trusted_operator_key
        self._lock = threading.Lock()
        # A committed prefix of the log: the keyring after `_size` entries. Only ever moved
        # forward from rows read under the database lock, so a rolled-back append of ours
        # never leaks into it.
        self._keyring = Keyring(trusted_operator_key)
        self._size = 0

    def lock(self, connection: Connection) -> None:
        """Take the log's write lock for the rest of the transaction (PostgreSQL; SQLite's
        BEGIN IMMEDIATE already holds the database write lock)."""
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})

    def _keyring_at(self, connection: Connection, size: int) -> Keyring:
        with self._lock:
            keyring, start = self._keyring, self._size
        if size < start:  # another database, or the cache is ahead of what we can see
            keyring, start = Keyring(self._trusted_operator_key), 0
        if size == start:
            return copy.deepcopy(keyring)
        keyring = copy.deepcopy(keyring)
        e = audit_entries.c
        rows = connection.execute(select(e.idx, e.leaf).where(
            e.idx >= start, e.idx < size, e.kind.in_(sorted(KEY_KINDS))).order_by(e.idx))
        for row in rows:
            keyring.apply(entry_from_leaf(bytes(row.leaf)), int(row.idx))
        # Rows below `size` are committed unless this very transaction inserted some of them
        # (several appends in one transaction, e.g. a group commit): cache only the former.
        if not connection.info.get(_PENDING):
            with self._lock:
                if size > self._size:
                    self._keyring, self._size = copy.deepcopy(keyring), size
        return keyring

    def append(self, connection: Connection, entries: Sequence[Entry], *,
               signed_here: frozenset[str] = frozenset()) -> list[int]:
        """Check and insert `entries` (in order) in the caller's open transaction; return their
        indexes. Raises EntryRejectedError naming the entry and the reason; the caller must
        then roll back. Entries by a key id in `signed_here` were signed in this process a
        moment ago: their signature is not verified again (the signer's registration and
        activity still are)."""
        if not entries:
            return []
        self.lock(connection)
        start = log_size(connection)
        keyring = self._keyring_at(connection, start)
        rows = []
        hashes = []
        for offset, entry in enumerate(entries):
            index = start + offset
            try:
                # The store's own form rules (audit.store.AuditLog._prepare): the verifier's
                # envelope parser, the column sizes, the size limit of one entry.
                parsed = envelope_from_json(entry.to_json())
                leaf = canonical(parsed.to_json())
                for name, column in (("kind", audit_entries.c.kind), ("key_id", audit_entries.c.key_id)):
                    limit = getattr(column.type, "length", None) or 0
                    if len(getattr(parsed, name)) > limit:
                        raise MalformedEntryError(f"{name}: longer than {limit} characters")
                if len(leaf) > MAX_ENTRY_BYTES:
                    raise MalformedEntryError(f"entry: {len(leaf)} bytes encoded, more than the "
                                              f"{MAX_ENTRY_BYTES} a log entry may have")
                keyring.check(parsed, index, verify_signature=parsed.key_id not in signed_here)
                keyring.apply(parsed, index)
            except (MalformedEntryError, KeyringError, TypeError, ValueError, RecursionError) as exc:
                raise EntryRejectedError(f"{entry.kind} entry refused by the log: {exc}") from exc
            leaf_hash = merkle.leaf_hash(leaf)
            if leaf_hash in hashes or connection.execute(select(audit_entries.c.idx).where(
                    audit_entries.c.leaf_hash == leaf_hash)).first() is not None:
                raise DuplicateEntryError(f"{entry.kind} entry refused by the log: identical to an entry "
                                         "already in the log (a signed entry may appear once)")
            rows.append({"idx": index, "leaf": leaf, "leaf_hash": leaf_hash, "kind": parsed.kind,
                         "key_id": parsed.key_id, "time": parsed.time})
            hashes.append(leaf_hash)
        nodes = merkle.append_nodes(_ConnectionSource(connection), start, hashes)
        connection.info[_PENDING] = True
        connection.execute(audit_entries.insert(), rows)
        connection.execute(audit_tree_nodes.insert(),
                           [{"level": n.level, "idx": n.index, "hash": n.hash} for n in nodes])
        return [start + i for i in range(len(entries))]

    def key_public(self, connection: Connection, kid: str) -> bytes | None:
        """The public key of an active key `kid` in the committed log, or None."""
        keyring = self._keyring_at(connection, log_size(connection))
        record = keyring.get(kid)
        return record.public_key if record is not None and record.active else None
