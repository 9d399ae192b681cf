"""An audit append that ends its transaction: the insert and the COMMIT in one round trip.

The group commit lets a write queued while its transaction was out at the server (a late run)
end that transaction with its own last statement (`MAY_COMMIT`); an append made as such a
write (`AuditLog.append_in(..., last=True)`, which tests/audit/store_support.GroupLog uses) sends
its INSERT and the COMMIT together on PostgreSQL. The COMMIT happens only if every row went in
where it was meant to; whatever fails, each caller still gets its own answer, refusals leave
nothing, and an append whose COMMIT's outcome is unknown is never made a second time.

The late writes are queued from inside the first write (once: the batch may be made again), so
they are certainly late arrivals of its transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from audit.entry import Entry, sign_entry
from audit.signing import Signer
from audit.store import (
    AuditStoreError,
    CommitOutcomeUnknownError,
    DuplicateEntryError,
    EntryRefusedError,
    verify_storage,
)
from tests.audit.store_support import (
    GroupLog,
    LogKeys,
    libpq_trace,
    memory_tree,
    migrated_engine,
    note_entry,
    register,
    stored_leaves,
    verify_with_auditor,
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = migrated_engine(db_url)
    yield engine
    engine.dispose()


def _with_late(log: GroupLog, first: Callable[[Connection], Any],
               late_entries: list[Entry]) -> tuple[Any, list[Future[list[int]]]]:
    """Run `first` as a write of the log's group commit; while it runs, queue one append per
    entry of `late_entries` (neighbours: one run, made as one write); (first's result, the
    late futures)."""
    late: list[Future[list[int]]] = []

    def write(connection: Connection) -> Any:
        result = first(connection)
        if not late:
            late.extend(log.submit([entry]) for entry in late_entries)
        return result

    return log.group.run(write), late


def _check(engine: Engine, log: GroupLog, keys: LogKeys) -> None:
    leaves = stored_leaves(engine)
    assert log.root() == memory_tree(leaves).root()
    assert verify_with_auditor(log, keys).ok
    verify_storage(engine, keys.operator.public_key)


def test_late_appends_commit_and_a_refused_one_is_refused_alone(engine: Engine) -> None:
    """A replay among late appends (caught by the database's UNIQUE leaf hash, the COMMIT
    then skipped), and an entry of a revoked signer among late appends (caught before any
    statement): each refused alone, with its own reason; the good ones of the same group and
    the first write's append are committed, once."""
    keys = LogKeys.generate()
    hospital = Signer.generate()
    with keys.open(engine) as log:
        log.append_many([register(keys.operator, keys.writer),
                         register(keys.operator, hospital, "hospital", "h:1")])
        old = note_entry(keys.writer, "late", 0)
        assert log.append(old) == 2
        early = note_entry(keys.writer, "late", 1)
        first, late = _with_late(log, lambda c: log.log.append_in(c, log.log.prepare([early])),
                                 [note_entry(keys.writer, "late", 2), old,
                                  note_entry(keys.writer, "late", 3)])
        assert first == [3]
        assert [f.result() for f in (late[0], late[2])] == [[4], [5]]
        with pytest.raises(DuplicateEntryError, match="identical to log entry 2"):
            late[1].result()

        from_hospital = note_entry(hospital, "late", 4)  # prepared (queued) before the revoke
        log.append(sign_entry(keys.operator, "key.revoke",
                              {"key_id": hospital.key_id, "reason": "left"}))
        first, late = _with_late(log, lambda c: log.log.append_in(
            c, log.log.prepare([note_entry(keys.writer, "late", 5)])),
            [note_entry(keys.writer, "late", 6), from_hospital, note_entry(keys.writer, "late", 7)])
        assert first == [7]
        assert [f.result() for f in (late[0], late[2])] == [[8], [9]]
        with pytest.raises(EntryRefusedError, match="revoked"):
            late[1].result()
        assert log.size() == 10
        _check(engine, log, keys)


def test_a_late_append_after_another_process_appended_goes_at_the_real_size(
        engine: Engine) -> None:
    """The first write appends nothing, so the late append takes the lock itself and assumes
    the size its log last committed; another AuditLog ("another process") appended since. On
    PostgreSQL the INSERT fails (next-index trigger), the COMMIT is skipped, and the batch is
    made again: the append lands at the real size, the first write's change is made once."""
    keys = LogKeys.generate()
    with keys.open(engine) as log, keys.open(engine) as other:
        log.append(register(keys.operator, keys.writer))
        assert log.append(note_entry(keys.writer, "size", 0)) == 1  # its committed edge: 2
        assert other.append(note_entry(keys.writer, "size", 1)) == 2
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE side_effects (note TEXT)"))

        def first(connection: Connection) -> str:
            connection.execute(text("INSERT INTO side_effects VALUES ('first')"))
            return "first"

        result, late = _with_late(log, first, [note_entry(keys.writer, "size", 2)])
        assert result == "first"
        assert late[0].result() == [3]
        with engine.connect() as connection:
            assert connection.execute(text("SELECT note FROM side_effects")).scalars().all() == \
                ["first"]
        _check(engine, log, keys)


@pytest.mark.postgres
def test_a_late_append_sends_its_insert_and_the_commit_in_one_round_trip(
        postgres_url: str, tmp_path: Any) -> None:
    """From libpq's own trace: the transaction is the first pipeline (BEGIN, lock, checked
    insert: the first write makes more after its append, so it may not commit) and the late
    append's one query string (the prepared INSERT and COMMIT): two waits for the server,
    where a separate COMMIT would be a third."""
    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    trace_path = tmp_path / "libpq.trace"
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append(note_entry(keys.writer, "one", 0))  # the writer's connection is open
            with libpq_trace(log, trace_path):
                first, late = _with_late(log, lambda c: log.log.append_in(
                    c, log.log.prepare([note_entry(keys.writer, "one", 1)])),
                    [note_entry(keys.writer, "one", 2), note_entry(keys.writer, "one", 3)])
                assert first == [2] and [f.result() for f in late] == [[3], [4]]
        lines = trace_path.read_text().splitlines()
        answers = [line for line in lines if line.startswith("B") and "ReadyForQuery" in line]
        assert len(answers) == 2, lines
        segments: list[list[str]] = [[]]  # what was sent, cut at each Sync or simple Query
        for line in lines:
            if line.startswith("F"):
                if "\tSync" in line:
                    segments.append([])
                elif "\tQuery\t" in line:
                    segments[-1].append(line)
                    segments.append([])
                elif "\tFlush" not in line:  # (psycopg flushes when it leaves a pipeline)
                    segments[-1].append(line)
        assert len(segments) == 3 and segments[2] == [], segments
        assert any("BEGIN" in line for line in segments[0])
        assert not any('"COMMIT"' in line for line in segments[0])
        assert len(segments[1]) == 1, segments[1]  # one query string: the insert, COMMIT
        assert segments[1][0].index("EXECUTE audit_append_rows") < \
            segments[1][0].index("; COMMIT"), segments[1]
        assert log.size() == 5
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_one_string_insert_is_planned_once(postgres_url: str) -> None:
    """The one-string append's prepared INSERT runs its generic plan, planned once per
    connection: the server's own count (`pg_prepared_statements` of the writer's connection)
    holds no custom plan, for appends that take the lock in their string and for a late
    append in a transaction that holds it already. (In the server's default mode every
    EXECUTE of it was planned anew: as much server CPU again as the insert itself.) The
    rows are the same as ever: the log verifies."""
    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    plans = text("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                 "WHERE name = 'audit_append_rows'")
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))  # (no edge known yet: no string)
            for seq in range(8):  # more than the server's 5 custom plans before it compares
                log.append(note_entry(keys.writer, "plan", seq))
            first, late = _with_late(log, lambda c: log.log.append_in(
                c, log.log.prepare([note_entry(keys.writer, "plan", 8)])),
                [note_entry(keys.writer, "plan", 9), note_entry(keys.writer, "plan", 10)])
            assert first == [9] and [f.result() for f in late] == [[10], [11]]
            generic, custom = log.group.run(lambda c: tuple(c.execute(plans).one()))
            assert (generic, custom) == (8 + 1, 0)  # 8 appends, 1 late run; no custom plan
            assert log.size() == 12
            _check(engine, log, keys)
    finally:
        engine.dispose()


def test_packed_rows_must_have_consecutive_indexes() -> None:
    """The packed INSERT gives the entries the indexes :first, :first + 1, ... (entries
    `_PG_ROWS`): rows that are not so would be stored at other indexes than meant."""
    from audit.store.entries import _pg_insert_parameters

    row = {"leaf": b"{}", "leaf_hash": bytes(32), "kind": "k", "key_id": "i", "time": "t"}
    packed = _pg_insert_parameters([{**row, "idx": 5}, {**row, "idx": 6}], [])
    assert packed["first"] == 5 and packed["lens"] == "2,1,1,1,2,1,1,1"
    with pytest.raises(AuditStoreError, match="not consecutive"):
        _pg_insert_parameters([{**row, "idx": 5}, {**row, "idx": 7}], [])


def _spy_on_commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each append that tried to end its transaction (`insert_and_commit`): 'ok', or
    the name of what it raised."""
    import audit.store.log as store_log

    real = store_log.insert_and_commit
    tried: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> None:
        try:
            real(*args, **kwargs)
        except Exception as exc:
            tried.append(type(getattr(exc, "orig", exc)).__name__)
            raise
        tried.append("ok")

    monkeypatch.setattr(store_log, "insert_and_commit", spy)
    return tried


def test_a_whole_transaction_in_one_string_redoes_a_stale_append_and_refuses_a_replay(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append that is its transaction's only write sends BEGIN to COMMIT as one string on
    PostgreSQL, at the size its log last committed. Another AuditLog ("another process")
    appended since: the INSERT fails (next-index trigger), the server skips the COMMIT, and
    the batch is made again the careful way, at the real size. A replay fails the UNIQUE leaf
    hash the same way, and is then refused with its reason; nothing of either is stored
    twice."""
    keys = LogKeys.generate()
    tried = _spy_on_commits(monkeypatch)
    with keys.open(engine) as log, keys.open(engine) as other:
        log.append(register(keys.operator, keys.writer))
        assert log.append(note_entry(keys.writer, "stale", 0)) == 1  # its committed edge: 2
        replay = note_entry(keys.writer, "stale", 1)
        assert other.append(replay) == 2
        tried.clear()
        assert log.append(note_entry(keys.writer, "stale", 2)) == 3
        if engine.dialect.name == "postgresql":
            # refused by the next-index trigger or a primary key; then made the careful way
            assert len(tried) == 1 and tried[0] in ("IntegrityConstraintViolation",
                                                    "UniqueViolation"), tried
        tried.clear()
        with pytest.raises(DuplicateEntryError, match="identical to log entry 2"):
            log.append(replay)
        if engine.dialect.name == "postgresql":
            assert tried == ["UniqueViolation"], tried
        tried.clear()
        assert log.append(note_entry(keys.writer, "stale", 3)) == 4
        if engine.dialect.name == "postgresql":
            assert tried == ["ok"], tried
        assert log.size() == 5
        _check(engine, log, keys)


def _lose_a_late_appends_commit(log: GroupLog, keys: LogKeys) -> None:
    """The first write appends (it makes more after: no COMMIT), a late append sends its
    INSERT and the COMMIT; every caller of the batch is told the outcome is unknown, and the
    first write was made once."""
    made: list[int] = []
    late: list[Future[list[int]]] = []

    def write(connection: Connection) -> list[int]:
        made.append(1)
        result = log.log.append_in(connection, log.log.prepare(
            [note_entry(keys.writer, "lost", 1)]))
        late.append(log.submit([note_entry(keys.writer, "lost", 2)]))
        return result

    with pytest.raises(CommitOutcomeUnknownError, match="unknown"):
        log.group.run(write)
    with pytest.raises(CommitOutcomeUnknownError):
        late[0].result()
    assert made == [1]


def _lose_a_whole_transaction(log: GroupLog, keys: LogKeys) -> None:
    """The append is the transaction's only write: BEGIN to COMMIT as one string."""
    with pytest.raises(CommitOutcomeUnknownError, match="unknown"):
        log.append_many([note_entry(keys.writer, "lost", seq) for seq in (1, 2)])


@pytest.mark.postgres
@pytest.mark.parametrize(("lose", "rows_sent"), [(_lose_a_late_appends_commit, [1]),
                                                 (_lose_a_whole_transaction, [2])],
                         ids=["late-append", "whole-transaction"])
def test_a_connection_lost_after_the_commit_was_sent_is_reported_and_not_redone(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch,
        lose: Callable[[GroupLog, LogKeys], None], rows_sent: list[int]) -> None:
    """If the connection is lost once the COMMIT was sent in an append's string, nobody of
    the batch is acknowledged (CommitOutcomeUnknownError) and nothing is made again (it may
    have committed: here it did, and a second try would store the entries twice or refuse
    them as replays). The next append works, on a fresh connection, at the real size."""
    import audit.store.log as store_log

    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    real = store_log.insert_and_commit
    sent: list[int] = []

    def commit_then_lose(connection: Connection, *args: Any, **kwargs: Any) -> None:
        sent.append(len(args[0]))
        real(connection, *args, **kwargs)  # committed; the answer never comes back
        connection.invalidate()
        raise DBAPIError("COMMIT", {}, ConnectionError("server closed the connection"),
                         connection_invalidated=True)

    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append(note_entry(keys.writer, "lost", 0))
            monkeypatch.setattr(store_log, "insert_and_commit", commit_then_lose)
            lose(log, keys)
            monkeypatch.undo()
            assert sent == rows_sent  # sent once, never again
            assert log.size() == 4  # committed, once
            assert log.append(note_entry(keys.writer, "lost", 3)) == 4
            _check(engine, log, keys)
    finally:
        engine.dispose()


def test_literals_in_the_one_string_cannot_hold_a_quote() -> None:
    """The one-string append writes its values into the SQL: bytes as hex digits (whatever
    the bytes, quotes and backslashes included), the packed lists only if digits and commas;
    an int stays an int. The entries' text fields travel inside the bytes."""
    from audit.store.entries import _bytea_literal, _list_literal, _pg_execute_literal

    hostile = b"'); DROP TABLE audit_entries; --\\x00\x00\xff"
    assert _bytea_literal(hostile) == f"decode('{hostile.hex()}', 'hex')"
    assert _list_literal("1,22,333") == "'1,22,333'"
    for bad in ("1,2'", "1;DROP", "1 ,2", "'", "\\"):
        with pytest.raises(AuditStoreError, match="digits and commas"):
            _list_literal(bad)
    sql = _pg_execute_literal({"first": 7, "data": hostile, "lens": "3,4", "hashes": b"'",
                               "node_pos": "0,7", "node_hashes": b""})
    assert sql == (f"EXECUTE audit_append_rows(7, decode('{hostile.hex()}', 'hex'), '3,4', "
                   "decode('27', 'hex'), '0,7', decode('', 'hex'))")
    with pytest.raises(ValueError):
        _pg_execute_literal({"first": "7); DROP TABLE x; --", "data": b"", "lens": "",
                             "hashes": b"", "node_pos": "", "node_hashes": b""})
