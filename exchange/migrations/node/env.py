"""Alembic environment for the node database (batch mode: every migration runs on SQLite too)."""

from __future__ import annotations

from alembic import context

from exchange.db.engine import make_engine
from exchange.db.migrate import migration_lock

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url)
    with engine.connect() as connection, migration_lock(connection, "node"):
        context.configure(connection=connection, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
