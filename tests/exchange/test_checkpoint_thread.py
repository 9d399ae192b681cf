"""SQLite WAL checkpoints run on the checkpointer's thread, never inside a writer's COMMIT."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from exchange.coordinator.app import _write_engine
from exchange.db.checkpoint import WalCheckpointer, writers_leave_checkpoints_to_a_thread


def _wal_bytes(database: Path) -> int:
    wal = Path(f"{database}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _write_rows(engine: object, start: int, count: int) -> None:
    for i in range(start, start + count):
        with engine.begin() as connection:  # type: ignore[attr-defined]
            connection.execute(text("INSERT INTO t (id, blob) VALUES (:i, :b)"),
                               {"i": i, "b": os.urandom(2048)})


def test_writers_do_not_checkpoint_and_the_thread_does(tmp_path: Path) -> None:
    database = tmp_path / "c.db"
    url = f"sqlite:///{database}"
    engine = _write_engine(url)
    writers_leave_checkpoints_to_a_thread(engine)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB)"))
        assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 0
    # ~2,500 pages of commits: a default writer checkpoints on COMMIT at 1,000 pages and then
    # reuses the WAL from its start, so its file would stay near 4 MB. It grew past that:
    # no writer checkpointed.
    _write_rows(engine, 0, 1200)
    assert _wal_bytes(database) > 8 * 1024 * 1024
    checkpointer = WalCheckpointer(engine, interval_s=0.05)
    try:
        deadline = time.monotonic() + 30
        while checkpointer.checkpoints < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints >= 3
        # Writers keep going while it runs: no lock taken from them, no "database is locked".
        writer = threading.Thread(target=_write_rows, args=(engine, 1200, 300))
        writer.start()
        writer.join(60)
        assert not writer.is_alive()
    finally:
        checkpointer.close()
    # A clean stop truncates the WAL, and every row is in the database file.
    assert _wal_bytes(database) == 0
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM t")).scalar_one() == 1500
    engine.dispose()


def test_only_sqlite(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    with pytest.raises(ValueError, match="SQLite"):
        WalCheckpointer(create_engine("postgresql+psycopg://u@127.0.0.1/x"))
