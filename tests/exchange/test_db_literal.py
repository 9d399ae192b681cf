"""exchange.db.literal: an INSERT as one SQL string whose values are hex only.

The same rows inserted through SQLAlchemy (bound parameters) and as the literal string read
back equal, whatever the text holds (quotes, backslashes, SQL, dollar quotes, non-ASCII), and
nothing but hex digits of the values appears in the string.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from exchange.db import migrate
from exchange.db.engine import make_engine
from exchange.db.literal import insert_rows_sql
from exchange.study.models import Study

HOSTILE = "O'Brien \\ \"x\" $$ $q$ '); DROP TABLE studies; -- ünïcode \u2028 end"


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    migrate.upgrade(postgres_url, "coordinator")
    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO organisations (id, name, region, created_at) "
                                "VALUES ('acme', 'Acme', 'DE', now())"))
    yield engine
    engine.dispose()


def _row(study_id: str, title: str, **changes: Any) -> dict[str, Any]:
    when = datetime(2026, 12, 5, 17, 0, 0, 123456, tzinfo=UTC)
    row = {"id": study_id, "organisation_id": "acme", "researcher_id": None, "title": title,
           "status": "submitted", "spec": {"title": title, "epsilon": 3.0, "delta": 1e-5,
                                           "columns": {"labs": ["a", "b"]}, "none": None},
           "token_budget": 2**40, "min_hospitals": 2, "rounds_planned": 3,
           "submitted_at": when, "start_deadline": when.astimezone(timezone_plus_two()),
           "submit_entry_index": 12}
    row.update(changes)
    return row


def timezone_plus_two() -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=2))


def _read(engine: Engine, study_id: str) -> dict[str, Any]:
    with engine.connect() as connection:
        study = connection.execute(select(Study.__table__).where(Study.id == study_id)).one()
    return {key: value for key, value in study._mapping.items() if key != "id"}


@pytest.mark.postgres
def test_a_literal_insert_stores_what_a_bound_one_stores(engine: Engine) -> None:
    dialect = engine.dialect
    with engine.begin() as connection:
        connection.execute(insert(Study), _row("st-bound", HOSTILE))
        sql = insert_rows_sql(Study.__table__, [_row("st-literal", HOSTILE),
                                                _row("st-literal-2", "plain")], dialect)
        connection.exec_driver_sql(sql)
    assert "O'Brien" not in sql and "DROP" not in sql and "$$" not in sql
    assert _read(engine, "st-literal") == _read(engine, "st-bound")
    assert _read(engine, "st-literal")["title"] == HOSTILE
    assert _read(engine, "st-literal-2")["title"] == "plain"


def test_values_it_cannot_write_are_refused_naming_the_column() -> None:
    dialect = postgresql.dialect()
    with pytest.raises(ValueError, match=r"studies\.submitted_at: naive datetime"):
        insert_rows_sql(Study.__table__, [_row("s", "t", submitted_at=datetime(2026, 1, 1))],
                        dialect)
    with pytest.raises(ValueError, match=r"studies\.title: no literal for a bytes value"):
        insert_rows_sql(Study.__table__, [_row("s", b"raw")], dialect)
    with pytest.raises(ValueError, match=r"studies\.token_budget: no literal for a float value"):
        insert_rows_sql(Study.__table__, [_row("s", "t", token_budget=1.5)], dialect)
    with pytest.raises(ValueError, match="rows: every row must have the same columns"):
        insert_rows_sql(Study.__table__, [_row("s", "t"), {"id": "x"}], dialect)
    with pytest.raises(ValueError, match="rows: nothing to insert"):
        insert_rows_sql(Study.__table__, [], dialect)
    with pytest.raises(ValueError, match="dialect: 'sqlite'"):
        insert_rows_sql(Study.__table__, [_row("s", "t")], sqlite.dialect())
