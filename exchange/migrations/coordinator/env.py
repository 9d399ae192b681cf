"""Alembic environment for the coordinator database (batch mode: every migration runs on SQLite too).

`target_metadata` is both the coordinator's tables and the audit log's, so that
`alembic revision --autogenerate` (and compare_metadata) sees the whole database."""

from __future__ import annotations

from alembic import context

from audit.store import AUDIT_METADATA
from exchange.coordinator import models  # noqa: F401  (registers the registry's tables)
from exchange.db.base import CoordinatorBase
from exchange.db.engine import make_engine
from exchange.db.migrate import migration_lock
from exchange.study import models as study_models  # noqa: F401  (registers the study tables)

config = context.config
target_metadata = [CoordinatorBase.metadata, AUDIT_METADATA]


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url)
    with engine.connect() as connection, migration_lock(connection, "coordinator"):
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A batch migration rebuilds a table (copy, drop, rename); with foreign keys on, the
            # drop of a table other rows refer to fails. Alembic's documented SQLite recipe:
            # off for the migration (outside any transaction), then check every reference.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(connection=connection, render_as_batch=True,
                          compare_type=True, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            connection.commit()
            if broken:
                raise RuntimeError(f"the migration left rows referring to missing rows: {broken[:5]}")
    engine.dispose()


run_migrations()
