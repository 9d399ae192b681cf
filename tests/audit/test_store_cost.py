"""What an append and a proof cost in database work: O(log n), never a rebuild.

Counted with SQLAlchemy cursor events (not timed): an append in steady state is a fixed number
of statements with one look-up of the log and no node read, and inserts the leaf plus exactly
the parents it completes; a root or a proof is two queries reading O(log n) node rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

import audit.store.log as store_log
import audit.store.nodes as store_nodes
from audit.store import ADVISORY_LOCK_KEY
from tests.audit.store_support import (
    LogKeys,
    libpq_trace,
    memory_tree,
    migrated_engine,
    note_entry,
    register,
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = migrated_engine(db_url)
    yield engine
    engine.dispose()


def _trailing_ones(n: int) -> int:
    count = 0
    while n & 1:
        count += 1
        n >>= 1
    return count


def test_an_append_writes_the_leaf_and_its_completed_parents_only(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """In steady state (the committed edge handed over by after_commit) an append through the
    group commit reads the log once (its size and the duplicate look-up, one statement), reads
    no tree node, and inserts the leaf plus exactly the parents it completes; the group
    commit's transaction has no savepoint around its first write. On PostgreSQL an append
    that is its transaction's only write is one query string: BEGIN, the lock, the INSERT of
    entries and nodes, COMMIT (`entries.insert_and_commit`)."""
    keys = LogKeys.generate()
    statements: list[str] = []  # what the driver really ran (SQLite's trace callback)
    via_sqlalchemy: list[str] = []
    writes: list[tuple[list[Any], list[Any]]] = []
    locks: list[int | None] = []  # PostgreSQL: the lock taken with the checked insert
    real_insert = store_log.insert

    def recording_insert(connection: Any, rows: list[Any], nodes: list[Any]) -> None:
        writes.append((rows, nodes))
        real_insert(connection, rows, nodes)

    real_checked_insert = store_log.checked_insert

    def recording_checked_insert(connection: Any, size: int, rows: list[Any],
                                 nodes: list[Any], **kwargs: Any) -> Any:
        writes.append((rows, nodes))
        locks.append(kwargs.get("lock_key"))
        return real_checked_insert(connection, size, rows, nodes, **kwargs)

    real_insert_and_commit = store_log.insert_and_commit

    def recording_insert_and_commit(connection: Any, rows: list[Any], nodes: list[Any],
                                    **kwargs: Any) -> None:
        writes.append((rows, nodes))
        locks.append(kwargs.get("lock_key"))
        real_insert_and_commit(connection, rows, nodes, **kwargs)

    monkeypatch.setattr(store_log, "insert", recording_insert)
    monkeypatch.setattr(store_log, "checked_insert", recording_checked_insert)
    monkeypatch.setattr(store_log, "insert_and_commit", recording_insert_and_commit)
    with keys.open(engine) as log:
        # Listen before the writer opens its connection: a Connection decides at connect time
        # whether its engine has event listeners, so a later listener may never fire.
        @event.listens_for(log.write_engine, "before_cursor_execute")
        def record(_conn: Any, _cursor: Any, statement: str, _parameters: Any, _context: Any,
                   _executemany: bool) -> None:
            via_sqlalchemy.append(statement)

        if engine.dialect.name == "sqlite":
            @event.listens_for(log.write_engine, "connect")
            def trace(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.set_trace_callback(statements.append)

        log.append(register(keys.operator, keys.writer))

        for seq in range(1, 70):
            statements.clear()
            via_sqlalchemy.clear()
            writes.clear()
            index = log.append(note_entry(keys.writer, "cost", seq))
            assert index == seq
            [(rows, nodes)] = writes
            assert [row["idx"] for row in rows] == [index]
            assert len(nodes) == 1 + _trailing_ones(index)
            reads = [s for s in via_sqlalchemy if s.lstrip().upper().startswith(("SELECT", "WITH"))
                     and "audit_entries" in s and not s.lstrip().upper().startswith("WITH NEW")]
            if engine.dialect.name == "sqlite":
                assert len(reads) == 1, reads  # size + duplicates in one statement
            if engine.dialect.name == "postgresql":
                # The whole transaction goes out as one string on the driver connection, past
                # SQLAlchemy's cursor events (test_a_postgresql_append_is_one_round_trip).
                assert via_sqlalchemy == [], via_sqlalchemy
                assert locks[-1] == ADVISORY_LOCK_KEY
            else:
                assert not any("audit_tree_nodes" in s for s in reads)
            if engine.dialect.name == "sqlite":
                # (the trace repeats a statement for each trigger program it runs: drop repeats)
                ran = [s for i, s in enumerate(statements) if i == 0 or s != statements[i - 1]]
                kinds = [s.split()[0].upper() for s in ran]
                assert kinds == ["BEGIN", "SELECT", "INSERT", "INSERT", "COMMIT"], kinds
                assert "audit_entries" in ran[2] and "audit_tree_nodes" in ran[3]


def test_roots_and_proofs_read_o_log_n_nodes_in_one_query(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        entries = [register(keys.operator, keys.writer)]
        entries += [note_entry(keys.writer, "read", seq) for seq in range(1022)]
        log.append_many(entries[:1])
        for start in range(1, len(entries), 100):
            log.append_many(entries[start:start + 100])
        tree = memory_tree(e.leaf_bytes() for e in entries)
        fetched: list[int] = []
        real_fetch = store_nodes.fetch_nodes

        def counting_fetch(connection: Any, wanted: Any) -> dict[tuple[int, int], bytes]:
            found = real_fetch(connection, wanted)
            fetched.append(len(found))
            return found

        monkeypatch.setattr(store_nodes, "fetch_nodes", counting_fetch)
        for size in (1, 2, 3, 511, 512, 513, 1000, 1023):
            fetched.clear()
            assert log.root(size) == tree.root(size)
            assert len(fetched) == 1 and fetched[0] <= 10  # popcount(size) nodes
            for index in (0, size // 2, size - 1):
                fetched.clear()
                assert log.inclusion_proof(index, size) == tree.inclusion_proof(index, size)
                assert len(fetched) == 1 and fetched[0] <= 2 * 10
            fetched.clear()
            assert log.consistency_proof(1, size) == tree.consistency_proof(1, size)
            assert len(fetched) <= 1 and (not fetched or fetched[0] <= 2 * 10)


@pytest.mark.postgres
def test_a_postgresql_append_is_one_round_trip(postgres_url: str, tmp_path: Any) -> None:
    """What the server is asked, read from libpq's own trace of the writer's connection: a
    group-commit transaction made of one append is ONE simple-protocol query (BEGIN, the lock
    with synchronous_commit, the prepared INSERT, COMMIT) and ONE wait for the server."""
    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    trace_path = tmp_path / "libpq.trace"
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append(note_entry(keys.writer, "trips", 0))  # the writer's connection is open
            with libpq_trace(log, trace_path):
                for seq in range(1, 6):
                    assert log.append(note_entry(keys.writer, "trips", seq)) == seq + 1
            assert log.size() == 7
    finally:
        engine.dispose()
    lines = trace_path.read_text().splitlines()
    answers = [line for line in lines if line.startswith("B") and "ReadyForQuery" in line]
    assert len(answers) == 5, lines  # one wait per append
    sent = [line for line in lines if line.startswith("F")]
    assert len(sent) == 5 and all("\tQuery\t" in line for line in sent), sent
    for line in sent:  # each one whole transaction, in this order
        assert line.index("BEGIN") < line.index("pg_advisory_xact_lock") < \
            line.index("synchronous_commit") < line.index("EXECUTE audit_append_rows") < \
            line.index("; COMMIT"), line


@pytest.mark.postgres
def test_a_dropped_connection_under_the_pipeline_is_replaced(postgres_url: str) -> None:
    """The append goes out on the driver connection: if the server dropped that connection
    while the writer was idle, the append is still made, on a fresh connection, as the group
    commit does for its own statements. Not as one string with its COMMIT (a lost connection
    would then leave the outcome unknown): the server said it was closing (the socket is
    readable), so the append takes the pipeline, which fails before any COMMIT."""
    from sqlalchemy import text

    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            assert log.append(note_entry(keys.writer, "drop", 0)) == 1
            pid = log.group.run(lambda c: c.execute(text("SELECT pg_backend_pid()")).scalar_one())
            with engine.connect() as other:  # (and wait, up to 10 s, until it is gone)
                assert other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"),
                                     {"pid": pid}).scalar_one()
                other.commit()
            assert log.append(note_entry(keys.writer, "drop", 1)) == 2
            assert log.size() == 3
    finally:
        engine.dispose()
