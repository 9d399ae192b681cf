"""Reading a log by URL, for the auditor's CLI (`audit export --db URL`): its entries, its
latest checkpoint and its trust anchors, on an engine that writes nothing."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, inspect, select
from sqlalchemy.engine import make_url

from audit.entry import Entry
from audit.export import Trust
from audit.store.entries import entry_from_leaf, iter_leaves, log_size
from audit.store.schema import META_TABLE, audit_checkpoints, check_schema
from audit.store.trust import stored_trust

SQLITE_BUSY_TIMEOUT_S = 30.0


def normalize_url(url: str) -> str:
    """Map plain PostgreSQL URLs to the psycopg 3 driver (as exchange.db.engine does)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_audit_engine(url: str) -> Engine:
    """An engine for reading or exporting a log by URL (`audit export --db URL`).

    Reading only: no PRAGMA that writes (the journal mode is whatever the coordinator set),
    so a read-only copy of a SQLite file can be exported too.
    """
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                                "check_same_thread": False})
    return create_engine(url, pool_pre_ping=True)


def read_entries(url: str, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
    """Every entry of the log at `url` in log order, from `start` to `stop` (default: all).

    The size is read first, so entries appended while exporting are not included; the log is
    append-only, so what is read is a consistent prefix.
    """
    engine = make_audit_engine(url)
    try:
        check_schema(engine)
        with engine.connect() as connection:
            end = log_size(connection) if stop is None else stop
            for _index, leaf in iter_leaves(connection, start, end):
                yield entry_from_leaf(leaf)
    finally:
        engine.dispose()


def read_latest_checkpoint(url: str) -> str | None:
    """The latest checkpoint note the log at `url` signed, or None if it never signed one.

    An export should hold the entries [0, size) of this checkpoint, so that it verifies.
    """
    engine = make_audit_engine(url)
    try:
        check_schema(engine)
        with engine.connect() as connection:
            c = audit_checkpoints.c
            note = connection.execute(
                select(c.note).order_by(c.size.desc()).limit(1)).scalar_one_or_none()
            return None if note is None else str(note)
    finally:
        engine.dispose()


def read_stored_trust(url: str) -> Trust | None:
    """The trust anchors recorded in the database at `url`, or None if it holds none (a log
    from before migration 0004 that no coordinator has opened since)."""
    engine = make_audit_engine(url)
    try:
        check_schema(engine)
        if META_TABLE not in set(inspect(engine).get_table_names()):
            return None
        with engine.connect() as connection:
            return stored_trust(connection)
    finally:
        engine.dispose()
