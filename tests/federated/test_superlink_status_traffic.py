"""Two more SuperLink CPU patches on flwr's real SuperLink app and SQLite LinkState: a run's status
served from a cache that every write which may change it ends (`flwr_internals.
patch_superlink_run_status_cache`), and the per-run traffic counters summed in memory
(`patch_superlink_traffic_batching`). What must not change: a stop, a finish or a lapsed claim is
seen by the very next request (through flwr's own `check_abort` and its Fleet handler), a status
read in a transaction that rolls back is not kept, and the counters a reader sees are exact."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals
from federated.runtime.settings import disable_phone_home
from tests.bench.bench_superlink_requests import _headers, call

ABORT_ON = ["pending", "starting", "finished"]  # what flwr's Fleet handlers refuse


@dataclass
class Link:
    app: Any
    state: Any
    cache: flwr_internals.RunStatusCache
    traffic: flwr_internals.TrafficBatcher
    nodes: flwr_internals.NodeKeyCache
    tokens: flwr_internals.TaskTokenCache
    db: Path
    node_id: int
    key: Any
    public_key: bytes

    def new_run(self, *, running: bool = True) -> tuple[int, int]:
        """A run (and its primary task id), claimed and started by a ServerApp if `running`."""
        from flwr.common.constant import NOOP_FLWR_AID
        from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType

        run_id = self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
        )
        task_id = self.state.get_run_info(run_ids=[run_id])[0].primary_task_id
        if running:
            assert self.state.claim_task(task_id)
            assert self.state.activate_task(task_id)
        return int(run_id), int(task_id)

    def status(self, run_id: int) -> str:
        return str(self.state.get_run_status({run_id})[run_id].status)

    def abort(self, run_id: int) -> str | None:
        from flwr.server.superlink.utils import check_abort

        return check_abort(run_id, ABORT_ON, self.state)


@pytest.fixture
def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    """A SuperLink app with both patches (fresh ones: a fresh process) and one active node."""
    disable_phone_home()
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from flwr.superlink.routers.fleet import node_auth

    for name in ("get_run_status", "store_traffic", "get_run_info", "get_node_id_by_public_key"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))
    monkeypatch.setattr(SqlCoreState, "get_task_by_token", SqlCoreState.get_task_by_token)
    monkeypatch.setattr(node_auth, "bytes_to_public_key", node_auth.bytes_to_public_key)
    monkeypatch.setattr(flwr_internals, "_write_watchers", [])
    monkeypatch.setattr(flwr_internals, "_traffic_batchers", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    cache = flwr_internals.patch_superlink_run_status_cache(max_age_s=30.0)
    assert flwr_internals.patch_superlink_run_status_cache(max_age_s=30.0) is cache  # idempotent
    traffic = flwr_internals.patch_superlink_traffic_batching(interval_s=30.0)
    nodes = flwr_internals.patch_superlink_node_key_cache(max_age_s=30.0)
    tokens = flwr_internals.patch_superlink_task_token_cache(max_age_s=30.0)
    import flwr.superlink.main as superlink_main

    app = superlink_main.create_app()
    state = app.state.linkstate_factory.state()
    private_key, public_key = generate_key_pairs()
    pk = public_key_to_bytes(public_key)
    node_id = state.create_node("noop", "noop", pk, 0)
    state.activate_node(node_id, 30)
    yield Link(
        app, state, cache, traffic, nodes, tokens, tmp_path / "superlink.db", int(node_id), private_key, pk
    )


def test_a_runs_status_is_read_once_then_served_from_the_cache(link: Link) -> None:
    run_id, _ = link.new_run()
    link.cache.hits = link.cache.misses = 0
    assert link.status(run_id) == "running"
    assert (link.cache.hits, link.cache.misses) == (0, 1)
    for _ in range(5):
        assert link.abort(run_id) is None
    assert (link.cache.hits, link.cache.misses) == (5, 1)
    assert link.state.get_run_status(set()) == {}


def test_a_stopped_run_is_seen_by_the_very_next_check(link: Link) -> None:
    run_id, _ = link.new_run()
    assert link.abort(run_id) is None and link.abort(run_id) is None  # cached
    assert link.state.stop_run(run_id)
    assert link.abort(run_id) == "Run is finished. Stopped by user."


def test_every_status_transition_is_seen_at_once(link: Link) -> None:
    """pending -> starting (claimed) -> running (started) -> finished (the ServerApp's end)."""
    run_id, task_id = link.new_run(running=False)
    assert link.status(run_id) == "pending" and link.status(run_id) == "pending"
    assert link.state.claim_task(task_id)
    assert link.status(run_id) == "starting"
    assert link.state.activate_task(task_id)
    assert link.status(run_id) == "running" and link.status(run_id) == "running"
    assert link.state.finish_task(task_id, "completed", "")
    assert link.status(run_id) == "finished"
    assert link.abort(run_id) == "Run is finished."


def test_a_lapsed_claim_swept_by_flower_is_seen_at_once(link: Link) -> None:
    """flwr fails a task whose heartbeat lapsed in its sweep (`_cleanup_expired_task_tokens`,
    run at the start of every status read, cached or not): the sweep's write ends the entry."""
    run_id, _ = link.new_run()
    assert link.status(run_id) == "running" and link.status(run_id) == "running"
    with sqlite3.connect(link.db) as raw:  # the heartbeat lapses, behind SQLAlchemy's back
        raw.execute("UPDATE task SET active_until = '2000-01-01 00:00:00+00:00'")
    assert link.status(run_id) == "finished"
    assert link.state.get_run_status({run_id})[run_id].details == "No heartbeat received from the task"


def test_a_status_read_in_a_transaction_that_rolls_back_is_not_kept(link: Link) -> None:
    run_id, task_id = link.new_run()
    assert link.status(run_id) == "running"
    with pytest.raises(RuntimeError, match="abandoned"), link.state.session():
        assert link.state.finish_task(task_id, "stopped", "")
        assert link.status(run_id) == "finished"  # inside the transaction: its own write
        raise RuntimeError("abandoned")
    assert link.status(run_id) == "running"


def test_a_write_that_bypasses_flowers_sessions_is_seen_after_max_age(
    link: Link, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, _ = link.new_run()
    monkeypatch.setattr(link.cache, "max_age_s", 0.3)
    assert link.status(run_id) == "running"
    with sqlite3.connect(link.db) as raw:  # another process: no SQLAlchemy event here
        raw.execute("UPDATE task SET finished_at = '2000-01-01 00:00:00+00:00', sub_status = 'stopped'")
    assert link.status(run_id) == "running"  # cached: nothing told this process
    time.sleep(0.35)
    assert link.status(run_id) == "finished"


def test_the_fleet_api_refuses_an_object_pull_of_a_run_stopped_a_moment_ago(link: Link) -> None:
    """Through flwr's app and handler: a SuperNode's object pull for a running run is answered,
    and refused by the first request after the run was stopped."""
    from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
    from flwr.proto.node_pb2 import Node

    run_id, _ = link.new_run()
    body = PullObjectRequest(
        node=Node(node_id=link.node_id), run_id=run_id, object_id="0" * 64
    ).SerializeToString()

    def pull() -> tuple[int, bytes]:
        return asyncio.run(call(link.app, "/v1/fleet/pull-object", body, _headers(link.key, link.public_key)))

    for _ in range(3):
        status, reply = pull()
        assert status == 200 and not PullObjectResponse.FromString(reply).object_found
    assert link.cache.hits >= 2
    assert link.state.stop_run(run_id)
    status, reply = pull()
    assert status == 403 and b'"code":2007' in reply  # FLEET_RUN_STATUS_NOT_ALLOWED


def test_traffic_is_summed_in_memory_and_exact_when_read(link: Link) -> None:
    run_id, _ = link.new_run()
    other, _ = link.new_run()
    for _ in range(4):
        link.state.store_traffic(run_id, bytes_sent=100, bytes_recv=7)
    link.state.store_traffic(other, bytes_sent=0, bytes_recv=5)
    assert link.traffic.writes == 0  # nothing written yet
    with sqlite3.connect(link.db) as raw:
        assert raw.execute("SELECT SUM(bytes_sent) FROM run").fetchone()[0] == 0
    runs = {r.run_id: r for r in link.state.get_run_info(run_ids=[run_id, other])}
    assert (runs[run_id].bytes_sent, runs[run_id].bytes_recv) == (400, 28)
    assert (runs[other].bytes_sent, runs[other].bytes_recv) == (0, 5)
    assert link.traffic.writes == 2  # one per run
    link.state.get_run_info(run_ids=[run_id])
    assert link.traffic.writes == 2  # nothing pending: no write


def test_traffic_is_written_once_per_interval(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, _ = link.new_run()
    monkeypatch.setattr(link.traffic, "interval_s", 0.2)
    link.traffic.flush()
    for _ in range(5):
        link.state.store_traffic(run_id, bytes_sent=1, bytes_recv=1)
    assert link.traffic.writes == 0
    time.sleep(0.25)
    link.state.store_traffic(run_id, bytes_sent=1, bytes_recv=1)  # due: this call writes all six
    assert link.traffic.writes == 1
    with sqlite3.connect(link.db) as raw:
        assert raw.execute("SELECT bytes_sent, bytes_recv FROM run WHERE bytes_sent > 0").fetchall() == [
            (6, 6)
        ]


def test_bad_traffic_values_are_refused_as_flower_refuses_them(link: Link) -> None:
    run_id, _ = link.new_run()
    with pytest.raises(ValueError, match="Negative traffic values"):
        link.state.store_traffic(run_id, bytes_sent=-1, bytes_recv=0)
    with pytest.raises(ValueError, match="cannot be zero"):
        link.state.store_traffic(run_id, bytes_sent=0, bytes_recv=0)
    link.state.store_traffic(424242, bytes_sent=3, bytes_recv=0)  # no such run: dropped at the flush
    link.traffic.flush()
    assert link.traffic.writes == 0


def _heartbeat(
    link: Link, node_id: int | None = None, key: Any = None, public_key: bytes | None = None
) -> int:
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    body = SendNodeHeartbeatRequest(
        node=Node(node_id=link.node_id if node_id is None else node_id), heartbeat_interval=30
    ).SerializeToString()
    headers = _headers(key or link.key, public_key or link.public_key)
    return asyncio.run(call(link.app, "/v1/fleet/send-node-heartbeat", body, headers))[0]


def test_a_nodes_key_is_looked_up_once_until_the_node_table_changes(link: Link) -> None:
    link.nodes.hits = link.nodes.misses = 0
    for _ in range(3):
        assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    assert (link.nodes.hits, link.nodes.misses) == (2, 1)
    assert _heartbeat(link) == 200  # Flower's node check, then the heartbeat: a node-table write
    assert link.state.get_node_id_by_public_key(link.public_key) == link.node_id
    assert (link.nodes.hits, link.nodes.misses) == (3, 2)  # the check hit; the heartbeat's write ended it


def test_a_deleted_node_is_refused_by_the_very_next_request(link: Link) -> None:
    assert _heartbeat(link) == 200 and _heartbeat(link) == 200
    link.state.delete_node("noop", link.node_id)
    assert _heartbeat(link) == 401
    assert link.state.get_node_id_by_public_key(link.public_key) is None


def test_another_nodes_id_or_key_is_still_refused(link: Link) -> None:
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    other_key, other_public = generate_key_pairs()
    other_pk = public_key_to_bytes(other_public)
    other_id = int(link.state.create_node("noop", "noop", other_pk, 0))
    link.state.activate_node(other_id, 30)
    assert _heartbeat(link) == 200 and _heartbeat(link, other_id, other_key, other_pk) == 200
    assert _heartbeat(link, node_id=other_id) == 401  # this node's key, the other's id
    assert _heartbeat(link, link.node_id, other_key, other_pk) == 401
    unknown_key, unknown_public = generate_key_pairs()
    assert _heartbeat(link, link.node_id, unknown_key, public_key_to_bytes(unknown_public)) == 401


def test_a_task_token_is_looked_up_once_and_still_refused_once_expired_or_finished(link: Link) -> None:
    run_id, task_id = link.new_run(running=False)
    token = link.state.claim_task(task_id)
    assert link.state.activate_task(task_id)
    link.tokens.hits = link.tokens.misses = 0
    first = link.state.get_task_by_token(token)
    assert first is not None and first.task_id == task_id and first.run_id == run_id
    first.run_id = 1  # a caller's own copy: the cache keeps its own
    assert link.state.get_task_by_token(token).run_id == run_id
    assert (link.tokens.hits, link.tokens.misses) == (1, 1)
    assert link.state.get_task_by_token("no-such-token") is None
    with sqlite3.connect(link.db) as raw:  # the claim lapses, behind SQLAlchemy's back
        raw.execute("UPDATE task SET active_until = '2000-01-01 00:00:00+00:00'")
    assert link.state.get_task_by_token(token) is not None  # not seen: the cache's max age bounds this
    link.tokens.bump()  # what any write through flwr's sessions does
    assert link.state.get_task_by_token(token) is None  # the lapsed claim, read again


def test_a_finished_tasks_token_is_refused_by_the_very_next_check(link: Link) -> None:
    _, task_id = link.new_run(running=False)
    token = link.state.claim_task(task_id)
    assert link.state.activate_task(task_id)
    assert link.state.get_task_by_token(token) is not None
    assert link.state.get_task_by_token(token) is not None
    assert link.state.finish_task(task_id, "completed", "")
    assert link.state.get_task_by_token(token) is None


def test_a_cached_token_expires_with_its_claim(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock, not a write, ends a claim: a cached entry is refused once `active_until` passed."""
    import datetime

    from flwr.supercore.corestate import sql_corestate

    _, task_id = link.new_run(running=False)
    token = link.state.claim_task(task_id)
    assert link.state.activate_task(task_id)
    task = link.state.get_task_by_token(token)
    assert task is not None and link.state.get_task_by_token(token) is not None  # cached
    later = sql_corestate.now() + datetime.timedelta(hours=1)
    monkeypatch.setattr("flwr.supercore.date.now", lambda: later)
    assert link.state.get_task_by_token(token) is None


_ORDER = {"pending": 0, "starting": 1, "running": 2, "finished": 3}


def test_no_thread_reads_a_status_or_a_node_older_than_the_last_commit(link: Link) -> None:
    """Readers in many threads against a writer moving runs through their statuses and deleting
    nodes, on the real SQLite LinkState: once a write has committed, no read that starts after it
    gets the state before it (the caches serve only what is current; a stale entry would show a
    running run as starting - a Fleet request refused - or a deleted node as present)."""
    import threading

    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    committed: dict[int, str] = {}  # run -> its last committed status
    deleted: list[bytes] = []  # keys of nodes whose deletion committed
    stop = threading.Event()
    stale: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for run_id, status in list(committed.items()):  # read the commit first, then the state
                got = link.status(run_id)
                if _ORDER[got] < _ORDER[status]:
                    stale.append(f"run {run_id}: {got} after {status} committed")
            for key in list(deleted):
                if link.state.get_node_id_by_public_key(key) is not None:
                    stale.append("a deleted node's key still names its node")

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(15):
            run_id, task_id = link.new_run(running=False)
            committed[run_id] = "pending"
            assert link.state.claim_task(task_id)
            committed[run_id] = "starting"
            assert link.state.activate_task(task_id)
            committed[run_id] = "running"
            assert link.state.finish_task(task_id, "completed", "")
            committed[run_id] = "finished"
            _, public = generate_key_pairs()
            key = public_key_to_bytes(public)
            node_id = link.state.create_node("noop", "noop", key, 0)
            assert link.state.get_node_id_by_public_key(key) == node_id
            link.state.delete_node("noop", node_id)
            deleted.append(key)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert stale == []
    assert link.cache.hits > 0 and link.nodes.hits > 0  # the caches did serve reads meanwhile
