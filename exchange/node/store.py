"""Opening the node's database: migrate to the latest schema (Alembic node tree), then
hand out sessions. Every `exchange node` command and the daemon go through here, so a node
upgraded in place migrates itself on its next start."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from exchange.db.engine import make_engine
from exchange.node.models import DaemonState, ErrorRow

MAX_ERRORS_KEPT = 1000


@dataclass
class NodeStore:
    engine: Engine
    sessions: sessionmaker[Session]
    #: SQLite: the connection `change_token` asks (`PRAGMA data_version` counts the commits of
    #: every OTHER connection, so it must be one that never writes), opened on first use
    _probe: Any = field(default=None, repr=False, compare=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.sessions.begin() as session:
            yield session

    def get_state(self, key: str, default: Any = None) -> Any:
        with self.sessions() as session:
            row = session.get(DaemonState, key)
            return default if row is None else row.value

    def set_state(self, key: str, value: Any) -> None:
        """Insert or replace `key` in one statement (INSERT ... ON CONFLICT DO UPDATE).

        Why one statement: the daemon and a steward's import (`exchange node import-data`
        while the daemon runs) both record the site export's state; a read then an insert let
        both read "absent" and the second insert fail on the key."""
        dialect = self.engine.dialect.name
        with self.transaction() as session:
            if dialect == "sqlite":
                lite = sqlite_insert(DaemonState).values(key=key, value=value)
                session.execute(lite.on_conflict_do_update(index_elements=[DaemonState.key],
                                                           set_={"value": lite.excluded.value}))
            elif dialect == "postgresql":
                pg = postgresql_insert(DaemonState).values(key=key, value=value)
                session.execute(pg.on_conflict_do_update(index_elements=[DaemonState.key],
                                                         set_={"value": pg.excluded.value}))
            else:  # another database: read, then insert or update
                row = session.get(DaemonState, key)
                if row is None:
                    session.add(DaemonState(key=key, value=value))
                else:
                    row.value = value

    def record_error(self, component: str, message: str) -> None:
        """Keep the error for `exchange node status` (the newest MAX_ERRORS_KEPT)."""
        with self.transaction() as session:
            session.add(ErrorRow(component=component, message=message[:4000], at=datetime.now(UTC)))
            session.flush()
            count = session.execute(select(func.count()).select_from(ErrorRow)).scalar_one()
            if count > MAX_ERRORS_KEPT:
                cutoff = session.execute(select(ErrorRow.id).order_by(ErrorRow.id.desc())
                                         .offset(MAX_ERRORS_KEPT).limit(1)).scalar_one()
                session.execute(delete(ErrorRow).where(ErrorRow.id <= cutoff))

    def change_token(self) -> object | None:
        """Something that changes whenever a transaction that wrote to this database has
        committed since it was last read (by anyone: the daemon's own sessions, a steward's
        command, the Flower process charging the privacy ledger); None when the backend cannot
        tell (then assume a change). Equal tokens mean nothing was committed in between.

        Why: the daemon's step re-reads its studies, decisions, site files and ledger charges
        to find what to do; while nothing was written, it would find what it found last time
        (docs/benchmarks/scale.md, "A hospital's CPU during a round").
        - SQLite: `PRAGMA data_version` on a connection of its own, which never writes (the
          value moves with every commit of any other connection, this process's included).
        - PostgreSQL: the server's current snapshot (`pg_current_snapshot()`: the oldest
          running transaction, the next one and those in progress): a writing transaction
          that committed since the last call has either left the in-progress list or moved the
          next id on. It covers the whole server, so another database's writes count too
          (a needless re-read, never a missed one)."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            if self._probe is None:
                self._probe = self.engine.raw_connection()
            cursor = self._probe.cursor()
            try:
                cursor.execute("PRAGMA data_version")
                return ("sqlite", cursor.fetchone()[0])
            finally:
                cursor.close()
        if dialect == "postgresql":
            with self.engine.connect() as connection:
                snapshot = connection.exec_driver_sql("SELECT pg_current_snapshot()::text").scalar()
            return ("postgresql", snapshot)
        return None

    def dispose(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close()
        self.engine.dispose()


def _upgrade(url: str) -> None:
    from exchange.db import migrate

    migrate.upgrade(url, "node")


def open_store(url: str, *, upgrade: bool = True) -> NodeStore:
    """Open (and by default migrate) the node database at `url`.

    The migration runs in a forked child (`exchange.node.isolated`), so the process that opens
    the store (the daemon, for its whole life) never imports Alembic and its templates (issue
    "Scale", memory per hospital, docs/benchmarks/scale.md); a failed migration raises here as
    before. Only from a single-threaded process: a fork from a threaded one may hang."""
    if upgrade:
        if "alembic" in sys.modules or threading.active_count() > 1:
            # Nothing to keep out (Alembic is loaded already), or a fork is not safe: another
            # thread may hold a lock (SQLite's own mutex among them) that the child would wait
            # on for ever (the CLI run in-process by a threaded test or tool).
            _upgrade(url)
        else:
            from exchange.node.isolated import run_isolated

            run_isolated(_upgrade, url)
    engine = make_engine(url)
    return NodeStore(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
