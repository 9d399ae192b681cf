"""SQLite WAL checkpoints on a background thread, off the commit path.

Why: in WAL mode SQLite copies the log back into the database file (a checkpoint) whenever a
COMMIT finds the WAL over `wal_autocheckpoint` pages (1,000 by default), and it does so inside
that COMMIT, fsync of the database file included. For the coordinator that COMMIT is the group
commit of every submission in flight: each such checkpoint stalled all of them at once, one of
the two causes of the submission API's latency tail (docs/benchmarks/api.md). With this
checkpointer the writers never checkpoint (`wal_autocheckpoint=0` on their connections) and a
thread of its own runs PASSIVE checkpoints (they never wait for, nor block, readers or writers),
a few times a second; the WAL file is cut back to `WAL_SIZE_LIMIT` bytes when it restarts.
Durability is unchanged: a commit is durable once it is in the fsynced WAL.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.pool import NullPool

from exchange.db.engine import make_engine
from exchange.logging import get_logger

log = get_logger("exchange.db")

CHECKPOINT_INTERVAL_S = 0.25
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is truncated to after a restart
# A WAL still this many pages long after a checkpoint means readers keep it from completing.
WAL_WARN_PAGES = 100_000


def writers_leave_checkpoints_to_a_thread(engine: Engine) -> None:
    """Connections of `engine` (SQLite) never checkpoint on COMMIT; a WalCheckpointer must."""

    @event.listens_for(engine, "connect")
    def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        cursor.close()


class WalCheckpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` every `interval_s` on a connection of its own to
    `engine`'s database, until `close()` (which runs a last TRUNCATE checkpoint: a clean stop
    leaves an empty WAL).

    A plain driver connection, not one of `engine`'s: the coordinator's write engine begins
    every transaction with BEGIN IMMEDIATE, and a checkpoint must run outside any transaction
    (inside one it would hold the write lock it is meant to leave to the writers)."""

    def __init__(self, engine: Engine, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError("WalCheckpointer: SQLite engines only")
        self._engine = make_engine(engine.url.render_as_string(hide_password=False),
                                   poolclass=NullPool)
        self.interval_s = interval_s
        self.checkpoints = 0  # completed calls (for tests and operators)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def checkpoint(self, connection: Any, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """(busy, WAL pages, pages checkpointed) as SQLite reports them."""
        cursor = connection.cursor()
        try:
            cursor.execute(f"PRAGMA wal_checkpoint({mode})")
            busy, pages, done = cursor.fetchone()
        finally:
            cursor.close()
        self.checkpoints += 1
        return int(busy), int(pages), int(done)

    def _run(self) -> None:
        warned = False
        connection = self._engine.raw_connection()
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    _busy, pages, _done = self.checkpoint(connection)
                except Exception as exc:  # keep going: the next one may succeed
                    log.warning("sqlite.checkpoint_failed", error=str(exc))
                    continue
                if pages > WAL_WARN_PAGES and not warned:
                    log.warning("sqlite.wal_long", pages=pages)
                warned = pages > WAL_WARN_PAGES
            try:
                self.checkpoint(connection, "TRUNCATE")
            except Exception as exc:  # e.g. a reader still open: the next start checkpoints
                log.warning("sqlite.checkpoint_failed", error=str(exc), mode="TRUNCATE")
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()
