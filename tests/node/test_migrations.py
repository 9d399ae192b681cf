"""The node migrations: up and down on SQLite and PostgreSQL, and the ORM models say exactly
what migration 0002 creates (no schema change hides outside Alembic)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from exchange.db.base import NodeBase
from exchange.db.engine import make_engine
from exchange.db.migrate import downgrade, upgrade
from exchange.node import models  # noqa: F401  (registers the tables)

TABLES = {"import_batches", "records", "column_categories", "consent_contracts", "studies", "decisions",
          "rounds", "errors", "daemon_state"}


def _tables_of(diff: Any) -> set[str]:
    """Table names a compare_metadata diff touches (it nests tuples and lists)."""
    found: set[str] = set()
    stack = [diff]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(item)
            continue
        table = getattr(item, "table", None)
        if table is not None and hasattr(table, "name"):
            found.add(str(table.name))
        elif hasattr(item, "columns") and hasattr(item, "name"):
            found.add(str(item.name))
        elif isinstance(item, str) and item in TABLES:
            found.add(item)
    return found


def test_node_schema_matches_the_models_and_downgrades(db_url: str) -> None:
    upgrade(db_url, "node")
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES | {"privacy_charges"}
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diffs = [d for d in compare_metadata(context, NodeBase.metadata) if _tables_of(d) & TABLES]
        assert diffs == []
        downgrade(db_url, "node", "0001_privacy_ledger")
        remaining = set(inspect(engine).get_table_names())
        assert not TABLES & remaining and "privacy_charges" in remaining
        upgrade(db_url, "node")
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()
