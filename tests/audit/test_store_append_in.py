"""AuditLog.append_in: entries appended inside the caller's transaction, with its other changes.

`log.append` here is the coordinator's way (tests/audit/store_support.GroupLog: append_in in a
write of its group commit, after_commit after each commit); `engine.begin()` blocks are plain
transactions of another caller, whose commits the log is not told about."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from audit.entry import sign_entry
from audit.signing import Signer
from audit.store import (
    AuditStoreError,
    DuplicateEntryError,
    EntryRefusedError,
    verify_storage,
)
from tests.audit.store_support import (
    LogKeys,
    immediate_engine,
    memory_tree,
    migrated_engine,
    note_entry,
    register,
    stored_leaves,
    verify_with_auditor,
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrated_engine(db_url).dispose()
    engine = immediate_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE side_effects (id INTEGER PRIMARY KEY, note TEXT)"))
    yield engine
    engine.dispose()


def _side_effects(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return [row.note for row in connection.execute(
            text("SELECT note FROM side_effects ORDER BY id"))]


def test_entries_commit_with_the_callers_change(engine: Engine) -> None:
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO side_effects (id, note) VALUES (1, 'study s1')"))
            indexes = log.append_in(connection, [register(keys.operator, keys.writer),
                                                 note_entry(keys.writer, "in", 0)])
        assert indexes == [0, 1]
        assert _side_effects(engine) == ["study s1"]
        # The group commit (the coordinator's writer) appends after what was committed.
        assert log.append(note_entry(keys.writer, "in", 1)) == 2
        with engine.begin() as connection:
            assert log.append_in(connection, [note_entry(keys.writer, "in", 2)]) == [3]
        leaves = stored_leaves(engine)
        assert log.root() == memory_tree(leaves).root()
        assert log.inclusion_proof(1, 4) == memory_tree(leaves).inclusion_proof(1, 4)
        assert verify_with_auditor(log, keys).ok
    verify_storage(engine, keys.operator.public_key)


def test_a_rolled_back_transaction_leaves_no_entry(engine: Engine) -> None:
    keys = LogKeys.generate()
    entry = register(keys.operator, keys.writer)
    with keys.open(engine) as log:
        with pytest.raises(RuntimeError, match="study refused"), engine.begin() as connection:
            connection.execute(text("INSERT INTO side_effects (id, note) VALUES (1, 'x')"))
            assert log.append_in(connection, [entry]) == [0]
            raise RuntimeError("study refused later in the same transaction")
        assert log.size() == 0
        assert _side_effects(engine) == []
        # Nothing of it lingers: not in the key state, not as a "duplicate".
        with pytest.raises(EntryRefusedError, match="not registered"):
            log.append(note_entry(keys.writer, "rb", 0))
        with engine.begin() as connection:
            assert log.append_in(connection, [entry]) == [0]
        assert log.append(note_entry(keys.writer, "rb", 1)) == 1
    verify_storage(engine, keys.operator.public_key)


def test_calls_in_one_transaction_see_each_other(engine: Engine) -> None:
    keys = LogKeys.generate()
    hospital = Signer.generate()
    with keys.open(engine) as log:
        with engine.begin() as connection:
            log.append_in(connection, [register(keys.operator, keys.writer)])
            log.append_in(connection, [register(keys.operator, hospital, "hospital", "h:1")])
            assert log.append_in(connection, [note_entry(hospital, "h", 0)]) == [2]
            revoke = {"key_id": hospital.key_id, "reason": "left the consortium"}
            log.append_in(connection, [sign_entry(keys.operator, "key.revoke", revoke)])
            with pytest.raises(EntryRefusedError, match="revoked"):
                log.append_in(connection, [note_entry(hospital, "h", 1)])
        assert log.size() == 4
        with pytest.raises(EntryRefusedError, match="revoked"):
            log.append(note_entry(hospital, "h", 2))
    verify_storage(engine, keys.operator.public_key)


def test_refusals_and_misuse(engine: Engine) -> None:
    keys = LogKeys.generate()
    stranger = Signer.generate()
    with keys.open(engine) as log:
        first = register(keys.operator, keys.writer)
        with engine.begin() as connection:
            log.append_in(connection, [first])
        with pytest.raises(DuplicateEntryError, match="identical to log entry 0"), \
                engine.begin() as connection:
            log.append_in(connection, [first])
        with pytest.raises(EntryRefusedError, match="not registered"), \
                engine.begin() as connection:
            # signed in this process (the memo skips only verification, never registration)
            log.append_in(connection, [note_entry(stranger, "s", 0)])
        with engine.connect() as connection, pytest.raises(AuditStoreError, match="open transaction"):
            log.append_in(connection, [note_entry(keys.writer, "s", 1)])
        assert log.size() == 1


def test_plain_and_group_commit_transactions_interleave(engine: Engine) -> None:
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        acked: list[int] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def in_transaction(tag: str) -> None:
            try:
                for seq in range(15):
                    with engine.begin() as connection:
                        connection.execute(text("SELECT 1"))
                        indexes = log.append_in(connection, [note_entry(keys.writer, tag, seq)])
                    with lock:
                        acked.extend(indexes)
            except BaseException as exc:
                errors.append(exc)

        def through_group_commit(tag: str) -> None:
            try:
                for seq in range(15):
                    index = log.append(note_entry(keys.writer, tag, seq))
                    with lock:
                        acked.append(index)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=in_transaction, args=(f"t{n}",)) for n in range(3)]
        threads += [threading.Thread(target=through_group_commit, args=(f"w{n}",)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sorted(acked) == list(range(1, 91))
        assert verify_with_auditor(log, keys).ok
    verify_storage(engine, keys.operator.public_key)


def test_savepoint_rollbacks_between_appends_in_one_transaction(engine: Engine) -> None:
    """A group commit's shape: several append_in calls in one transaction, some inside
    savepoints that roll back (also with the same number of entries appended again at the same
    indexes, and a key registered then rolled back). The tree and the key state each call works
    from must be the log's as it is: the stored nodes match a tree rebuilt from the leaves, and
    the auditor verifies it."""
    keys = LogKeys.generate()
    stranger = Signer.generate()
    with keys.open(engine) as log:
        with engine.begin() as connection:
            log.append_in(connection, [register(keys.operator, keys.writer)])
            log.append_in(connection, [note_entry(keys.writer, "sp", 0), note_entry(keys.writer, "sp", 1)])
            for seq in range(2, 12, 2):
                savepoint = connection.begin_nested()
                log.append_in(connection, [register(keys.operator, stranger, owner=f"x:{seq}"),
                                           note_entry(stranger, "gone", seq)])
                savepoint.rollback()  # the registration went with it
                with pytest.raises(EntryRefusedError, match="not registered"):
                    nested = connection.begin_nested()
                    try:
                        log.append_in(connection, [note_entry(stranger, "gone", seq + 1)])
                    finally:
                        nested.rollback()
                log.append_in(connection, [note_entry(keys.writer, "sp", seq),
                                           note_entry(keys.writer, "sp", seq + 1)])
        assert log.size() == 13
        verify_storage(engine, keys.operator.public_key)
        assert log.root() == memory_tree(stored_leaves(engine)).root()
        report = verify_with_auditor(log, keys)
        assert report.problem is None and report.entries == 13
        # The group commit continues from what this transaction committed.
        assert log.append(note_entry(keys.writer, "sp", 99)) == 13
        verify_storage(engine, keys.operator.public_key)


def test_a_committed_edge_is_reused_and_a_rolled_back_one_never(engine: Engine) -> None:
    """after_commit hands the next append_in transaction the key state and the tree's right
    edge of a committed one. Only a commit the caller saw counts: after a rollback, entries of
    the same count appended by someone else must be read, not taken for the rolled-back ones
    (the tree would be wrong, and the auditor would see it)."""
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        with engine.connect() as connection:
            with connection.begin() as transaction:
                log.append_in(connection, [note_entry(keys.writer, "a", i) for i in range(3)])
            log.after_commit(connection, transaction)
        assert log._committed_edge is not None and log._committed_edge[0] == 4
        # Reused: the next transaction reads neither key entries nor tree nodes.
        statements: list[str] = []

        def record(*args: object) -> None:
            statements.append(str(args[2]))

        from sqlalchemy import event
        event.listen(engine, "before_cursor_execute", record)
        try:
            with engine.begin() as connection:
                assert log.append_in(connection, [note_entry(keys.writer, "b", 0)]) == [4]
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert not any("audit_tree_nodes" in s and s.lstrip().upper().startswith("SELECT")
                       for s in statements), statements
        # A transaction that rolls back after its append_in (after_commit never called) ...
        with engine.connect() as connection, pytest.raises(RuntimeError), connection.begin():
            log.append_in(connection, [note_entry(keys.writer, "gone", i) for i in range(2)])
            raise RuntimeError("roll back")
        # ... then another process appends as many other entries: same size, other rows.
        with keys.open(engine) as elsewhere:
            elsewhere.append_many([note_entry(keys.writer, "other", i) for i in range(2)])
        with engine.begin() as connection:
            assert log.append_in(connection, [note_entry(keys.writer, "c", 0)]) == [7]
        leaves = stored_leaves(engine)
        assert log.root() == memory_tree(leaves).root()
        assert verify_with_auditor(log, keys).ok
    verify_storage(engine, keys.operator.public_key)


def test_entries_prepared_before_queueing_still_meet_the_rules_at_their_index(
        engine: Engine) -> None:
    """`AuditLog.prepare` checks form and signature early (in the caller's thread); whether
    the signer may sign at the entry's index is still decided by append_in: an entry prepared
    before its signer was revoked is refused after. A forged signature never gets that far."""
    keys = LogKeys.generate()
    hospital = Signer.generate()
    with keys.open(engine) as log:
        log.append_many([register(keys.operator, keys.writer),
                         register(keys.operator, hospital, "hospital", "h:1")])
        early = log.prepare([note_entry(hospital, "p", 0)])
        forged = note_entry(hospital, "p", 1).to_json()
        forged["payload"]["round"] = 99
        with pytest.raises(EntryRefusedError, match="signature"):
            log.prepare([forged])
        revoke = {"key_id": hospital.key_id, "reason": "left the consortium"}
        log.append(sign_entry(keys.operator, "key.revoke", revoke))
        with pytest.raises(EntryRefusedError, match="revoked"), engine.begin() as connection:
            log.append_in(connection, early)
        fine = log.prepare([note_entry(keys.writer, "p", 2)])
        with engine.begin() as connection:
            assert log.append_in(connection, fine) == [3]
    verify_storage(engine, keys.operator.public_key)


@pytest.mark.postgres
def test_the_postgresql_lock_is_remembered_only_outside_savepoints(postgres_url: str) -> None:
    """append_in takes the advisory lock once per transaction, but a lock taken inside a
    savepoint goes when that savepoint is rolled back: the next append_in must take it again
    (seen in pg_locks from inside the transaction)."""
    migrated_engine(postgres_url).dispose()
    engine = immediate_engine(postgres_url)
    held = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid() AND granted")
    keys = LogKeys.generate()
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append(note_entry(keys.writer, "lock", 0))  # the committed edge is known
            with engine.begin() as connection:
                savepoint = connection.begin_nested()
                log.append_in(connection, [note_entry(keys.writer, "lock", 1)])
                assert connection.execute(held).scalar_one() == 1
                savepoint.rollback()
                assert connection.execute(held).scalar_one() == 0  # released with it
                assert log.append_in(connection, [note_entry(keys.writer, "lock", 2)]) == [2]
                assert connection.execute(held).scalar_one() == 1
                assert log.append_in(connection, [note_entry(keys.writer, "lock", 3)]) == [3]
            assert log.size() == 4
    finally:
        engine.dispose()
