"""The audit tables: the migration, the append-only triggers, and PostgreSQL role privileges."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from audit.store import (
    APPEND_ONLY_TABLES,
    AUDIT_METADATA,
    audit_checkpoints,
    audit_entries,
    audit_tree_nodes,
    create_schema,
    postgresql_grant_ddl,
)
from exchange.db.engine import make_engine
from exchange.db.migrate import downgrade, upgrade
from tests.audit.store_support import LogKeys, note_entry, register, stored_leaves

AUDIT_HEAD = "0004_audit_log_meta"  # the last revision that changes audit tables


def _filled(url: str, keys: LogKeys) -> Engine:
    upgrade(url, "coordinator", AUDIT_HEAD)
    engine = make_engine(url)
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        log.append_many([note_entry(keys.writer, "s", seq) for seq in range(6)])
        log.checkpoint()
    return engine


def _contents(engine: Engine) -> list[list[tuple[object, ...]]]:
    with engine.connect() as connection:
        return [[tuple(row) for row in connection.execute(select(table).order_by(*table.primary_key))]
                for table in (audit_entries, audit_tree_nodes, audit_checkpoints)]


def test_migration_to_head_creates_the_audit_log(db_url: str) -> None:
    upgrade(db_url, "coordinator")
    engine = make_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
        assert set(APPEND_ONLY_TABLES) <= names
        keys = LogKeys.generate()
        with keys.open(engine) as log:
            assert log.append(register(keys.operator, keys.writer)) == 0
    finally:
        engine.dispose()


def test_migration_matches_the_store_metadata(db_url: str) -> None:
    upgrade(db_url, "coordinator", AUDIT_HEAD)
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            # Only the audit tables: the coordinator's (0002, 0003) are compared in tests/exchange.
            diffs = [d for d in compare_metadata(context, AUDIT_METADATA)
                     if "alembic_version" not in repr(d) and "'audit_" in repr(d)]
        assert diffs == []
        assert set(AUDIT_METADATA.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_downgrade_refuses_to_drop_a_nonempty_log(db_url: str) -> None:
    upgrade(db_url, "coordinator", "0001_audit_log")
    downgrade(db_url, "coordinator", "base")  # empty: allowed
    engine = _filled(db_url, LogKeys.generate())
    before = _contents(engine)
    with pytest.raises(RuntimeError, match="refusing to drop"):
        downgrade(db_url, "coordinator", "base")
    assert _contents(engine) == before
    engine.dispose()


def _refused(engine: Engine, statement: str) -> str:
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        connection.exec_driver_sql(statement)
    return str(info.value.orig)


def test_triggers_refuse_changes(db_url: str) -> None:
    engine = _filled(db_url, LogKeys.generate())
    before = _contents(engine)
    postgres = engine.dialect.name == "postgresql"
    attempts = {
        "audit_entries": ["UPDATE audit_entries SET kind = 'forged' WHERE idx = 3",
                          "DELETE FROM audit_entries WHERE idx = 6",
                          "DELETE FROM audit_entries"],
        "audit_tree_nodes": ["UPDATE audit_tree_nodes SET hash = hash WHERE level = 0",
                             "DELETE FROM audit_tree_nodes WHERE level = 1"],
        "audit_checkpoints": ["UPDATE audit_checkpoints SET note = 'x'",
                              "DELETE FROM audit_checkpoints"],
    }
    for table, statements in attempts.items():
        if postgres:
            # Statement-level triggers: refused even when no row matches; TRUNCATE too.
            statements += [f"TRUNCATE {table}", f"DELETE FROM {table} WHERE false"]
        for statement in statements:
            message = _refused(engine, statement)
            assert "append-only" in message, (statement, message)
    if postgres:
        # An upsert is an UPDATE too.
        message = _refused(engine, "INSERT INTO audit_tree_nodes (level, idx, hash) "
                                   "VALUES (0, 0, '\\x00') ON CONFLICT (level, idx) "
                                   "DO UPDATE SET hash = EXCLUDED.hash")
        assert "append-only" in message
    else:
        # INSERT OR REPLACE would delete the old row without a DELETE trigger firing.
        for statement in ["INSERT OR REPLACE INTO audit_entries (idx, leaf, leaf_hash, kind, "
                          "key_id, time) SELECT idx, leaf, leaf_hash, 'forged', key_id, time "
                          "FROM audit_entries WHERE idx = 2",
                          "INSERT OR REPLACE INTO audit_tree_nodes (level, idx, hash) "
                          "VALUES (0, 0, zeroblob(32))",
                          "INSERT OR REPLACE INTO audit_checkpoints (size, root_hash, note, "
                          "created_at) VALUES (7, zeroblob(32), 'x', '2026-01-01')"]:
            message = _refused(engine, statement)
            assert "append-only" in message or "next index" in message or "grow" in message
    # No gaps: an entry can only be written at the next index.
    message = _refused(engine, "INSERT INTO audit_entries (idx, leaf, leaf_hash, kind, key_id, "
                               "time) SELECT 9, leaf, leaf_hash, kind, key_id, time "
                               "FROM audit_entries WHERE idx = 2")
    assert "next index" in message
    assert _contents(engine) == before
    engine.dispose()


def test_create_schema_installs_the_same_triggers(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'direct.db'}")
    create_schema(engine)
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
    assert "append-only" in _refused(engine, "DELETE FROM audit_entries")
    assert len(stored_leaves(engine)) == 1
    engine.dispose()


@pytest.mark.postgres
def test_postgres_application_role_can_only_read_and_append(postgres_url: str) -> None:
    """The role the coordinator runs as: SELECT and INSERT only, not owner, not superuser."""
    keys = LogKeys.generate()
    engine = _filled(postgres_url, keys)
    role = f"audit_app_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        for statement in postgresql_grant_ddl(role):
            connection.exec_driver_sql(statement)
    app_engine = make_engine(make_url(postgres_url).set(username=role)
                             .render_as_string(hide_password=False))
    before = _contents(engine)
    try:
        refused = {
            "UPDATE audit_entries SET kind = 'x'": "permission denied",
            "DELETE FROM audit_entries": "permission denied",
            "TRUNCATE audit_entries": "permission denied",
            "ALTER TABLE audit_entries DISABLE TRIGGER ALL": "must be owner",
            "DROP TABLE audit_tree_nodes": "must be owner",
            "SET session_replication_role = replica": "permission denied",
        }
        for statement, reason in refused.items():
            with pytest.raises(DBAPIError, match=reason), app_engine.begin() as connection:
                connection.exec_driver_sql(statement)
        assert _contents(engine) == before
        # What the role may do is all the store needs: read, lock, append, checkpoint.
        with keys.open(app_engine) as log:
            assert log.append(note_entry(keys.writer, "s", 100)) == 7
            log.checkpoint()
            assert log.size() == 8
        after = _contents(engine)
        for rows, old in zip(after, before, strict=True):
            assert set(old) < set(rows)  # only additions
    finally:
        app_engine.dispose()
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP OWNED BY {role}")
            connection.exec_driver_sql(f"DROP ROLE {role}")
        engine.dispose()
