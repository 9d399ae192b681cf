"""The audit log in a database: append in the caller's transaction, read, prove, checkpoint.

Why a database and not a file: the coordinator already runs one (SQLite embedded, PostgreSQL in
production), so the log gets the database's durability (an acknowledged append survives kill -9)
and its locking (several processes may append to one log), and append-only is enforced by the
database itself (audit.store.schema), not by convention.

One write path: `AuditLog.append_in(connection, entries)` inside the caller's write transaction,
so a state change and the entry recording it commit together or not at all. The coordinator
makes every append so, through its group commit (exchange/coordinator/group_commit.py: every
write waiting shares one transaction and one fsync, each in its own savepoint), and tells the
log after each commit (`after_commit`), so that the next transaction starts from the committed
key state and tree edge instead of reading them again. The design: docs/audit-store.md.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, func, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from audit import merkle
from audit.checkpoint import Checkpoint, sign_checkpoint
from audit.entry import Entry
from audit.keyring import Keyring
from audit.signing import Signer
from audit.store import admission
from audit.store.entries import (
    PG_LOCK,
    checked_insert,
    entry_from_leaf,
    has_nothing_unasked,
    insert,
    insert_and_commit,
    iter_leaves,
    log_size,
    replay_keys,
    size_and_stored_indexes,
)
from audit.store.errors import AuditStoreError, CommitOutcomeUnknownError, EntryRefusedError
from audit.store.nodes import (
    DictSource,
    Recorder,
    advance_frontier,
    fetch_nodes,
    frontier_coordinates,
    with_nodes,
)
from audit.store.schema import ADVISORY_LOCK_KEY, audit_checkpoints, audit_entries, check_schema

T = TypeVar("T")

# connection.info key: (the transaction that called append_in, the log size before its first
# append). Rows from that size on are this transaction's own, not committed.
_APPEND_IN_MARK = "audit.store.append_in"
# connection.info key: (transaction, log size, key ring, right edge of the tree) after that
# transaction's latest append_in (see append_in).
_APPEND_IN_STATE = "audit.store.append_in_state"
# connection.info key: the transaction that holds the log's PostgreSQL write lock, taken at
# its top level (outside any savepoint: a rolled-back savepoint would release it).
_LOCKED_BY = "audit.store.locked_by"
# connection.info keys of an append that ends its transaction (PostgreSQL, `append_in(...,
# last=True)`). MAY_COMMIT: set by the transaction's owner (the group commit) to the
# transaction when the write about to run is the last thing it will make in it: that write's
# append may send the COMMIT with its insert (the next append_in takes the permission).
# COMMITTED: set by append_in to the transaction it so committed; the owner's own COMMIT then
# sends nothing.
# COMMIT_SKIPPED: set by append_in to the transaction whose COMMIT it sent and the server
# skipped, an insert before it having failed (a size made stale by another process's append,
# a replay): the write is not refused by that, the owner makes it again the careful way.
MAY_COMMIT = "audit.store.may_commit"
COMMITTED = "audit.store.committed"
COMMIT_SKIPPED = "audit.store.commit_skipped"


def _is_in_memory_sqlite(engine: Engine) -> bool:
    database = engine.url.database or ""
    return engine.dialect.name == "sqlite" and (
        database in ("", ":memory:") or database.startswith("file::memory:")
        or "mode=memory" in str(engine.url.query))


def _rows(prepared: Sequence[admission.Prepared], size: int) -> list[dict[str, Any]]:
    return [{"idx": index, "leaf": p.leaf, "leaf_hash": p.leaf_hash, "kind": p.entry.kind,
             "key_id": p.entry.key_id, "time": p.entry.time}
            for index, p in enumerate(prepared, start=size)]


class AuditLog:
    """The coordinator's audit log: append signed entries, read them, prove things about them.

    Thread-safe; several AuditLog objects (in one or several processes) may append to the same
    database. An append is durable when the caller's transaction commits.
    """

    def __init__(self, engine: Engine, log_signer: Signer, origin: str,
                 trusted_operator_key: bytes) -> None:
        Checkpoint(origin, 0, merkle.EMPTY_ROOT).body()  # validates the origin line
        self.engine = engine
        self.origin = origin
        self._log_signer = log_signer
        self._trusted_operator_key = trusted_operator_key
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise AuditStoreError(f"engine: dialect {engine.dialect.name!r} is not supported")
        if _is_in_memory_sqlite(engine):
            raise AuditStoreError("engine: an in-memory SQLite database cannot hold a durable "
                                  "audit log; use a file (sqlite:///path/to/exchange.db)")
        check_schema(engine)
        # The newest (size, keyring) known to be committed. Published keyrings are never changed
        # in place (changes happen on copies), so a reader may use one without a lock.
        self._state_lock = threading.Lock()
        self._published: tuple[int, Keyring] = (0, Keyring(trusted_operator_key))
        # (size, keyring, right edge of the tree) after an append_in transaction its caller
        # saw commit (`after_commit`): the next append_in transaction that finds the log that
        # long starts from it instead of reading the key entries and the edge nodes again.
        self._committed_edge: tuple[int, Keyring, dict[tuple[int, int], bytes]] | None = None
        # The largest log size seen committed: the log only grows, so a proof for a size up to
        # it needs no look-up of the size (`_read_nodes`).
        self._known_size = 0
        self._proof_engine: Engine | None = None
        # Only key entries change the key ring, and only those are read (through the index on
        # `kind`): opening costs O(key entries), not O(n).
        with engine.connect() as connection:
            size = log_size(connection)
            keyring, _copied = replay_keys(connection, self._published[1], 0, size)
        self._publish(size, keyring)

    # -- appending ----------------------------------------------------------------------------
    def prepare(self, entries: Sequence[Entry | Mapping[str, Any]]) -> list[admission.Prepared]:
        """Check `entries` for form, encode them and verify the signatures of known signers
        now, in the caller's thread, before they are queued for a writer; `append_in` then
        does only what depends on the log (signer active at the index, no replay, insert).

        Why: a group commit's writer is the serial part of every append; what it no longer
        does here, the callers do while it waits on the database. Raises EntryRefusedError
        (an entry refused for its form is refused the same in append_in)."""
        known_keys = self._published[1]  # a published keyring: never changed
        return [admission.prepare(position, entry, known_keys)
                for position, entry in enumerate(entries)]

    def append_in(self, connection: Connection,
                  entries: Sequence[Entry | Mapping[str, Any] | admission.Prepared], *,
                  last: bool = False, check: Callable[[int], None] | None = None,
                  tail: Callable[[int], str] | None = None) -> list[int]:
        """Append `entries` (all or none, in order) in the open transaction on `connection`;
        their indexes. An entry may come already `prepare`d.

        Why: a state change and the entry recording it must commit together (or neither).
        Nothing is durable or acknowledged until the CALLER commits; if it rolls back, the
        entries vanish with its other changes. Raises EntryRefusedError (DuplicateEntryError
        for a replay); the caller must then roll back (nothing of this call was written, but
        earlier statements of the transaction were), or roll back a savepoint around it.

        The write lock: PostgreSQL, the transaction-level advisory lock is taken here (held to
        the caller's COMMIT/ROLLBACK; the transaction must be READ COMMITTED), with
        synchronous_commit on for the transaction. SQLite, the caller's transaction must hold
        the database write lock from its start (BEGIN IMMEDIATE); otherwise a concurrent append
        makes this one fail (primary key or next-index trigger), never corrupt the log. Several
        calls in one transaction see each other's entries (a key registered by the first may
        sign in the second).

        `last`: the caller's write makes nothing after this call. If, besides, the
        transaction's owner allows it (`connection.info[MAY_COMMIT]` is this transaction: the
        group commit's last write before its COMMIT), no savepoint is open and the server has
        not said anything unasked on the connection (`has_nothing_unasked`: it is not closing
        it), PostgreSQL gets the insert and the COMMIT (and the lock, if not held, and the
        BEGIN, if the transaction has not begun on the server: a whole transaction) as ONE
        simple-protocol query string, one round trip, and the transaction is over on return
        (`connection.info[COMMITTED]`). The COMMIT is skipped by the server unless every row
        went in where it was meant to (`insert_and_commit`); then the transaction is left
        failed and this raises (the owner rolls back and makes its writes again the careful
        way, which decides the refusal). If the connection is lost with the COMMIT sent,
        raises CommitOutcomeUnknownError. Every check is the same; only round trips are saved.

        `check(first_index)`: the caller's own check of the entries at the indexes they get
        (the coordinator's ledger fold), run once, after the log's checks: right after the
        insert, or, when this call commits the transaction (above), BEFORE anything is sent,
        since nothing can be refused after the COMMIT. If it raises, the exception propagates
        and the caller must roll back as for a refusal; in the second case nothing of this
        call was sent and the refusal is not final (`COMMIT_SKIPPED`: the size was a guess, the
        owner makes the write again the careful way). It may read through `connection`.

        `tail(first_index)`: called only when this call commits the transaction in one string:
        the caller's own statement for the rest of its write (SQL whose values are literals
        that cannot hold a quote: exchange.db.literal), sent after the insert and before the
        COMMIT, so that the write makes nothing afterwards. If it fails, the server skips the
        COMMIT, as for a failed insert. Whether it was sent: `connection.info[COMMITTED]` is
        the transaction on return (else the caller makes the rest of its write itself).
        """
        if not connection.in_transaction() or \
                connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            # Entries and their tree nodes must commit together, with the caller's change.
            raise AuditStoreError("connection: append_in needs an open transaction (call it "
                                  "inside `with engine.begin() as connection:`)")
        known_keys = self._published[1]  # a published keyring: never changed
        prepared = [entry if isinstance(entry, admission.Prepared)
                    else admission.prepare(position, entry, known_keys)
                    for position, entry in enumerate(entries)]
        if not prepared:
            return []
        hashes = [p.leaf_hash for p in prepared]
        transaction = connection.get_transaction()
        postgres = connection.dialect.name == "postgresql"
        commit = (connection.info.pop(MAY_COMMIT, None) is transaction and last and postgres
                  and connection.get_nested_transaction() is None
                  and has_nothing_unasked(connection))
        # The key state and the tree's right edge after this transaction's previous append_in,
        # if the log is still exactly that long: every append of the transaction goes through
        # here (and refreshes this), and a rolled-back savepoint only shortens the log, so an
        # equal size means the same rows. Saves reading the key entries and the nodes again
        # for each of a group commit's submissions.
        state = connection.info.get(_APPEND_IN_STATE)
        if state is not None and state[0] is not transaction:
            state = None
        edge = self._committed_edge
        if postgres and (state is not None or edge is not None):
            # The size is very likely known (this transaction's last append, else this
            # process's last commit): take the lock (if this transaction does not hold it yet),
            # check the size, look for duplicates and insert in one round trip; anything
            # unexpected falls through to the general path below.
            guess = (state[1], state[2], state[3]) if state is not None else edge
            assert guess is not None
            indexes, appended = self._append_at(connection, prepared, *guess, commit=commit,
                                                check=check, tail=tail)
            if appended is not None:
                self._appended(connection, transaction, appended)
                if commit:
                    connection.info[COMMITTED] = transaction
                return indexes
        if postgres:
            self._lock(connection)
        size, seen = size_and_stored_indexes(connection, hashes)
        if state is not None and state[1] == size:
            keyring, frontier = state[2], state[3]
        elif edge is not None and edge[0] == size:
            # A committed prefix of exactly this length: the same rows (the log is append-only).
            keyring, frontier = edge[1], edge[2]
        else:
            keyring = self._keyring_in(connection, size)
            frontier = fetch_nodes(connection, frontier_coordinates(size))
        admission.check_unique(prepared, size, seen)
        keyring = admission.check_entries(keyring, prepared, size)
        nodes = merkle.append_nodes(DictSource(frontier), size, hashes)
        rows = _rows(prepared, size)
        insert(connection, rows, nodes)
        self._appended(connection, transaction, (size, len(prepared), keyring,
                       advance_frontier(frontier, nodes, size + len(prepared))))
        if check is not None:
            check(size)
        return [row["idx"] for row in rows]

    def _append_at(self, connection: Connection, prepared: list[admission.Prepared], size: int,
                   keyring: Keyring, frontier: dict[tuple[int, int], bytes], *,
                   commit: bool = False, check: Callable[[int], None] | None = None,
                   tail: Callable[[int], str] | None = None,
                   ) -> tuple[list[int], tuple[int, int, Keyring, dict[tuple[int, int], bytes]] | None]:
        """PostgreSQL: append `prepared` at `size`, assuming the log is that long, in one
        statement (entries.checked_insert). (indexes, what `_appended` needs) if it appended;
        ([], None) if the log had another size or held one of the entries (nothing written).
        A refusal by the key rules at that size is not final either (the size may be wrong):
        the general path decides.

        `commit`: insert and COMMIT (and the lock and BEGIN where still due) in one round
        trip (`entries.insert_and_commit`); a failure there raises (see append_in), as the
        transaction is then lost. `check` (see append_in): before that string, or after the
        checked insert if it appended; `tail`: in that string, before the COMMIT."""
        try:
            admission.check_unique(prepared, size, {})  # twice in this call
            keyring = admission.check_entries(keyring, prepared, size)
        except EntryRefusedError:
            return [], None
        hashes = [p.leaf_hash for p in prepared]
        nodes = merkle.append_nodes(DictSource(frontier), size, hashes)
        rows = _rows(prepared, size)
        seen: dict[bytes, int] = {}
        if commit:
            if check is not None:
                # The caller's check at the indexes the rows get if the size is right; if it is
                # not, the INSERT fails, the server skips the COMMIT, the transaction is rolled
                # back (and with it whatever the check noted in it) and made again. A refusal
                # here is not final either (at a wrong size the check saw another log): the
                # owner makes the write again the careful way, where it runs at the real size.
                try:
                    check(size)
                except Exception:
                    connection.info[COMMIT_SKIPPED] = connection.get_transaction()
                    raise
            lock_key = None if self._holds_lock(connection) else ADVISORY_LOCK_KEY
            try:
                insert_and_commit(connection, rows, nodes, lock_key=lock_key,
                                  tail=None if tail is None else tail(size))
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise CommitOutcomeUnknownError(
                        "append: the connection was lost after the COMMIT was sent; whether "
                        f"the entries were stored is unknown ({exc.orig})") from exc
                connection.info[COMMIT_SKIPPED] = connection.get_transaction()
                raise
            found_size = size
        elif self._holds_lock(connection):
            found_size, seen = checked_insert(connection, size, rows, nodes)
        else:
            found_size, seen = checked_insert(connection, size, rows, nodes,
                                              lock_key=ADVISORY_LOCK_KEY)
            self._locked(connection)
        if found_size != size or seen:
            return [], None
        if check is not None and not commit:
            check(size)
        new_size = size + len(prepared)
        return ([row["idx"] for row in rows],
                (size, len(prepared), keyring, advance_frontier(frontier, nodes, new_size)))

    @staticmethod
    def _holds_lock(connection: Connection) -> bool:
        """Whether this transaction took the PostgreSQL write lock where no savepoint can
        release it again (advisory locks are re-entrant: taking it twice is only a round trip)."""
        return connection.info.get(_LOCKED_BY) is connection.get_transaction()

    @staticmethod
    def _locked(connection: Connection) -> None:
        """The lock was just taken: remember it for the transaction if taken at its top level
        (a lock taken inside a savepoint is released if that savepoint is rolled back)."""
        if connection.get_nested_transaction() is None:
            connection.info[_LOCKED_BY] = connection.get_transaction()

    def _lock(self, connection: Connection) -> None:
        """PostgreSQL: the log's write lock, held to COMMIT/ROLLBACK, with a durable COMMIT."""
        if not self._holds_lock(connection):
            connection.execute(PG_LOCK, {"key": ADVISORY_LOCK_KEY})
            self._locked(connection)

    @staticmethod
    def _appended(connection: Connection, transaction: object,
                  appended: tuple[int, int, Keyring, dict[tuple[int, int], bytes]]) -> None:
        """Record in the connection what this transaction appended (see append_in): (size
        before, entries appended, key state and tree edge after)."""
        size, count, keyring, frontier = appended
        marker = connection.info.get(_APPEND_IN_MARK)
        if marker is None or marker[0] is not transaction:
            connection.info[_APPEND_IN_MARK] = (transaction, size)
        connection.info[_APPEND_IN_STATE] = (transaction, size + count, keyring, frontier)

    def after_commit(self, connection: Connection | dict[Any, Any], transaction: object) -> None:
        """Tell the store that `transaction` (on `connection`), in which append_in ran,
        COMMITTED: its final key state and tree edge then describe the committed log, and the
        next append_in transaction may start from them. Call it only after seeing the commit
        succeed (a rolled-back transaction's rows may be replaced by others of the same count).
        `connection` may be given as its `info` (taken before the COMMIT: an ORM Session
        releases its connection when it commits)."""
        info = connection if isinstance(connection, dict) else connection.info
        state = info.get(_APPEND_IN_STATE)
        if state is None or state[0] is not transaction:
            return  # no append_in in that transaction
        _transaction, size, keyring, frontier = state
        self._publish(size, keyring)
        with self._state_lock:
            if self._committed_edge is None or size >= self._committed_edge[0]:
                self._committed_edge = (size, keyring, frontier)

    def _keyring_in(self, connection: Connection, size: int) -> Keyring:
        """The key state after the first `size` entries as `connection` sees them.

        Starts from the published committed state and replays the key entries after it. What
        this transaction itself appended (earlier append_in calls) is not committed, so only
        the prefix before its first append is published for others.
        """
        published_size, keyring = self._published
        if published_size > size:  # cannot happen on one database; be safe: replay it all
            published_size, keyring = 0, Keyring(self._trusted_operator_key)
        keyring, copied = replay_keys(connection, keyring, published_size, size)
        marker = connection.info.get(_APPEND_IN_MARK)
        if marker is None or marker[0] is not connection.get_transaction():
            # Nothing appended by this transaction yet: every row it sees is committed.
            # (A published keyring is never changed later: copy it if it is the working one.)
            self._publish(size, copy.deepcopy(keyring) if copied else keyring)
        return keyring

    def _publish(self, size: int, keyring: Keyring) -> None:
        """Record a committed (size, keyring) if it is newer than the one known."""
        with self._state_lock:
            if size > self._published[0]:
                self._published = (size, keyring)
            self._known_size = max(self._known_size, size)

    # -- reading ------------------------------------------------------------------------------
    def size(self) -> int:
        """The number of committed entries (read from the database: other writers count)."""
        with self.engine.connect() as connection:
            size = log_size(connection)
        self._note_size(size)
        return size

    def _note_size(self, size: int) -> None:
        with self._state_lock:
            self._known_size = max(self._known_size, size)

    def _reader(self) -> Engine:
        """The engine proofs are read through: on PostgreSQL, a pool of its own in autocommit
        without a pre-ping, so a proof is ONE round trip (the node look-up), where a checkout of
        the shared engine adds a ping, a BEGIN and a ROLLBACK (docs/benchmarks/log-scale.md).
        A stale pooled connection is retried once instead of pinged (`_read_nodes`)."""
        if self.engine.dialect.name != "postgresql":
            return self.engine
        with self._state_lock:
            if self._proof_engine is None:
                self._proof_engine = create_engine(self.engine.url, pool_pre_ping=False,
                                                   isolation_level="AUTOCOMMIT")
            return self._proof_engine

    def close(self) -> None:
        """Close the proof reader's connections (the caller's engine is the caller's)."""
        with self._state_lock:
            engine, self._proof_engine = self._proof_engine, None
        if engine is not None:
            engine.dispose()

    def _read_nodes(self, size: int, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The stored nodes at `wanted`, after checking that the log holds `size` entries.

        The log only grows, so a size already seen committed needs no new look-up: the size is
        read only when `size` is beyond it (ValueError if the log is shorter)."""
        for attempt in (0, 1):
            try:
                with self._reader().connect() as connection:
                    if size > self._known_size:
                        current = log_size(connection)
                        self._note_size(current)
                        if size > current:
                            raise ValueError(f"size: {size} is not between 0 and the log size "
                                             f"{current}")
                    return fetch_nodes(connection, wanted)
            except DBAPIError as exc:
                if attempt or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def inclusion(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """(leaf hash, RFC 9162 inclusion proof) of entry `index` in the tree of `size`
        entries, read in one query: the leaf hash is the stored level-0 node, and the size is
        checked against the largest size already seen (see `_read_nodes`).

        Why not `leaf_hash` + `inclusion_proof`: those are two connections and three queries, and
        the API serves this on every auditor's request (the request path, not the database,
        was the cost at 1M entries)."""
        if not 0 <= index < size:
            raise ValueError(f"index: need 0 <= index < size, got index {index}, size {size}")
        recorder = Recorder()
        merkle.inclusion_proof(recorder, index, size)
        nodes = self._read_nodes(size, [(0, index), *recorder.wanted])
        source = DictSource(nodes)
        return source.node(0, index), merkle.inclusion_proof(source, index, size)

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from `old_size` to `new_size` entries, in one query (as
        `inclusion`)."""
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old_size: need 0 <= old_size <= new_size, got {old_size}, {new_size}")
        recorder = Recorder()
        merkle.consistency_proof(recorder, old_size, new_size)
        nodes = self._read_nodes(new_size, recorder.wanted)
        return merkle.consistency_proof(DictSource(nodes), old_size, new_size)

    def get(self, index: int) -> Entry:
        """The entry at `index`; IndexError if there is none."""
        with self.engine.connect() as connection:
            leaf = connection.execute(select(audit_entries.c.leaf)
                                      .where(audit_entries.c.idx == index)).scalar_one_or_none()
        if leaf is None:
            raise IndexError(f"index: no entry {index} in the log")
        return entry_from_leaf(bytes(leaf))

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        """Entries start <= index < stop (default: to the current size), in log order."""
        if start < 0:
            raise ValueError(f"start: must be >= 0, got {start}")
        with self.engine.connect() as connection:
            end = log_size(connection) if stop is None else stop
            for _index, leaf in iter_leaves(connection, start, end):
                yield entry_from_leaf(leaf)

    def leaf_hash(self, index: int) -> bytes:
        with self.engine.connect() as connection:
            value = connection.execute(select(audit_entries.c.leaf_hash)
                                       .where(audit_entries.c.idx == index)).scalar_one_or_none()
        if value is None:
            raise IndexError(f"index: no entry {index} in the log")
        return bytes(value)

    def _read(self, size: int | None, algorithm: Callable[[merkle.NodeSource, int], T]) -> T:
        with self.engine.connect() as connection:
            current = log_size(connection)
            if size is None:
                size = current
            if not 0 <= size <= current:
                raise ValueError(f"size: {size} is not between 0 and the log size {current}")
            tree_size = size
            return with_nodes(connection, lambda source: algorithm(source, tree_size))

    def root(self, size: int | None = None) -> bytes:
        """The RFC 6962 root of the first `size` entries (default: all)."""
        return self._read(size, merkle.root)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of entry `index` in the tree of `size` entries."""
        return self._read(size, lambda source, n: merkle.inclusion_proof(source, index, n))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from `old_size` to `new_size` entries."""
        return self._read(new_size, lambda source, n: merkle.consistency_proof(source, old_size, n))

    def checkpoint(self) -> str:
        """Sign a C2SP checkpoint of the current log and store it; return the signed note."""
        with self.engine.connect() as connection:
            size = log_size(connection)
            root = with_nodes(connection, lambda source: merkle.root(source, size))
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self._log_signer)
        c = audit_checkpoints.c
        try:
            with self.engine.begin() as connection:
                latest = connection.execute(select(func.max(c.size))).scalar_one()
                if latest is None or latest < size:
                    connection.execute(audit_checkpoints.insert().values(
                        size=size, root_hash=root, note=note, created_at=datetime.now(UTC)))
        except (SQLAlchemyError, DBAPIError):
            # Another process stored a checkpoint of this size (or a larger one) first; the
            # note is still a valid signed statement about this size.
            with self.engine.connect() as connection:
                latest = connection.execute(select(func.max(c.size))).scalar_one()
            if latest is None or latest < size:
                raise
        return note

    def latest_checkpoint(self) -> str | None:
        """The latest stored checkpoint note, or None."""
        c = audit_checkpoints.c
        with self.engine.connect() as connection:
            note = connection.execute(
                select(c.note).order_by(c.size.desc()).limit(1)).scalar_one_or_none()
        return None if note is None else str(note)
