"""The log's trust anchors in its database (audit_log_meta): written once, refused if different,
protected by the same kind of triggers as the other audit tables."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from audit.store import (
    TrustMismatchError,
    audit_log_meta,
    create_schema,
    read_stored_trust,
    record_trust,
)
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade
from tests.audit.store_support import LogKeys


def meta_engine(url: str) -> Engine:
    """The audit tables at the revision that adds audit_log_meta (0004; 0002/0003 come with it)."""
    upgrade(url, "coordinator", "0004_audit_log_meta")
    return make_engine(url)


def _rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(select(audit_log_meta))]


def test_written_once_and_a_different_trust_is_refused(db_url: str) -> None:
    engine = meta_engine(db_url)
    try:
        keys = LogKeys.generate()
        assert read_stored_trust(db_url) is None
        assert record_trust(engine, keys.trust()) == keys.trust()
        assert record_trust(engine, keys.trust()) == keys.trust()  # same again: fine
        assert read_stored_trust(db_url) == keys.trust()
        before = _rows(engine)
        other = LogKeys.generate().trust()
        with pytest.raises(TrustMismatchError, match=r"^operator_public_key, log_public_key: differ"):
            record_trust(engine, other)
        with pytest.raises(TrustMismatchError, match=r"^origin: differ"):
            record_trust(engine, dataclasses.replace(keys.trust(), origin="elsewhere.example/log"))
        assert _rows(engine) == before
    finally:
        engine.dispose()


def _refused(engine: Engine, statement: str) -> str:
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        connection.exec_driver_sql(statement)
    return str(info.value.orig)


def test_triggers_keep_the_anchors(db_url: str) -> None:
    engine = meta_engine(db_url)
    try:
        record_trust(engine, LogKeys.generate().trust())
        before = _rows(engine)
        postgres = engine.dialect.name == "postgresql"
        statements = ["UPDATE audit_log_meta SET origin = 'forged.example/log'",
                      "DELETE FROM audit_log_meta"]
        if postgres:
            statements += ["TRUNCATE audit_log_meta", "DELETE FROM audit_log_meta WHERE false",
                           "INSERT INTO audit_log_meta VALUES (1, 'x', '\\x00', '\\x00', now()) "
                           "ON CONFLICT (id) DO UPDATE SET origin = EXCLUDED.origin"]
        else:
            statements += ["INSERT OR REPLACE INTO audit_log_meta VALUES (1, 'x', x'00', x'00', "
                           "'2026-01-01')"]
        for statement in statements:
            assert "append-only" in _refused(engine, statement), statement
        # A second row: the CHECK (id = 1) and the primary key (PostgreSQL), the trigger (SQLite).
        _refused(engine, "INSERT INTO audit_log_meta VALUES (2, 'x', x'00', x'00', '2026-01-01')"
                 if not postgres else
                 "INSERT INTO audit_log_meta VALUES (2, 'x', '\\x00', '\\x00', now())")
        assert _rows(engine) == before
    finally:
        engine.dispose()


def test_create_schema_makes_the_table_and_its_triggers(tmp_path: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/direct.db")
    try:
        create_schema(engine)
        record_trust(engine, LogKeys.generate().trust())
        assert "append-only" in _refused(engine, "DELETE FROM audit_log_meta")
    finally:
        engine.dispose()
