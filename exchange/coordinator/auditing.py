"""The coordinator's side of the audit log: key look-ups and the ledger fold it serves.

Appending is the audit store's job (`audit.store.AuditLog.append_in`): the entry and the state
change it records commit in the same transaction, with the store's own form, size, signer and
uniqueness rules and its write lock. Nothing of those rules is repeated here.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, event, func, select

from audit.entry import Entry
from audit.keyring import KEY_KINDS, Keyring
from audit.ledger import TOKEN_KINDS, Escrow, Ledger, LedgerError
from audit.store import audit_entries, entry_from_leaf


def active_key(connection: Connection, trusted_operator_key: bytes, kid: str) -> bytes | None:
    """The public key of key id `kid` if it is registered and active in the log as `connection`
    sees it, else None. Replays the key entries (a handful) with the audit package's Keyring;
    used once at start-up, to register the coordinator key only if it is not yet."""
    keyring = Keyring(trusted_operator_key)
    e = audit_entries.c
    for row in connection.execute(select(e.idx, e.leaf).where(e.kind.in_(sorted(KEY_KINDS)))
                                  .order_by(e.idx)):
        keyring.apply(entry_from_leaf(bytes(row.leaf)), int(row.idx))
    record = keyring.get(kid)
    return record.public_key if record is not None and record.active else None


# -- balances: the audit package's Ledger fold, kept incrementally -----------------------------

LEDGER_KINDS = frozenset(TOKEN_KINDS | {"key.register", "key.rotate"})
_FORK = "exchange.coordinator.ledger_fork"
_COMMITTING = "exchange.coordinator.ledger_fork_committing"
_FIRST_APPEND = "exchange.coordinator.first_append"


class LedgerFoldError(RuntimeError):
    """An entry of the log breaks a ledger rule (`audit.ledger.LedgerError` inside)."""

    def __init__(self, error: LedgerError) -> None:
        super().__init__(str(error))
        self.error = error


# Built once: these run several times per submission, and constructing the IN list's bind
# parameters and the statement's cache key on every call cost more than executing it.
_LOG_SIZE = select(func.max(audit_entries.c.idx))
_LEDGER_ROWS = (select(audit_entries.c.idx, audit_entries.c.leaf)
                .where(audit_entries.c.idx >= bindparam("start"), audit_entries.c.idx < bindparam("stop"),
                       audit_entries.c.kind.in_(sorted(LEDGER_KINDS)))
                .order_by(audit_entries.c.idx))


def log_size(connection: Connection) -> int:
    top = connection.execute(_LOG_SIZE).scalar_one()
    return 0 if top is None else int(top) + 1


def _ledger_rows(connection: Connection, start: int, stop: int) -> Iterator[tuple[int, Entry]]:
    for row in connection.execute(_LEDGER_ROWS, {"start": start, "stop": stop}):
        yield int(row.idx), entry_from_leaf(bytes(row.leaf))


def _fold(ledger: Ledger, rows: Iterable[tuple[int, Entry]]) -> None:
    """Apply `rows`. Copy-on-write: the Escrow an entry names is replaced by a copy before the
    Ledger changes it, so a fork made earlier (sharing the old Escrow object) never sees it."""
    for index, entry in rows:
        study_id = entry.payload.get("study_id")
        study = ledger.studies.get(study_id) if isinstance(study_id, str) else None
        if study is not None:
            ledger.studies[study.study_id] = dataclasses.replace(
                study, receipts=list(study.receipts), seen=set(study.seen), members=dict(study.members))
        try:
            ledger.apply(entry, index)
        except LedgerError as exc:
            raise LedgerFoldError(exc) from exc


_ATOMS = (str, int, float, bool, bytes, type(None))


def _shared(item: object) -> bool:
    """A value a fork may share with the original: immutable, or an Escrow (copied on write by
    `_fold`), or a frozen dataclass."""
    if isinstance(item, (*_ATOMS, Escrow)):
        return True
    params = getattr(type(item), "__dataclass_params__", None)
    return params is not None and bool(params.frozen)


def _fork(ledger: Ledger) -> Ledger:
    """An independent copy of `ledger` in O(accounts + studies), not O(everything it holds).

    A plain deepcopy grows with everything the ledger holds, on every submission. Here the
    Escrow objects and immutable (frozen dataclass) values are shared with the original, and
    `_fold` copies an Escrow before anything changes it, in the fork and in the original alike.
    A dict whose values are all shared (studies, keys, balances) is copied with `dict()`, not
    walked by deepcopy (still dear per fork with thousands of studies, under the API
    benchmark); everything else (handlers bound to the ledger, small state) goes through
    deepcopy with the new ledger in its memo, exactly as `copy.deepcopy(ledger)` would.
    """
    fork = object.__new__(type(ledger))
    memo: dict[int, Any] = {id(ledger): fork}
    pending: list[tuple[object, str, Any]] = [(fork, name, value) for name, value in vars(ledger).items()]
    while pending:
        target, name, value = pending.pop()
        if isinstance(value, dict) and all(_shared(v) for v in value.values()):
            copied: Any = dict(value)
            memo[id(value)] = copied
        elif dataclasses.is_dataclass(value) and not isinstance(value, type) and not _shared(value):
            # e.g. LedgerState: a fresh instance whose fields are forked the same way
            copied = object.__new__(type(value))
            memo[id(value)] = copied
            pending.extend((copied, field, v) for field, v in vars(value).items())
        else:
            copied = copy.deepcopy(value, memo)
        vars(target)[name] = copied
    return fork


@dataclass
class _Fork:
    transaction: object
    ledger: Ledger
    size: int  # the log prefix folded into `ledger`, as this transaction sees the log
    # Every ledger row folded into `ledger` since it was a fold of the committed prefix
    # [0, base): (index, entry), in order. Lets the shared fold be brought level with it.
    base: int = 0
    rows: list[tuple[int, Entry]] = dataclasses.field(default_factory=list)
    # True once it was brought level with the log right after this transaction's own append
    # (which holds the log's write lock from then on): nobody else can append until the
    # transaction ends, and a rolled-back savepoint (which may release PostgreSQL's lock)
    # drops the copy. So it stays level without reading the log's size again.
    level: bool = False


class LedgerView:
    """Balances, escrows and study terms as `audit.ledger.Ledger` folds them from the log.

    Why: DESIGN says balances are a fold over the log with ONE implementation, the one the
    auditor runs; the coordinator serves and checks exactly that fold, so its numbers and an
    auditor's cannot differ. No balance is stored anywhere.

    How: one Ledger folded over the COMMITTED log prefix, shared by the process, moved forward
    (under a thread lock) with the new ledger-relevant rows whenever someone looks: appends by
    this process, by another coordinator process or by `exchange admin` are all picked up, and
    a restart refolds from the log. A write transaction that appends ledger entries gets its
    own copy (`in_transaction`) with its uncommitted rows folded on top, read back from the
    log table itself; the shared fold never sees what may still roll back.

    Which rows are committed: a transaction that has not appended sees only committed rows;
    one that has appended marks the index of its first entry (`note_append`), and every row
    below it was committed before the write lock was granted to it.
    """

    def __init__(self, root_key_id: str) -> None:
        self._root_key_id = root_key_id
        self._lock = threading.Lock()
        self._ledger = Ledger(root_key_id)
        self._size = 0
        # A second, private fold of the committed prefix [0, size), which nobody else holds:
        # the next write transaction takes it as its copy instead of forking the shared fold.
        self._spare: tuple[Ledger, int] | None = None

    def seed(self, fold: Ledger, size: int) -> None:
        """Start from `fold`, the ledger folded over the first `size` committed entries (a
        checked snapshot: exchange/coordinator/ledger_snapshot.py), instead of from nothing;
        the next `refresh` folds only what follows. Only before anything was folded."""
        with self._lock:
            if self._size != 0:
                raise RuntimeError("ledger view: seed before the first fold only")
            self._ledger, self._size, self._spare = fold, size, None

    def committed_fold(self) -> tuple[Ledger, int]:
        """A copy of the shared fold and the log size it covers, for a snapshot: the copy
        shares only what the fold copies on write (`_fork`), so it may be read (pickled) while
        the shared fold moves on."""
        with self._lock:
            return _fork(self._ledger), self._size

    def _advance(self, connection: Connection, committed: int) -> None:
        """Fold the committed rows [self._size, committed) into the shared ledger."""
        with self._lock:
            if committed <= self._size:
                return
            _fold(self._ledger, _ledger_rows(connection, self._size, committed))
            self._size = committed

    def refresh(self, connection: Connection) -> int:
        """Fold everything committed that `connection` (outside any append) sees; the size."""
        size = log_size(connection)
        self._advance(connection, size)
        return size

    def snapshot(self, connection: Connection, accounts: Iterable[str] | None = None) -> dict[str, Any]:
        """The ledger state (minted, escrow, balances; only `accounts` if given), committed."""
        self.refresh(connection)
        with self._lock:
            state = self._ledger.state
            wanted = sorted(state.balances) if accounts is None else sorted(set(accounts))
            return {"minted": state.minted, "escrow": state.escrow, "unclaimed": state.unclaimed,
                    "balances": {a: state.balances[a] for a in wanted if a in state.balances}}

    def balance(self, connection: Connection, account: str) -> int:
        self.refresh(connection)
        with self._lock:
            return self._ledger.balance(account)

    def known_balance(self, connection: Connection, account: str) -> int:
        """`account`'s balance as far as this process knows without reading: this write
        transaction's ledger copy if it has one, else the committed fold. Behind the log if
        another process appended since; for a first check only (the fold of an append, under
        the log's write lock, is the rule)."""
        fork: _Fork | None = connection.info.get(_FORK)
        if fork is not None and fork.transaction is connection.get_transaction():
            return fork.ledger.balance(account)
        with self._lock:
            return self._ledger.balance(account)

    def note_append(self, connection: Connection, first_index: int) -> None:
        """Record that this transaction appended entries from `first_index` on (first call wins)."""
        marker = connection.info.get(_FIRST_APPEND)
        transaction = connection.get_transaction()
        if marker is None or marker[0] is not transaction:
            connection.info[_FIRST_APPEND] = (transaction, first_index)

    def has_copy(self, connection: Connection) -> bool:
        """Whether this transaction holds a ledger copy (see in_transaction)."""
        fork: _Fork | None = connection.info.get(_FORK)
        return fork is not None and fork.transaction is connection.get_transaction()

    def in_transaction(self, connection: Connection,
                       appended: tuple[int, Sequence[Entry]] | None = None) -> Ledger:
        """The fold of the log as this transaction sees it, its own appends included.

        `appended`: (first index, entries) this transaction has just appended. When its copy
        already holds every row before them, they are folded as they are, without reading the
        log's size and rows back: what append_in stored is exactly these entries, and a
        rolled-back savepoint drops the copy (`forget_transactions`), so "the copy ends where
        the append began" means nothing in between is unknown to it. Otherwise, the log as
        the transaction sees it is read.

        The caller must not change the result. Raises LedgerFoldError if a row (typically one
        this transaction just appended) breaks a ledger rule: the caller must roll back.
        """
        transaction = connection.get_transaction()
        fork: _Fork | None = connection.info.get(_FORK)
        if appended is None and fork is not None and fork.transaction is transaction and fork.level:
            return fork.ledger
        if appended is not None and fork is not None and fork.transaction is transaction \
                and fork.size == appended[0]:
            _fold_into(connection, fork, _appended_rows(*appended))
            fork.size = appended[0] + len(appended[1])
            fork.level = True
            return fork.ledger
        # How far the log goes as this transaction sees it: read, or, right after its own
        # append, known (its entries start at appended[0]; they are folded from memory).
        stop = appended[0] if appended is not None else log_size(connection)
        marker = connection.info.get(_FIRST_APPEND)
        committed = marker[1] if marker is not None and marker[0] is transaction else stop
        self._advance(connection, committed)
        fork = connection.info.get(_FORK)
        if fork is None or fork.transaction is not transaction or fork.size > stop:
            # No copy yet for this transaction, or a savepoint rolled back rows it had folded.
            fork = self._checkout(transaction)
            connection.info[_FORK] = fork
        if fork.size < stop:
            _fold_into(connection, fork, list(_ledger_rows(connection, fork.size, stop)))
            fork.size = stop
        if appended is not None:
            _fold_into(connection, fork, _appended_rows(*appended))
            fork.size = appended[0] + len(appended[1])
            fork.level = True  # right after this transaction's own append (lock held)
        return fork.ledger

    def _checkout(self, transaction: object) -> _Fork:
        """A ledger copy of the committed fold for `transaction` to change: the spare if it is
        level with the shared fold (O(1)), else a fork of the shared fold (O(accounts +
        studies), per write transaction: a large share of the submission writer's time)."""
        with self._lock:
            spare, self._spare = self._spare, None
            if spare is not None and spare[1] == self._size:
                return _Fork(transaction, spare[0], self._size, base=self._size)
            return _Fork(transaction, _fork(self._ledger), self._size, base=self._size)

    def after_commit(self, connection: Connection) -> None:
        """Call right after `connection`'s transaction COMMITTED (not before: a failed commit
        must not move the shared fold). Its ledger copy is the fold of the committed log up to
        where it reached: it becomes the shared fold, and the former shared fold, brought level
        with the copy's rows, becomes the spare for the next write transaction. Two folds
        alternate, each kept level by folding the new rows once, instead of a fork per
        transaction and a re-read of the rows it appended."""
        fork: _Fork | None = connection.info.pop(_COMMITTING, None)
        if fork is None:
            return
        with self._lock:
            if fork.size <= self._size or fork.base > self._size:
                return  # the shared fold is as far already (or the copy cannot extend it)
            previous, previous_size = self._ledger, self._size
            self._ledger, self._size = fork.ledger, fork.size
        try:  # `previous` is nobody's now: only the lock ever handed it out
            _fold(previous, [(index, entry) for index, entry in fork.rows if index >= previous_size])
        except LedgerFoldError:
            return  # cannot happen for rows the copy folded; be safe: no spare
        with self._lock:
            if self._size == fork.size:
                self._spare = (previous, fork.size)


def _appended_rows(first: int, entries: Sequence[Entry]) -> list[tuple[int, Entry]]:
    return [(first + offset, entry) for offset, entry in enumerate(entries)
            if entry.kind in LEDGER_KINDS]


def _fold_into(connection: Connection, fork: _Fork, rows: list[tuple[int, Entry]]) -> None:
    """Fold `rows` into the transaction's copy and remember them (see LedgerView.after_commit)."""
    try:
        _fold(fork.ledger, rows)
    except LedgerFoldError:
        connection.info.pop(_FORK, None)  # partly folded: never used again
        raise
    fork.rows.extend(rows)


def forget_transactions(engine: Engine) -> None:
    """Drop a transaction's ledger copy and append mark when it ends (connection.info belongs to
    the pooled DBAPI connection and outlives the transaction)."""

    def _clear(connection: Connection) -> None:
        connection.info.pop(_FORK, None)
        connection.info.pop(_COMMITTING, None)
        connection.info.pop(_FIRST_APPEND, None)

    def _committing(connection: Connection) -> None:
        # Fired before the COMMIT is sent: the copy waits for LedgerView.after_commit, which
        # only a caller that saw the commit succeed calls. Dropped at the next begin/rollback.
        fork: _Fork | None = connection.info.pop(_FORK, None)
        connection.info.pop(_FIRST_APPEND, None)
        if fork is not None and fork.transaction is connection.get_transaction():
            connection.info[_COMMITTING] = fork
        else:
            connection.info.pop(_COMMITTING, None)

    def _begin(connection: Connection) -> None:
        connection.info.pop(_COMMITTING, None)

    def _forget_fork(connection: Connection, _name: object, _context: object) -> None:
        # A rolled-back savepoint removed rows the copy may have folded; rows appended later
        # at the same indexes would look "already folded" by size alone. (The append mark
        # stays: the rows below it are still committed ones.)
        connection.info.pop(_FORK, None)

    event.listen(engine, "begin", _begin)
    event.listen(engine, "commit", _committing)
    event.listen(engine, "rollback", _clear)
    event.listen(engine, "rollback_savepoint", _forget_fork)
