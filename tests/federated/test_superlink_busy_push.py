"""A SuperNode's object push that finds the SuperLink's SQLite database locked past its busy
timeout (flwr's real SQL state): flwr 1.42 logs it and answers "not stored", the SuperNode takes
that as done and the reply's object is lost, so the round drops the hospital (25 hospitals,
docs/benchmarks/scale.md). Patched (`flwr_internals.patch_superlink_store_object_busy`), the
busy error leaves `store_object` as the OperationalError it is, which the Fleet API answers 503
for its client to retry; a push that is not pending keeps flwr's answer."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from federated.runtime import flwr_internals
from federated.runtime.settings import disable_phone_home


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Path]]:
    """flwr's SuperLink state on a SQLite file, with a 0.2 s busy timeout instead of 5 s."""
    disable_phone_home()
    import flwr.supercore.sql_mixin as sql_mixin
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    monkeypatch.setattr(SqlCoreState, "store_object", SqlCoreState.store_object)
    monkeypatch.setattr(SqlCoreState, "session", SqlCoreState.session)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", tuple(
        (name, "200" if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS))
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    import flwr.superlink.main as superlink_main

    app = superlink_main.create_app()
    yield app.state.linkstate_factory.state(), tmp_path / "superlink.db"


def _locked(db: Path) -> sqlite3.Connection:
    """Another writer holding SQLite's write lock."""
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    return raw


def test_flower_alone_answers_a_locked_database_as_not_stored(state: tuple[Any, Path]) -> None:
    link, db = state
    raw = _locked(db)
    try:
        assert link.store_object(1, "session", "object", b"content") is False  # lost, silently
    finally:
        raw.rollback()
        raw.close()


def test_patched_a_locked_database_is_an_error_the_sender_retries(state: tuple[Any, Path]) -> None:
    link, db = state
    flwr_internals.patch_superlink_store_object_busy()
    flwr_internals.patch_superlink_store_object_busy()  # idempotent
    raw = _locked(db)
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            link.store_object(1, "session", "object", b"content")
    finally:
        raw.rollback()
        raw.close()
    # the lock gone, flwr's own answers stand: an object no push session waits for is not stored
    assert link.store_object(1, "session", "object", b"content") is False
    # and other writes on a locked database fail as flwr makes them fail (not the carrier)
    raw = _locked(db)
    try:
        with pytest.raises(OperationalError, match="database is locked"), link.session() as session:
            from sqlalchemy import text

            session.execute(text("DELETE FROM object_push_sessions"))
    finally:
        raw.rollback()
        raw.close()
