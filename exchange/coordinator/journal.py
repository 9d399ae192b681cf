"""The journal: the one way the coordinator changes state, always together with the audit
entries that record the change.

`Journal.write()` opens ONE write transaction; the caller changes rows in it, signs the entries
that record the change (`sign`) and appends them in the same transaction (`append`, through
`audit.store.AuditLog.append_in` on the same connection); then it commits. If the log refuses an
entry, the ledger fold refuses it, or anything else fails, the transaction rolls back and
nothing is acknowledged: the database never holds a change the log does not, nor the reverse.
Study submissions, the hot path, go through the group commit (`batcher`, `loop_batcher`): many
submissions share one transaction and one COMMIT, each still with its own entries.

Signers: `key.register`/`key.revoke` and `token.mint` need an operator key (the keyring and the
ledger say so); everything else the coordinator states is signed with its own `coordinator`
key, registered by the operator key on first start (`bootstrap`). Hospitals' decisions and
receipts are their own signed entries, appended unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit.entry import Entry, sign_entry
from audit.ledger import Ledger
from audit.signing import Signer
from audit.store import AuditLog, DuplicateEntryError, EntryRefusedError
from audit.store.admission import Prepared
from audit.store.log import COMMITTED
from exchange.coordinator import ledger_snapshot, problems
from exchange.coordinator.auditing import LEDGER_KINDS, LedgerFoldError, LedgerView, active_key
from exchange.coordinator.group_commit import PG_GATHER_S, GroupCommit, LoopGroupCommit
from exchange.db.literal import insert_rows_sql

log = logging.getLogger(__name__)

# Session.info key: (connection.info, transaction) of the session's appends (see `write`).
_SESSION_APPENDED = "journal.appended"

#: entries a new ledger snapshot must cover beyond the stored one (at start-up and shutdown)
SNAPSHOT_MIN_ENTRIES = 1_000


def now() -> datetime:
    return datetime.now(UTC)


class Journal:
    """Write and read transactions, and the audit entries appended in them."""

    def __init__(self, read_engine: Engine, write_engine: Engine, audit_log: AuditLog, *,
                 operator: Signer, coordinator: Signer) -> None:
        self.read_engine = read_engine
        self.write_engine = write_engine
        self.audit_log = audit_log
        self.operator = operator
        self.coordinator = coordinator
        # Balances, escrows and payout terms: the auditor's fold of the log (audit.ledger).
        self.ledger = LedgerView(operator.key_id)
        # The log size of the stored ledger snapshot, and how many entries more a new one must
        # cover (a snapshot pickles the whole fold: not on every append).
        self.ledger_snapshot_base = 0
        self.snapshot_min_entries = SNAPSHOT_MIN_ENTRIES
        # PostgreSQL: a transaction of one write may end in the append's round trip (`last`),
        # so late arrivals cannot join it: the writer gathers its group first (GroupCommit).
        self.batcher = GroupCommit(
            self.write_engine, after_commit=self.after_commit,
            gather_s=PG_GATHER_S if self.write_engine.dialect.name == "postgresql" else 0.0)
        # SQLite submissions from the event loop: statements on the loop (see LoopGroupCommit).
        self.loop_batcher = (LoopGroupCommit(self.write_engine, after_commit=self.after_commit)
                             if self.write_engine.dialect.name == "sqlite" else None)
        # SQLite reads are in-process work with no network wait: an async route may run them
        # on the event loop instead of handing them to a worker thread.
        self.reads_on_loop = self.read_engine.dialect.name == "sqlite"
        # Told the kind of each committed change (study events, reward claims): the app counts
        # them as metrics.
        self.on_change: Callable[[str], None] = lambda _kind: None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction (BEGIN IMMEDIATE on SQLite via the write engine). Once it
        committed, the log is told its new edge (`AuditLog.after_commit`, as the group
        commit's hook does), so that the group commit's next append does not assume a stale
        size (on PostgreSQL: its one string goes through instead of failing once and being
        made the careful way). Its ledger copy is not carried over (a copy that paid a study
        out holds state the snapshot cannot pickle): the next fold reads the new rows."""
        with Session(self.write_engine, expire_on_commit=False) as session:
            # (The connection goes back to the pool at the COMMIT; if another transaction
            # begins on it first, what it carried over is dropped: the next one reads instead.)
            with session.begin():
                yield session
            appended = session.info.pop(_SESSION_APPENDED, None)
            if appended is not None:
                self.audit_log.after_commit(*appended)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.read_engine, expire_on_commit=False) as session:
            yield session

    def append(self, transaction: Session | Connection, *entries: Entry,
               prepared: Sequence[Prepared] | None = None, last: bool = False,
               then: Callable[[int], tuple[Insert, list[dict[str, Any]]]] | None = None,
               ) -> list[int]:
        """Append in the session's (or connection's) transaction and fold the new ledger
        entries, so that one the auditor's Ledger would reject is refused and rolled back here.
        `prepared`: the same entries, already `AuditLog.prepare`d before they were queued.

        `then(first_index)`: (an INSERT of a table, its rows) that the write makes right after
        the append, with the index the entries got (a study row records its `study.submit`
        entry's).

        `last`: the caller's write makes nothing after this append and `then` (a group-commit
        write: `AuditLog.append_in`'s `last`). On PostgreSQL the append may then end the
        transaction in its own round trip, BEGIN to COMMIT one string, the rows of `then`
        written in it as literals (exchange.db.literal). The fold is the append's `check`,
        so it still runs before anything can commit."""
        connection = transaction.connection() if isinstance(transaction, Session) else transaction
        if prepared is not None and [p.leaf for p in prepared] != [e.leaf_bytes() for e in entries]:
            raise ValueError("journal: the prepared entries are not the entries appended")
        if isinstance(transaction, Session):  # for `write` to tell the log once it committed
            transaction.info[_SESSION_APPENDED] = (connection.info, connection.get_transaction())

        def fold(first_index: int) -> None:
            self.ledger.note_append(connection, first_index)
            if any(entry.kind in LEDGER_KINDS for entry in entries) or \
                    self.ledger.has_copy(connection):  # keep the copy level with the log
                self.ledger.in_transaction(connection, (first_index, entries))

        def tail(first_index: int) -> str:
            assert then is not None
            statement, rows = then(first_index)
            return insert_rows_sql(statement.table, rows, connection.dialect)

        if not entries:
            if self.ledger.has_copy(connection):
                self.ledger.in_transaction(connection)
            return []
        try:
            indexes = self.audit_log.append_in(
                connection, list(prepared if prepared is not None else entries), last=last,
                check=fold, tail=None if then is None else tail)
        except DuplicateEntryError as exc:
            raise problems.ProblemError(409, str(exc), kind="duplicate-entry") from exc
        except EntryRefusedError as exc:
            raise problems.ProblemError(422, str(exc), kind="entry-refused") from exc
        except LedgerFoldError as exc:
            raise problems.ProblemError(422, f"the ledger refuses the entry: {exc}",
                                        kind="ledger-refused") from exc
        if then is not None and \
                connection.info.get(COMMITTED) is not connection.get_transaction():
            statement, rows = then(indexes[0])  # (else the rows went in with the COMMIT)
            connection.execute(statement, rows[0] if len(rows) == 1 else rows)
        return indexes

    def after_commit(self, connection: Connection, transaction: object) -> None:
        """The writer's transaction committed: its ledger fold and the log's key state and tree
        edge describe the committed log now (the next transaction starts from them)."""
        self.ledger.after_commit(connection)
        self.audit_log.after_commit(connection, transaction)

    def ledger_in(self, transaction: Session | Connection) -> Ledger:
        """The ledger fold as this write transaction sees the log (its own appends included)."""
        connection = transaction.connection() if isinstance(transaction, Session) else transaction
        return self.ledger.in_transaction(connection)

    def sign(self, kind: str, payload: dict[str, Any], *, operator: bool = False) -> Entry:
        """An entry signed now by the coordinator key (or the operator key)."""
        return sign_entry(self.operator if operator else self.coordinator, kind, payload, now())

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread (the app's shutdown); snapshot
        the ledger fold if it moved far enough since the last snapshot."""
        self.batcher.close()
        if self.loop_batcher is not None:
            self.loop_batcher.close()
        self.save_ledger_snapshot()

    def save_ledger_snapshot(self, *, at_least: int | None = None) -> bool:
        """Store the committed ledger fold as the snapshot if it covers at least `at_least`
        (default `snapshot_min_entries`) entries more than the last one; whether it did. A
        failure is logged, not raised: the snapshot is a cache, start-up can do without."""
        fold, size = self.ledger.committed_fold()
        if size - self.ledger_snapshot_base < (self.snapshot_min_entries if at_least is None
                                               else at_least) or size == 0:
            return False
        try:
            ledger_snapshot.save(self.write_engine, self.audit_log, self.coordinator, fold, size)
        except SQLAlchemyError as exc:
            log.warning("ledger snapshot at size %s not stored: %s", size, exc)
            return False
        self.ledger_snapshot_base = size
        return True

    def bootstrap(self) -> None:
        """Register the coordinator key in the log (once), signed by the operator key, and fold
        the ledger from the log (the start-up rebuild; later folds are incremental): from the
        stored snapshot if it passes its checks, else from the start; then snapshot the fold
        if it covers enough new entries, so that the next start is as short."""
        loaded = None
        try:
            loaded = ledger_snapshot.load(self.read_engine, self.audit_log,
                                          self.coordinator.public_key)
        except SQLAlchemyError as exc:  # e.g. a database not migrated to 0008: fold it all
            log.warning("ledger snapshot not read (%s): folding the whole log", exc)
        if loaded is not None:
            self.ledger.seed(loaded.ledger, loaded.size)
        self.ledger_snapshot_base = loaded.size if loaded is not None else 0
        with self.read_engine.connect() as connection:
            self.ledger.refresh(connection)
        self.save_ledger_snapshot()
        with self.write() as session:
            if active_key(session.connection(), self.operator.public_key,
                          self.coordinator.key_id) is not None:
                return
            self.append(session, self.sign("key.register", {
                "key_id": self.coordinator.key_id, "public_key": self.coordinator.public_key_b64,
                "role": "coordinator", "owner": "operator:coordinator"}, operator=True))
