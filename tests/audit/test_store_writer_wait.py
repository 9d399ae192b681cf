"""The group commit writer's wait for the server on PostgreSQL: the one string of an append
that ends its transaction goes out and is answered in ONE libpq call (PQexec, which waits
without the GIL), and the check of the idle socket before it keeps the GIL; what a lost
connection means is unchanged.

Why it matters: every appender waits for the writer, and each time the writer gives the GIL
up it queues behind the appenders' threads to get it back (docs/benchmarks/audit-append.md).
"""

from __future__ import annotations

import ctypes
import socket
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from audit.store import CommitOutcomeUnknownError
from audit.store import entries as store_entries
from audit.store.schema import ADVISORY_LOCK_KEY
from tests.audit.store_support import LogKeys, migrated_engine, note_entry, register


@pytest.mark.postgres
def test_the_one_string_is_one_libpq_call(postgres_url: str, monkeypatch: Any) -> None:
    """Appends whose transaction is one string (BEGIN to COMMIT), and a late append in a
    transaction that has begun, are sent without psycopg's execute (its Python wait loop takes
    the GIL back at every socket event), and are stored as ever."""
    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    calls: list[str] = []
    real_connection_execute = psycopg.Connection.execute
    real_cursor_execute = psycopg.Cursor.execute

    def connection_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(query)[:40])
        return real_connection_execute(self, query, *args, **kwargs)

    def cursor_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(query)[:40])
        return real_cursor_execute(self, query, *args, **kwargs)

    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append(note_entry(keys.writer, "libpq", 0))  # the statement is prepared
            monkeypatch.setattr(psycopg.Connection, "execute", connection_execute)
            monkeypatch.setattr(psycopg.Cursor, "execute", cursor_execute)
            for seq in range(1, 4):
                assert log.append(note_entry(keys.writer, "libpq", seq)) == seq + 1
            assert calls == []
            monkeypatch.undo()
            assert log.size() == 5
    finally:
        engine.dispose()


def test_the_idle_socket_check_keeps_the_gil() -> None:
    """poll(2) through ctypes.PyDLL (the GIL kept for the call), and what it answers: nothing
    to read, something to read, the peer gone."""
    poll = store_entries._poll_holding_the_gil()
    assert poll is not None  # Linux: libc's poll is there
    assert poll._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    mine, peer = socket.socketpair()
    try:
        assert store_entries._readable_now(mine.fileno()) is False
        peer.send(b"x")
        assert store_entries._readable_now(mine.fileno()) is True
        assert mine.recv(1) == b"x"
        assert store_entries._readable_now(mine.fileno()) is False
        peer.close()
        assert store_entries._readable_now(mine.fileno()) is True
    finally:
        mine.close()


@pytest.mark.postgres
def test_a_connection_lost_while_the_one_string_waits_is_reported_and_not_redone(
        postgres_url: str) -> None:
    """The string (its COMMIT included) is out and waits at the server for the log's lock
    (held by another session); the server then drops the writer's connection. The append's
    outcome is unknown to the writer: CommitOutcomeUnknownError, never made again; nothing
    was stored; the next append is made on a fresh connection at the right index."""
    engine = migrated_engine(postgres_url)
    keys = LogKeys.generate()
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            assert log.append(note_entry(keys.writer, "lost", 0)) == 1
            pid = log.group.run(lambda c: c.execute(text("SELECT pg_backend_pid()")).scalar_one())
            with engine.connect() as holder, engine.connect() as other:
                holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
                future = log.submit([note_entry(keys.writer, "lost", 1)])
                deadline = time.monotonic() + 30  # (only keeps a broken run from hanging)
                waiting = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid "
                               "AND wait_event_type = 'Lock'")
                while not other.execute(waiting, {"pid": pid}).scalar_one():
                    assert time.monotonic() < deadline, "the append never waited for the lock"
                    other.rollback()
                    time.sleep(0.01)
                assert other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"),
                                     {"pid": pid}).scalar_one()
                other.commit()
                with pytest.raises(CommitOutcomeUnknownError):
                    future.result()
                holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                holder.commit()
            assert log.size() == 2  # the lost append was not stored, nor made again
            assert log.append(note_entry(keys.writer, "lost", 2)) == 2
            assert log.size() == 3
    finally:
        engine.dispose()
