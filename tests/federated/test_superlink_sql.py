"""Fewer SQL transactions at the SuperLink (`federated.runtime.superlink_sql`), on flwr's real
SuperLink app and SQLite LinkState: a SuperNode's heartbeat no longer ends the node-key cache
(every other node-table write still does), and the sweep of lapsed task claims writes only when a
read finds one, with flwr's own results when it does."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals, superlink_sql
from tests.federated.test_superlink_status_traffic import Link, _heartbeat
from tests.federated.test_superlink_status_traffic import link as status_traffic_link  # noqa: F401 (fixture `link`)


@pytest.fixture
def link(status_traffic_link: Link) -> Link:  # noqa: F811 (the imported fixture, by name)
    """test_superlink_status_traffic's SuperLink (its caches patched, one active node)."""
    return status_traffic_link


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement this process runs inside the block."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


@pytest.fixture
def heartbeat_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    monkeypatch.setattr(SqlLinkState, "acknowledge_node_heartbeat", SqlLinkState.acknowledge_node_heartbeat)
    superlink_sql.patch_superlink_heartbeat_keeps_node_keys()
    superlink_sql.patch_superlink_heartbeat_keeps_node_keys()  # idempotent


def _node_row(db: Path, node_id: int) -> tuple[Any, ...]:
    with sqlite3.connect(db) as raw:
        return tuple(raw.execute("SELECT status, heartbeat_interval, online_until > 0 FROM node "
                                 "WHERE node_id = ?", (flwr_internals_sint64(node_id),)).fetchone())


def flwr_internals_sint64(value: int) -> int:
    from flwr.supercore.utils import uint64_to_int64

    return int(uint64_to_int64(value))


def test_a_heartbeat_leaves_the_node_key_cache_as_it_was(link: Link, heartbeat_patch: None) -> None:
    """flwr: each heartbeat (a node-table UPDATE) ended every cached key, so the next Fleet request
    of every node read its key again (98 look-ups in a ten-hospital round); now a hit."""
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    link.nodes.hits = link.nodes.misses = 0
    for _ in range(3):
        assert _heartbeat(link) == 200  # each: Flower's node check (a look-up), then the UPDATE
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    assert (link.nodes.hits, link.nodes.misses) == (4, 0)
    assert _node_row(link.db, link.node_id) == ("online", 30.0, 1)  # the heartbeat still wrote


def test_every_other_node_table_write_still_ends_the_cache(link: Link, heartbeat_patch: None) -> None:
    assert _heartbeat(link) == 200
    link.nodes.hits = link.nodes.misses = 0
    assert link.state.deactivate_node(link.node_id)  # a node-table write of another kind
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    assert link.nodes.misses == 1
    assert _heartbeat(link) == 200  # a heartbeat brings the deactivated node back online, as flwr's
    assert _node_row(link.db, link.node_id)[0] == "online"
    link.state.delete_node("noop", link.node_id)
    assert _heartbeat(link) == 401  # refused by the very next request
    assert link.state.get_node_id_by_public_key(link.public_key) is None


def test_a_heartbeat_inside_another_write_does_not_hide_that_write(link: Link, heartbeat_patch: None) -> None:
    """Only the heartbeat's own UPDATE is left out: a node-table write of the same transaction
    before it still ends the cache (when it runs and when the transaction commits)."""
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    with link.state.session():
        assert link.state.deactivate_node(link.node_id)
        assert link.state.acknowledge_node_heartbeat(link.node_id, 30)
    link.nodes.hits = link.nodes.misses = 0
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    assert link.nodes.misses == 1


@pytest.fixture
def sweep(monkeypatch: pytest.MonkeyPatch) -> Any:
    """flwr's own sweep (returned), with `patch_superlink_task_sweep_reads_first` applied."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    original = SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", original)
    superlink_sql.patch_superlink_task_sweep_reads_first()
    superlink_sql.patch_superlink_task_sweep_reads_first()  # idempotent
    return original


def test_the_sweep_writes_nothing_while_every_claim_is_alive(link: Link, sweep: Any) -> None:
    """flwr: two UPDATEs (each taking SQLite's write lock) on every sweep; now one read."""
    link.new_run()
    with statements() as seen:
        link.state._cleanup_expired_task_tokens()
    assert len(seen) == 1 and seen[0].startswith("SELECT task.task_id FROM task"), seen
    with statements() as seen:
        sweep(link.state)  # flwr's
    assert [s.split()[0] for s in seen] == ["UPDATE", "UPDATE"]


def _lapse_all_claims(db: Path) -> None:
    with sqlite3.connect(db) as raw:  # behind SQLAlchemy's back, as a lapse in time would
        raw.execute("UPDATE task SET active_until = '2000-01-01 00:00:00+00:00' WHERE token IS NOT NULL")


def _tasks(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as raw:
        return raw.execute("SELECT task_id, token, active_until, starting_at, finished_at, sub_status, "
                           "details FROM task ORDER BY task_id").fetchall()


def test_a_lapsed_claim_is_swept_as_flower_sweeps_it(link: Link, sweep: Any, tmp_path: Path) -> None:
    """A claim that never started goes back to pending, a running one fails: the same rows as
    flwr's sweep writes on a copy of the same database."""
    link.new_run()  # running
    _, starting = link.new_run(running=False)
    assert link.state.claim_task(starting)  # claimed, never started
    _lapse_all_claims(link.db)
    copy = tmp_path / "copy.db"
    with sqlite3.connect(link.db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    other = type(link.state)(str(copy), link.state.federation_manager, link.state.object_store)
    other.initialize()
    with statements() as seen:
        link.state._cleanup_expired_task_tokens()
    assert [s.split()[0] for s in seen][:3] == ["SELECT", "UPDATE", "UPDATE"]  # then flwr's follow-up
    sweep(other)  # flwr's, on the copy
    swept = _tasks(link.db)
    assert swept == _tasks(copy)
    assert sum(1 for row in swept if row[6] == "No heartbeat received from the task") == 1
    assert all(row[1] is None for row in swept)  # no token left


def test_the_read_first_sweep_must_come_before_the_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    flwr_sweep = SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", flwr_sweep)
    flwr_internals.patch_superlink_task_sweep(0.5)
    with pytest.raises(flwr_internals.FlowerLayoutError, match="before the task-sweep throttle"):
        superlink_sql.patch_superlink_task_sweep_reads_first()


def test_the_throttle_wraps_the_read_first_sweep(link: Link, sweep: Any) -> None:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    flwr_internals.patch_superlink_task_sweep(30.0)
    throttled: Any = SqlCoreState._cleanup_expired_task_tokens
    assert throttled.__wrapped__.__wrapped__ is sweep  # throttle -> read first -> flwr's
    link.new_run()
    with statements() as seen:
        for _ in range(3):
            link.state._cleanup_expired_task_tokens()
    assert len(seen) <= 1  # at most one read, then throttled
    superlink_sql.patch_superlink_task_sweep_reads_first()  # still idempotent through the throttle
    assert SqlCoreState._cleanup_expired_task_tokens is throttled


@pytest.fixture
def runtimes(monkeypatch: pytest.MonkeyPatch) -> superlink_sql.RuntimeBatcher:
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    for name in ("add_clientapp_runtime", "get_run_info"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))
    monkeypatch.setattr(superlink_sql, "_runtime_batchers", [])
    batcher = superlink_sql.patch_superlink_runtime_batching(interval_s=30.0)
    assert superlink_sql.patch_superlink_runtime_batching(interval_s=30.0) is batcher  # idempotent
    return batcher


def test_clientapp_runtimes_are_summed_in_memory_and_exact_when_read(
        link: Link, runtimes: superlink_sql.RuntimeBatcher) -> None:
    """flwr: an UPDATE transaction per reply pushed; now none until the total is read, then one,
    and the run shows the same total as flwr's would."""
    run_id, _ = link.new_run()
    other, _ = link.new_run()
    with statements() as seen:
        for runtime in (0.25, 1.5, 0.125):
            link.state.add_clientapp_runtime(run_id, runtime)
        link.state.add_clientapp_runtime(other, 2.0)
    assert seen == []
    with statements() as seen:
        runs = {run.run_id: run for run in link.state.get_run_info(run_ids=[run_id, other])}
    assert sum(1 for s in seen if "clientapp_runtime=" in s) == 2  # one write per run
    assert runs[run_id].clientapp_runtime == pytest.approx(1.875)
    assert runs[other].clientapp_runtime == pytest.approx(2.0)
    assert link.state.get_run_info(run_ids=[run_id])[0].clientapp_runtime == pytest.approx(1.875)


def test_clientapp_runtimes_are_written_once_per_interval(
        link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    for name in ("add_clientapp_runtime", "get_run_info"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))
    monkeypatch.setattr(superlink_sql, "_runtime_batchers", [])
    batcher = superlink_sql.patch_superlink_runtime_batching(interval_s=1.0)
    run_id, _ = link.new_run()
    batcher.flush()  # nothing pending: the interval starts now
    link.state.add_clientapp_runtime(run_id, 1.0)
    assert batcher.writes == 0
    time.sleep(1.1)
    link.state.add_clientapp_runtime(run_id, 1.0)  # due: both written, in one UPDATE
    assert batcher.writes == 1
    with sqlite3.connect(link.db) as raw:
        assert raw.execute("SELECT clientapp_runtime FROM run WHERE run_id = ?",
                           (flwr_internals_sint64(run_id),)).fetchone()[0] == pytest.approx(2.0)


def test_a_bad_runtime_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        superlink_sql.RuntimeBatcher(0.0, lambda *_args: None)
