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
