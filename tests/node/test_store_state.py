"""The daemon's key/value state: one statement per write, so two writers never collide on a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event

from exchange.node.store import open_store


def test_state_is_inserted_then_replaced(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'node.db'}")
    assert store.get_state("site_export", "none") == "none"
    store.set_state("site_export", [1, 0, 8, "labels-per-study", 0.2])
    assert store.get_state("site_export") == [1, 0, 8, "labels-per-study", 0.2]
    store.set_state("site_export", {"changed": True})
    assert store.get_state("site_export") == {"changed": True}


def test_a_key_another_writer_inserts_first_is_replaced_not_refused(tmp_path: Path) -> None:
    """The daemon and a steward's import both record the site export: the other writer's row
    lands just before this writer's statement runs (it used to fail: UNIQUE constraint)."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    daemon, steward = open_store(url), open_store(url)
    raced: list[bool] = []

    def the_other_writer_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT") and not raced:
            raced.append(True)
            daemon.set_state("site_export", "the daemon's")

    event.listen(steward.engine, "before_cursor_execute", the_other_writer_first)
    steward.set_state("site_export", "the steward's")
    assert raced
    assert daemon.get_state("site_export") == "the steward's"


def test_the_change_token_moves_with_every_commit_and_only_then(db_url: str) -> None:
    """`NodeStore.change_token` is what lets a settled daemon step skip its reads: it must move
    with every committed write, this process's other sessions and another store's (a steward's
    command, the Flower process) alike; a read or a rolled-back write must not move it on
    SQLite (on PostgreSQL the token covers the whole server, which other tests share)."""
    import pytest

    from exchange.node.models import DaemonState

    store, other = open_store(db_url), open_store(db_url)
    try:
        first = store.change_token()
        assert first is not None
        store.set_state("a", 1)  # the daemon's own session
        second = store.change_token()
        assert second != first
        other.set_state("b", 2)  # another connection, as another process's
        third = store.change_token()
        assert third != second
        if store.engine.dialect.name == "sqlite":
            assert store.get_state("a") == 1 and store.change_token() == third  # a read
            with pytest.raises(RuntimeError), other.transaction() as session:
                session.add(DaemonState(key="c", value=3))
                session.flush()
                raise RuntimeError("rolled back")
            assert store.change_token() == third
            assert other.get_state("c") is None
    finally:
        store.dispose()
        other.dispose()
