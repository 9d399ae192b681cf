"""The SuperLink's CPU patches (`flwr_internals.patch_superlink_middleware`,
`patch_superlink_idle_pulls`) on flwr's real SuperLink app and SQLite LinkState, driven by raw ASGI
requests signed as a SuperNode signs them: an idle node's poll is answered early with Flower's own
reply, and never when that would be wrong (a message stored for the node, even in a transaction
not yet committed; another key; a bad signature; a fresh process); each API's middleware still
runs for its own paths; a locked database answers 503 (which Flower's clients retry), not 500.
End to end (messages delivered, a SuperLink restarted mid-study) the deployment tests run every
study through the patched SuperLink."""

from __future__ import annotations

import asyncio
import base64
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

PULL = "/v1/fleet/pull-messages"
HEARTBEAT = "/v1/fleet/send-node-heartbeat"


@dataclass
class Link:
    app: Any
    state: Any
    tracker: flwr_internals.PendingTracker
    node_id: int
    key: Any
    public_key: bytes
    db: Path

    def pull_body(self, node_id: int | None = None) -> bytes:
        from flwr.proto.fleet_pb2 import PullMessagesRequest
        from flwr.proto.node_pb2 import Node

        node = Node(node_id=self.node_id if node_id is None else node_id)
        return PullMessagesRequest(node=node).SerializeToString()

    def poll(self, headers: list[tuple[bytes, bytes]] | None = None,
             node_id: int | None = None) -> tuple[int, bytes]:
        return asyncio.run(call(self.app, PULL, self.pull_body(node_id),
                                headers if headers is not None else _headers(self.key, self.public_key)))

    async def pull(self) -> tuple[int, bytes]:
        """One poll, signed now, on the caller's event loop (to hold it beside others)."""
        return await call(self.app, PULL, self.pull_body(), _headers(self.key, self.public_key))

    def counts(self) -> tuple[int, int]:
        shortcut = _shortcut(self.app)
        return shortcut.answered_early, shortcut.full_path


def _shortcut(app: Any) -> Any:
    """The `_IdlePullShortcut` instance in the app's built middleware stack."""
    layer = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = layer
    while layer is not None:
        if isinstance(layer, flwr_internals._IdlePullShortcut):
            return layer
        layer = getattr(layer, "app", None)
    raise AssertionError("no idle-pull shortcut in the SuperLink app")


def _register(state: Any) -> tuple[int, Any, bytes]:
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    private_key, public_key = generate_key_pairs()
    pk = public_key_to_bytes(public_key)
    node_id = state.create_node("noop", "noop", pk, 0)
    state.activate_node(node_id, 30)
    return int(node_id), private_key, pk


@pytest.fixture
def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    """A patched SuperLink app (a fresh tracker: a fresh process) with one active node."""
    superlink_main, tracker = _patch_superlink(tmp_path, monkeypatch)
    app = superlink_main.create_app()
    state = app.state.linkstate_factory.state()
    node_id, key, pk = _register(state)
    yield Link(app, state, tracker, node_id, key, pk, tmp_path / "superlink.db")


def _patch_superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     ) -> tuple[Any, flwr_internals.PendingTracker]:
    """flwr's SuperLink module with our middleware and idle-pull patches applied as a fresh
    process applies them (module-level patch state reset, its own database file), and the
    idle-pull tracker. The caller builds the app (`create_app`), so that a patch applied after
    this call (the request counter) is part of it."""
    disable_phone_home()
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    flwr_internals.patch_superlink_middleware()
    tracker = flwr_internals.patch_superlink_idle_pulls(recheck_s=30.0)
    return superlink_main, tracker


def _is_empty_reply(body: bytes) -> bool:
    from flwr.proto.fleet_pb2 import PullMessagesResponse

    return not PullMessagesResponse.FromString(body).messages_list


def test_an_idle_nodes_poll_is_answered_early_with_flowers_own_reply(link: Link) -> None:
    assert link.counts() == (0, 0)
    first = link.poll()  # a fresh process knows nothing: Flower's full path
    assert first[0] == 200 and _is_empty_reply(first[1])
    assert link.counts() == (0, 1)
    for _ in range(3):
        assert link.poll() == first
    assert link.counts() == (3, 1)
    assert link.tracker.idle_key(link.node_id) == link.public_key


def test_a_message_stored_for_the_node_ends_its_idleness_at_the_store_and_again_at_commit(link: Link) -> None:
    from flwr.app import Message, RecordDict

    link.poll()
    assert link.tracker.idle_key(link.node_id) is not None
    flwr_internals.set_task_identity(0, 1, 0)  # what Message() stamps; run 1 does not exist
    message = Message(RecordDict(), dst_node_id=link.node_id, message_type="query")  # no such run: not stored
    with link.state.session():
        start = link.tracker.generation(link.node_id)
        link.state.store_message_ins(message)
        assert link.tracker.idle_key(link.node_id) is None
        assert link.tracker.generation(link.node_id) == start + 1
        # a poll that ran now saw nothing yet (the insert is not committed) and marks the node idle
        link.tracker.mark_idle(link.node_id, start + 1, link.public_key)
        assert link.tracker.idle_key(link.node_id) == link.public_key
    # the commit voids that: the next poll takes the full path and finds the message
    assert link.tracker.generation(link.node_id) == start + 2
    assert link.tracker.idle_key(link.node_id) is None
    before = link.counts()
    link.poll()
    assert link.counts() == (before[0], before[1] + 1)


def test_a_poll_that_overlaps_a_store_does_not_mark_the_node_idle(link: Link) -> None:
    start = link.tracker.generation(link.node_id)
    link.tracker.bump(link.node_id)  # a store landed while that poll ran
    link.tracker.mark_idle(link.node_id, start, link.public_key)
    assert link.tracker.idle_key(link.node_id) is None


def test_a_bad_signature_or_another_nodes_key_is_refused_by_flowers_own_check(link: Link) -> None:
    link.poll()
    assert link.tracker.idle_key(link.node_id) is not None
    headers = dict(_headers(link.key, link.public_key))
    signature = bytearray(base64.b64decode(headers[b"flwr-signature"]))
    signature[-1] ^= 1
    headers[b"flwr-signature"] = base64.b64encode(bytes(signature))
    status, _ = link.poll(list(headers.items()))
    assert status == 401
    # another registered node claiming this node's id: signed correctly, by the wrong key
    _other_id, other_key, other_pk = _register(link.state)
    status, _ = link.poll(_headers(other_key, other_pk))
    assert status == 401
    # a time stamp outside Flower's window, signed correctly
    from flwr.supercore.primitives.asymmetric import sign_message

    stale = "2020-01-01T00:00:00+00:00"
    headers = dict(_headers(link.key, link.public_key))
    headers[b"flwr-timestamp"] = stale.encode()
    headers[b"flwr-signature"] = base64.b64encode(sign_message(link.key, stale.encode("ascii")))
    status, _ = link.poll(list(headers.items()))
    assert status == 401
    assert link.counts()[0] == 0  # none of these was answered early
    assert link.tracker.idle_key(link.node_id) is None  # a refused full poll forgets the node


def test_an_unregistered_node_is_refused_once_its_idle_entry_expires(link: Link) -> None:
    """An empty full poll vouches for a node for `recheck_s` only: then Flower's full path checks
    the node's key against the database again (here: the node was deleted meanwhile)."""
    link.tracker.recheck_s = 0.2
    assert link.poll()[0] == 200
    assert link.tracker.idle_key(link.node_id) == link.public_key
    link.state.delete_node("noop", link.node_id)
    time.sleep(0.3)
    early_before = link.counts()[0]
    status, _ = link.poll()
    assert status == 401
    assert link.counts()[0] == early_before


def test_each_apis_middleware_and_flowers_node_check_still_run_for_their_own_paths(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    disable_phone_home()
    import flwr.superlink.main as superlink_main
    from flwr.superlink.routers.control.middlewares import ControlAuthenticationMiddleware
    from flwr.superlink.routers.fleet import node_auth

    seen: list[tuple[str, str]] = []
    original = ControlAuthenticationMiddleware.dispatch

    async def dispatch(self: Any, request: Any, call_next: Any) -> Any:
        seen.append(("ControlAuthenticationMiddleware", request.url.path))
        return await original(self, request, call_next)

    authenticate = node_auth.authenticate_node

    def authenticate_node(request: Any) -> None:
        seen.append(("authenticate_node", request.url.path))
        authenticate(request)

    monkeypatch.setattr(ControlAuthenticationMiddleware, "dispatch", dispatch)
    monkeypatch.setattr(node_auth, "authenticate_node", authenticate_node)
    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    flwr_internals.patch_superlink_middleware()
    app = superlink_main.create_app()
    node_id, key, pk = _register(app.state.linkstate_factory.state())
    from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    beat = SendNodeHeartbeatRequest(node=Node(node_id=node_id), heartbeat_interval=30).SerializeToString()
    assert asyncio.run(call(app, HEARTBEAT, beat, _headers(key, pk)))[0] == 200
    status, body = asyncio.run(call(app, "/v1/control/list-nodes", ListNodesRequest().SerializeToString(),
                                    [(b"content-type", b"application/protobuf")]))
    assert status == 200
    ListNodesResponse.FromString(body)  # Flower's own protobuf reply
    assert seen == [("authenticate_node", HEARTBEAT),
                    ("ControlAuthenticationMiddleware", "/v1/control/list-nodes")]
    # and Flower's node check still refuses a bad signature on a path the shortcut never answers
    headers = dict(_headers(key, pk))
    headers[b"flwr-signature"] = base64.b64encode(b"\0" * 64)
    assert asyncio.run(call(app, HEARTBEAT, beat, list(headers.items())))[0] == 401


def test_a_locked_database_answers_503_which_flowers_clients_retry(link: Link) -> None:
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    beat = SendNodeHeartbeatRequest(node=Node(node_id=link.node_id),
                                    heartbeat_interval=30).SerializeToString()
    holder = sqlite3.connect(link.db, timeout=0.1)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database past the busy timeout
        status, body = asyncio.run(call(link.app, HEARTBEAT, beat, _headers(link.key, link.public_key)))
    finally:
        holder.rollback()
        holder.close()
    assert status == 503, body
    assert b"busy" in body
    # Flower's HTTP retry policy retries it (and would give up on a 500)
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    should_giveup = make_simple_http_retry_invoker().should_giveup
    assert should_giveup is not None
    request = httpx.Request("POST", "http://superlink" + HEARTBEAT)
    for code, gives_up in ((503, False), (500, True)):
        error = httpx.HTTPStatusError("x", request=request, response=httpx.Response(code, request=request))
        assert should_giveup(error) is gives_up
    status, _ = asyncio.run(call(link.app, HEARTBEAT, beat, _headers(link.key, link.public_key)))
    assert status == 200


def test_a_serverapps_reply_pull_is_answered_early_only_while_nothing_was_stored_for_its_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Runtime API side (`_IdleReplyPullShortcut`) in front of a stand-in for Flower's stack
    that answers every pull empty and counts them; the token's run comes from the LinkState."""
    disable_phone_home()
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest

    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    runs = flwr_internals.PendingTracker(30.0)
    flwr_internals._pending_runs.append(runs)
    full: list[str] = []

    class Task:
        run_id = 42

    class State:
        def get_task_by_token(self, token: str) -> Task | None:
            return Task() if token == "good" else None

    class Flower:  # the rest of flwr's app: Flower's empty reply
        state = type("S", (), {"linkstate_factory": type("F", (), {"state": staticmethod(State)})})()

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await receive()
            full.append(dict(scope["headers"]).get(b"flwr-task-token", b"").decode())
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/protobuf")]})
            await send({"type": "http.response.body", "body": b""})

    flower = Flower()
    shortcut = flwr_internals._IdleReplyPullShortcut(flower, tracker=runs)

    def pull(token: str = "good", ids: tuple[str, ...] = ("m1", "m2")) -> tuple[int, bytes]:
        body = PullAppMessagesRequest(message_ids=list(ids)).SerializeToString()
        headers = [(b"content-type", b"application/protobuf"), (b"flwr-task-token", token.encode())]

        async def go() -> tuple[int, bytes]:
            class App:  # Starlette sets scope["app"] before the middleware stack
                pass
            scope_app = App()
            scope_app.state = flower.state  # type: ignore[attr-defined]

            async def app(scope: Any, receive: Any, send: Any) -> None:
                scope["app"] = scope_app
                await shortcut(scope, receive, send)
            return await call(app, flwr_internals._RUNTIME_PULL_PATH, body, headers)
        return asyncio.run(go())

    assert pull() == (200, b"") and len(full) == 1  # unknown token: full path, its run looked up
    assert pull() == (200, b"") and len(full) == 2  # generation read before it: vouches now
    assert pull() == (200, b"") and len(full) == 2  # answered early
    assert shortcut.answered_early == 1
    pull(ids=("m1",))  # other message ids: full path
    assert len(full) == 3
    pull(token="other")  # another token: full path (Flower decides)
    assert len(full) == 4
    pull()
    assert len(full) == 5  # the entry for ("good", m1 m2) was replaced by m1's
    pull()
    assert len(full) == 5
    flwr_internals._bump_key(("run", 42))  # a reply stored for run 42
    pull()
    assert len(full) == 6
    flwr_internals._bump_key(("run", 7))  # another run's reply changes nothing here
    pull()
    assert len(full) == 6


def test_the_sweep_of_lapsed_task_claims_runs_at_most_once_per_interval(
        link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """flwr sweeps lapsed task claims (two UPDATEs) on nearly every request; patched, at most once
    per interval per LinkState, and still on the first call after it."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweeps: list[float] = []
    original = SqlCoreState._cleanup_expired_task_tokens

    def counting(self: Any) -> None:
        sweeps.append(time.monotonic())
        original(self)

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", counting)
    flwr_internals.patch_superlink_task_sweep(0.5)
    flwr_internals.patch_superlink_task_sweep(0.5)  # idempotent
    for _ in range(5):
        link.state.get_run_status({1})
    assert len(sweeps) == 1
    time.sleep(0.6)
    link.state.get_run_status({1})
    link.state.get_run_status({1})
    assert len(sweeps) == 2


def test_the_request_counter_counts_every_request_by_path_early_answers_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`patch_superlink_request_counter` (a benchmark's requests per round) sits outside every
    other layer: it counts the polls the idle shortcut answers as well as those Flower answers."""
    superlink_main, tracker = _patch_superlink(tmp_path, monkeypatch)
    counts = flwr_internals.patch_superlink_request_counter()
    app = superlink_main.create_app()
    node_id, key, pk = _register(app.state.linkstate_factory.state())
    link = Link(app, None, tracker, node_id, key, pk, tmp_path / "superlink.db")
    for _ in range(3):
        assert link.poll()[0] == 200
    assert link.counts() == (2, 1)  # one full poll, two answered early
    assert counts == {PULL: 3}



# -- long polls (`_PollHold`): an idle node's poll held until a message for it is stored ----------


def _held_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, hold_s: float, max_held: int = 8,
               ) -> tuple[Link, dict[str, int]]:
    """A patched SuperLink app whose idle polls are long polls, its request counts, one node."""
    disable_phone_home()
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    flwr_internals.patch_superlink_middleware()
    tracker = flwr_internals.patch_superlink_idle_pulls(recheck_s=30.0, hold_s=hold_s, max_held=max_held)
    counts = flwr_internals.patch_superlink_request_counter()
    app = superlink_main.create_app()
    state = app.state.linkstate_factory.state()
    node_id, key, pk = _register(state)
    return Link(app, state, tracker, node_id, key, pk, tmp_path / "superlink.db"), counts


async def _until(condition: Any) -> None:
    """Let the event loop run until `condition()` holds (a held poll is parked)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def _store_for(link: Link) -> None:
    """What Flower's handler does when the ServerApp pushes a message for the node: store it (in a
    worker thread; the run does not exist, so nothing is kept, but the store hook bumps the node)."""
    from flwr.app import Message, RecordDict

    flwr_internals.set_task_identity(0, 1, 0)
    link.state.store_message_ins(Message(RecordDict(), dst_node_id=link.node_id, message_type="query"))


#: a hang guard only: a held poll that is never woken would wait out its 600 s hold
GUARD_S = 120.0


def test_a_held_poll_is_answered_by_flowers_full_path_as_soon_as_a_message_is_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link, _counts = _held_link(tmp_path, monkeypatch, hold_s=600.0)
    assert link.poll()[0] == 200  # the first poll takes the full path: the node is idle now
    shortcut = _shortcut(link.app)

    async def go() -> tuple[int, bytes]:
        poll = asyncio.create_task(link.pull())
        await _until(lambda: shortcut.hold.holding == 1)
        assert not poll.done()
        await asyncio.to_thread(_store_for, link)  # the bump comes from another thread
        return await asyncio.wait_for(poll, GUARD_S)

    status, body = asyncio.run(go())
    assert status == 200 and _is_empty_reply(body)  # Flower's own answer (nothing was kept)
    assert (shortcut.hold.held, shortcut.hold.woken, shortcut.hold.holding) == (1, 1, 0)
    assert link.counts() == (0, 2)  # answered by the full path, not early


def test_a_held_poll_wakes_when_the_stores_transaction_commits_not_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answered while the message's transaction is still open, the poll would find nothing: the
    store's own bump ends the node's idleness but wakes no held poll; its commit does."""
    import threading

    link, _counts = _held_link(tmp_path, monkeypatch, hold_s=600.0)
    link.poll()
    shortcut = _shortcut(link.app)
    stored, commit = threading.Event(), threading.Event()

    def store_in_a_transaction() -> None:
        with link.state.session():
            _store_for(link)
            stored.set()
            commit.wait(GUARD_S)

    async def go() -> tuple[bool, tuple[int, bytes]]:
        poll = asyncio.create_task(link.pull())
        await _until(lambda: shortcut.hold.holding == 1)
        writer = asyncio.create_task(asyncio.to_thread(store_in_a_transaction))
        await asyncio.to_thread(stored.wait, GUARD_S)
        await asyncio.sleep(0.05)  # let a (wrong) wake-up run
        held_through_the_store = not poll.done() and shortcut.hold.holding == 1
        commit.set()
        await writer
        return held_through_the_store, await asyncio.wait_for(poll, GUARD_S)

    held_through_the_store, (status, _body) = asyncio.run(go())
    assert held_through_the_store
    assert status == 200 and (shortcut.hold.held, shortcut.hold.woken) == (1, 1)
    assert link.counts() == (0, 2)


def test_a_held_poll_with_nothing_stored_is_answered_empty_when_its_hold_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link, counts = _held_link(tmp_path, monkeypatch, hold_s=0.2)
    first = link.poll()
    assert link.poll() == first  # held 0.2 s, then Flower's empty reply
    shortcut = _shortcut(link.app)
    assert (shortcut.hold.held, shortcut.hold.woken) == (1, 0)
    assert link.counts() == (1, 1)
    assert counts == {PULL: 2}


def test_a_held_poll_whose_time_stamp_would_age_out_is_answered_empty_not_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower refuses a time stamp outside its window (401, and the SuperNode gives up): a held poll
    goes on to the full path only while its own stamp stays inside it; else the empty reply."""
    import datetime

    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import sign_message

    link, _counts = _held_link(tmp_path, monkeypatch, hold_s=600.0)
    link.poll()
    shortcut = _shortcut(link.app)
    aged = (now() - datetime.timedelta(seconds=TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE - 1)).isoformat()
    headers = dict(_headers(link.key, link.public_key))
    headers[b"flwr-timestamp"] = aged.encode()
    headers[b"flwr-signature"] = base64.b64encode(sign_message(link.key, aged.encode("ascii")))

    async def go() -> tuple[int, bytes]:
        poll = asyncio.create_task(call(link.app, PULL, link.pull_body(), list(headers.items())))
        await _until(lambda: shortcut.hold.holding == 1)  # still inside the window: authenticated, held
        await asyncio.to_thread(_store_for, link)
        return await asyncio.wait_for(poll, GUARD_S)

    status, body = asyncio.run(go())
    assert status == 200 and _is_empty_reply(body)
    assert link.counts() == (1, 1)  # answered empty; the node's next poll takes the full path


def test_at_most_max_held_polls_are_held_the_rest_are_answered_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link, _counts = _held_link(tmp_path, monkeypatch, hold_s=600.0, max_held=1)
    link.poll()
    shortcut = _shortcut(link.app)

    async def go() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        held = asyncio.create_task(link.pull())
        await _until(lambda: shortcut.hold.holding == 1)
        at_once = await asyncio.wait_for(link.pull(), GUARD_S)
        assert not held.done()
        await asyncio.to_thread(_store_for, link)
        return at_once, await asyncio.wait_for(held, GUARD_S)

    at_once, held = asyncio.run(go())
    assert at_once[0] == held[0] == 200
    assert (shortcut.hold.held, shortcut.hold.woken) == (1, 1)
    assert link.counts() == (1, 2)


def test_a_shutdown_signal_answers_every_held_poll_at_once_and_holds_no_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's graceful shutdown waits for in-flight requests: its exit handler (what SIGTERM
    and SIGINT call) ends the holds, so a SuperLink stop or restart does not wait them out."""
    import signal

    import uvicorn

    link, _counts = _held_link(tmp_path, monkeypatch, hold_s=600.0)
    link.poll()
    shortcut = _shortcut(link.app)
    server = uvicorn.Server(uvicorn.Config(link.app))

    async def go() -> tuple[int, bytes]:
        poll = asyncio.create_task(link.pull())
        await _until(lambda: shortcut.hold.holding == 1)
        server.handle_exit(signal.SIGTERM, None)
        return await asyncio.wait_for(poll, GUARD_S)

    status, body = asyncio.run(go())
    assert status == 200 and _is_empty_reply(body)
    assert server.should_exit  # uvicorn's own handler ran too
    assert link.poll()[0] == 200  # and the next poll is answered at once, not held
    assert shortcut.hold.held == 1 and link.counts() == (2, 1)


def test_an_idle_hot_supernode_polls_about_once_per_hold_not_once_per_sleep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SuperNode's poll loop (its real `IdlePacer`: 0.1 s between polls while hot) against the
    SuperLink app, counted there: held polls bound the request rate by the hold, and the pacer
    starts the next poll at once after a held one. Without holds it would be ~10 polls a second."""
    hold_s, window_s = 0.5, 2.0
    link, counts = _held_link(tmp_path, monkeypatch, hold_s=hold_s)
    pacer = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0)
    sleeps: list[float] = []
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        pacer.poll_started()
        assert link.poll()[0] == 200
        sleeps.append(pacer.next_sleep())
        time.sleep(sleeps[-1])
    # the first poll takes the full path and returns at once; every later one is held hold_s
    assert counts[PULL] <= 2 + window_s / hold_s
    assert sleeps[1:] == [0.0] * (len(sleeps) - 1)


def test_a_serverapps_held_reply_pull_is_answered_by_the_full_path_when_a_reply_is_stored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Runtime API side: an idle reply pull is held (at most until its run's entry lapses) and
    a reply stored for its run, from another thread, sends it on to Flower's full path at once."""
    disable_phone_home()
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest

    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    runs = flwr_internals.PendingTracker(600.0)
    flwr_internals._pending_runs.append(runs)
    full: list[int] = []

    class Task:
        run_id = 42

    class State:
        def get_task_by_token(self, token: str) -> Task | None:
            return Task()

    state = type("S", (), {"linkstate_factory": type("F", (), {"state": staticmethod(State)})})()

    async def flower(scope: Any, receive: Any, send: Any) -> None:  # Flower's empty reply
        await receive()
        full.append(1)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": b""})

    shortcut = flwr_internals._IdleReplyPullShortcut(flower, tracker=runs, hold_s=600.0, max_held=8)
    body = PullAppMessagesRequest(message_ids=["m1"]).SerializeToString()
    headers = [(b"content-type", b"application/protobuf"), (b"flwr-task-token", b"good")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = type("App", (), {"state": state})()
        await shortcut(scope, receive, send)

    async def go() -> tuple[int, bytes]:
        for _ in range(2):  # the token's run looked up, then an empty full pull vouches
            await call(app, flwr_internals._RUNTIME_PULL_PATH, body, headers)
        pull = asyncio.create_task(call(app, flwr_internals._RUNTIME_PULL_PATH, body, headers))
        await _until(lambda: shortcut.hold.holding == 1)
        await asyncio.to_thread(flwr_internals._bump_key, ("run", 7))  # another run's reply: still held
        await asyncio.sleep(0.05)
        assert not pull.done()
        await asyncio.to_thread(flwr_internals._bump_key, ("run", 42))
        return await asyncio.wait_for(pull, GUARD_S)

    assert asyncio.run(go()) == (200, b"")
    assert len(full) == 3 and shortcut.answered_early == 0
    assert (shortcut.hold.held, shortcut.hold.woken) == (1, 1)


@pytest.mark.flower
@pytest.mark.slow
def test_a_superlink_stopped_while_it_holds_a_poll_answers_it_and_exits_within_its_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `superlink_main` process (uvicorn) holding a SuperNode's poll for up to 10 s gets
    SIGTERM: the held poll is answered with Flower's empty reply and the process exits by
    itself within `terminate`'s 5 s grace (no SIGKILL), instead of waiting out the hold."""
    import signal
    import threading

    import httpx

    from federated.runtime.deployment import SuperLinkProcess
    from federated.runtime.settings import RuntimeSettings

    workdir = tmp_path / "superlink"
    workdir.mkdir()
    disable_phone_home()
    monkeypatch.setenv("FLWR_DATABASE", str(workdir / "superlink.db"))
    import flwr.superlink.main as superlink_main

    node_id, key, pk = _register(superlink_main.create_app().state.linkstate_factory.state())
    link = SuperLinkProcess(workdir, settings=RuntimeSettings(superlink_long_poll=10.0))
    link.start()
    body = Link(None, None, flwr_internals.PendingTracker(1.0), node_id, key, pk, workdir).pull_body()
    url = f"http://{link.address}{PULL}"
    replies: list[httpx.Response] = []
    try:
        with httpx.Client(timeout=60.0) as client:
            first = client.post(url, content=body, headers=dict(_headers(key, pk)))
            assert first.status_code == 200 and _is_empty_reply(first.content), first.text
            # the shortcut marks the node idle once Flower's reply is sent: the next request on this
            # keep-alive connection may be read before that, so leave it a moment
            time.sleep(0.5)
            def poll() -> None:
                try:
                    replies.append(client.post(url, content=body, headers=dict(_headers(key, pk))))
                except Exception as exc:  # reported below
                    replies.append(exc)  # type: ignore[arg-type]

            held = threading.Thread(target=poll)
            held.start()
            time.sleep(1.0)  # the poll reaches the SuperLink and is held (up to its 5 s recheck)
            assert held.is_alive(), replies
            assert link.proc is not None
            code = link.proc.terminate(grace=5.0)
            held.join(GUARD_S)
    finally:
        link.stop()
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15, not SIGKILL's -9
    assert code == -signal.SIGTERM, f"exit {code}\n{link.proc.log_tail()}"
    assert [r.status_code for r in replies] == [200] and _is_empty_reply(replies[0].content)
