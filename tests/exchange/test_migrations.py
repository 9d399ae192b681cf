"""The coordinator migrations: up and down on SQLite and PostgreSQL, and the ORM models say
exactly what the migrations create (so no schema change hides outside Alembic)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from exchange.coordinator import models  # noqa: F401  (registers the tables)
from exchange.db.base import CoordinatorBase
from exchange.db.engine import make_engine
from exchange.db.migrate import downgrade, upgrade

TABLES = {"organisations", "researchers", "api_keys", "hospitals", "studies", "study_decisions",
          "study_rounds", "receipts", "request_nonces"}


def test_upgrade_downgrade_and_models_match(db_url: str) -> None:
    upgrade(db_url, "coordinator")
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diffs = [d for d in compare_metadata(context, CoordinatorBase.metadata)
                     if _table_of(d) in TABLES]
        assert diffs == []
        downgrade(db_url, "coordinator", "0001_audit_log")
        remaining = set(inspect(engine).get_table_names())
        assert not TABLES & remaining and "audit_entries" in remaining
        upgrade(db_url, "coordinator")
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def _table_of(diff: object) -> str | None:
    item = diff[0] if isinstance(diff, list) else diff
    for part in item if isinstance(item, tuple) else ():
        table = getattr(part, "table", None)
        if table is not None and hasattr(table, "name"):
            return str(table.name)
        if hasattr(part, "name") and hasattr(part, "columns"):
            return str(part.name)
        if isinstance(part, str) and part in TABLES:
            return part
    return None


def test_downgrade_below_0003_refills_balances_from_the_log(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """0003 drops the balance table (balances are the Ledger fold); going back to 0002 must
    give a 0002 coordinator the balances the log says, not an empty table."""
    from sqlalchemy import text

    from exchange.coordinator.app import AppConfig, build_runtime
    from exchange.coordinator.runner import ScriptedRunner

    runtime = build_runtime(AppConfig(database_url=db_url, operator_key_file=tmp_path / "op.key",
                                      log_key_file=tmp_path / "log.key",
                                      coordinator_key_file=tmp_path / "co.key", access_log=False),
                            ScriptedRunner(hospital_keys={}))
    try:
        runtime.coordinator.mint("org:acme", 500)
        runtime.coordinator.mint("org:globex", 70)
        runtime.coordinator.mint("org:acme", 1)
    finally:
        runtime.close()
    downgrade(db_url, "coordinator", "0002_coordinator")
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT account, balance FROM ledger_balances "
                                           "ORDER BY account")).all()
        assert [tuple(r) for r in rows] == [("org:acme", 501), ("org:globex", 70)]
        upgrade(db_url, "coordinator")
        assert "ledger_balances" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
