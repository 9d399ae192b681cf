"""Runs Alembic programmatically: migrations are the only way a schema changes.

Two migration trees: `coordinator` (the operator's database, including the audit log) and
`node` (each hospital's own database).

Every upgrade or downgrade holds a lock for its whole run (`migration_lock`): `exchange serve`
and `exchange admin` (or two replicas) started together on an empty database would otherwise
both see no schema and both create it, and one would fail half-way. PostgreSQL: a session-level
advisory lock (`pg_advisory_lock`) on the migration connection; SQLite: an exclusive `flock` on
a file beside the database. The second process waits, then finds the schema at head.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from exchange.db.engine import normalize_url

Tree = Literal["coordinator", "node"]
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str, tree: Tree = "coordinator") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR / tree))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    config.attributes["tree"] = tree
    return config


def upgrade(url: str, tree: Tree = "coordinator", revision: str = "head") -> None:
    command.upgrade(alembic_config(url, tree), revision)


def downgrade(url: str, tree: Tree = "coordinator", revision: str = "base") -> None:
    command.downgrade(alembic_config(url, tree), revision)


def lock_key(tree: str) -> int:
    """The advisory lock id of a migration tree: a stable signed 64-bit number."""
    digest = hashlib.sha256(f"health-exchange migrations: {tree}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def migration_lock(connection: Connection, tree: str) -> Iterator[None]:
    """Hold the migration lock of `tree` on this database while the block runs (see above)."""
    if connection.dialect.name == "postgresql":
        key = lock_key(tree)
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        connection.commit()  # the lock is the session's; migrations run in their own transaction
        try:
            yield
        finally:
            if connection.in_transaction():
                connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
        return
    database = make_url(str(connection.engine.url)).database
    if connection.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
