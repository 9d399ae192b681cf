"""`superlink_delivery`: the SuperLink hands a message out only once all its objects are pushed,
on flwr's real handlers and SQLite LinkState (the same calls its HTTP routes make): a SuperNode's
poll (Fleet `PullMessages`) and the ServerApp's reply pull (Runtime `PullMessages`) get nothing
while an object is missing and the whole message once the last one is in, never twice; idle
polls stay answered early and held polls stay held until then, and are woken at the last
object's commit; a message whose objects never come still ends by flwr's TTL expiry. The
deployment tests run every study through it (`RuntimeSettings.superlink_deliver_complete`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federated.runtime import flwr_internals, superlink_delivery
from federated.runtime.settings import RuntimeSettings, disable_phone_home
from tests.bench.bench_superlink_requests import _headers, call


@dataclass
class Link:
    app: Any
    state: Any
    run_id: int
    node_id: int
    key: Any
    public_key: bytes
    tracker: flwr_internals.PendingTracker
    run_tracker: flwr_internals.PendingTracker
    watch: superlink_delivery.DeliveryWatch | None
    woken: list[tuple[str, int]] = field(default_factory=list)


def _link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, deliver_complete: bool = True,
          hold_s: float = 0.0) -> Link:
    """flwr's SuperLink app with our patches applied as a fresh process applies them (flwr's own
    methods first, whatever an earlier test patched), one active node and a started run."""
    disable_phone_home()
    import flwr.superlink.main as superlink_main
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from flwr.superlink.servicer.runtime import runtime_handlers

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    monkeypatch.setattr(runtime_handlers, "push_messages", runtime_handlers.push_messages)
    for name in ("get_message_ins", "get_message_res", "_claim_message_ins_rows",
                 "store_message_and_object_tree"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))
    monkeypatch.setattr(SqlObjectStore, "put", SqlObjectStore.put)
    monkeypatch.setattr(superlink_delivery._process, "watch", None)
    monkeypatch.setattr(flwr_internals, "_recheck_due", [None])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    flwr_internals.patch_superlink_middleware()
    tracker = flwr_internals.patch_superlink_idle_pulls(recheck_s=30.0, hold_s=hold_s, max_held=8)
    flwr_internals.patch_superlink_push_one_transaction()
    woken: list[tuple[str, int]] = []

    def wake(key: tuple[str, int]) -> None:
        woken.append(key)
        flwr_internals.wake_receiver(key)

    watch = superlink_delivery.patch_superlink_delivery(wake) if deliver_complete else None
    app = superlink_main.create_app()
    state = app.state.linkstate_factory.state()
    private_key, public_key = generate_key_pairs()
    pk = public_key_to_bytes(public_key)
    node_id = int(state.create_node(NOOP_FLWR_AID, "noop", pk, 30))
    state.activate_node(node_id, 30)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    state.claim_task(task_id)
    state.activate_task(task_id)
    return Link(app, state, int(run_id), node_id, private_key, pk, tracker, flwr_internals._pending_runs[-1],
                watch, woken)


@pytest.fixture
def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    yield _link(tmp_path, monkeypatch)


def _objects(message: Any) -> dict[str, bytes]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def _push_instruction(link: Link, ttl: float = 600.0, values: int = 4) -> tuple[Any, str, list[str]]:
    """The ServerApp's `PushMessages` of one train message for the node (flwr's Runtime handler):
    the message, the push session and the objects the SuperLink asks for."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.superlink.servicer.runtime import runtime_handlers

    flwr_internals.set_task_identity(1, link.run_id, 1)
    weights = np.arange(values, dtype=np.float32) + time.time()  # a new object tree every push
    content = RecordDict({"global": ArrayRecord({"w": Array(weights)}),
                          "config": ConfigRecord({"at": time.time_ns()})})
    message = Message(content=content, dst_node_id=link.node_id, message_type="train", group_id="1", ttl=ttl)
    flwr_internals.stamp_metadata(message.metadata, message_id=message.object_id)
    request = PushAppMessagesRequest(messages_list=[message_to_proto(remove_content_from_message(message))],
                                     message_object_trees=[get_object_tree(message)])
    response = runtime_handlers.push_messages(request, link.state, Task(run_id=link.run_id))
    assert list(response.message_ids) == [message.object_id]
    return message, response.session_id, list(response.objects_to_push)


def _push_objects(link: Link, message: Any, session_id: str, object_ids: list[str]) -> None:
    objects = _objects(message)
    for oid in object_ids:
        assert link.state.store_object(link.run_id, session_id, oid, objects[oid])


def _fleet_pull(link: Link) -> list[Any]:
    """A SuperNode's poll through flwr's Fleet handler (what its route calls)."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.superlink.servicer.fleet import fleet_handlers

    request = PullMessagesRequest(node=Node(node_id=link.node_id))
    return list(fleet_handlers.pull_messages(request, link.state, link.state.object_store).messages_list)


def _runtime_pull(link: Link, message_ids: list[str]) -> list[Any]:
    """The ServerApp's reply pull through flwr's Runtime handler."""
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.proto.task_pb2 import Task
    from flwr.superlink.servicer.runtime import runtime_handlers

    request = PullAppMessagesRequest(message_ids=message_ids)
    return list(runtime_handlers.pull_messages(request, link.state, Task(run_id=link.run_id)).messages_list)


def _push_reply(link: Link, instruction: Any, values: int = 4) -> tuple[Any, str, list[str]]:
    """The SuperNode's `PushMessages` of its reply (flwr's Fleet handler)."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.superlink.servicer.fleet import fleet_handlers

    received = message_from_proto(instruction)
    update = np.arange(values, dtype=np.float32) * 2.0
    reply = Message(RecordDict({"update": ArrayRecord({"w": Array(update)})}), reply_to=received)
    flwr_internals.stamp_metadata(reply.metadata, message_id=reply.object_id)
    request = PushMessagesRequest(node=Node(node_id=link.node_id),
                                  messages_list=[message_to_proto(remove_content_from_message(reply))],
                                  message_object_trees=[get_object_tree(reply)])
    response = fleet_handlers.push_messages(request, link.state)
    return reply, response.session_id, list(response.objects_to_push)


def test_a_nodes_poll_gets_its_message_only_once_every_object_is_pushed_and_once(link: Link) -> None:
    message, session_id, to_push = _push_instruction(link)
    assert len(to_push) >= 4  # message, record dict, two records, the array
    assert _fleet_pull(link) == []  # flwr hands it out here, before its objects
    _push_objects(link, message, session_id, to_push[:-1])
    assert _fleet_pull(link) == []  # one object still missing
    assert link.state.num_message_ins() == 1  # left pending, not claimed
    _push_objects(link, message, session_id, to_push[-1:])
    delivered = _fleet_pull(link)
    assert [m.metadata.message_id for m in delivered] == [message.object_id]
    # every object the node will pull is there now
    for oid in _objects(message):
        assert link.state.get_object(link.run_id, oid) not in (None, b"")
    assert _fleet_pull(link) == []  # delivered once
    assert link.watch is not None and link.watch.held_back == 2 and len(link.watch) == 0


def test_without_the_patch_flower_hands_the_message_out_before_its_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = _link(tmp_path, monkeypatch, deliver_complete=False)
    message, _session_id, to_push = _push_instruction(link)
    delivered = _fleet_pull(link)
    assert [m.metadata.message_id for m in delivered] == [message.object_id]
    assert link.state.get_object(link.run_id, to_push[0]) == b""  # "found, not yet available"


def test_a_complete_message_is_not_held_back_behind_an_incomplete_older_one(link: Link) -> None:
    older, _older_session, _ = _push_instruction(link)
    newer, newer_session, to_push = _push_instruction(link)
    _push_objects(link, newer, newer_session, to_push)
    assert [m.metadata.message_id for m in _fleet_pull(link)] == [newer.object_id]
    assert _fleet_pull(link) == []
    assert link.watch is not None and link.watch.waiting(older.object_id)


def test_the_serverapps_reply_pull_gets_a_reply_only_once_its_objects_are_pushed(link: Link) -> None:
    message, session_id, to_push = _push_instruction(link)
    _push_objects(link, message, session_id, to_push)
    (instruction,) = _fleet_pull(link)
    reply, reply_session, reply_objects = _push_reply(link, instruction)
    assert reply_objects
    assert _runtime_pull(link, [message.object_id]) == []  # flwr hands it out here
    _push_objects(link, reply, reply_session, reply_objects[:-1])
    assert _runtime_pull(link, [message.object_id]) == []
    assert link.woken == [("node", link.node_id)]  # the instruction's last object; none for the reply yet
    _push_objects(link, reply, reply_session, reply_objects[-1:])
    assert link.woken[-1] == ("run", link.run_id)
    replies = _runtime_pull(link, [message.object_id])
    assert [m.metadata.message_id for m in replies] == [reply.object_id]
    # once: asked again, flwr answers that the message is gone (its own error), not the reply
    assert reply.object_id not in [m.metadata.message_id for m in _runtime_pull(link, [message.object_id])]


def _expire(link: Link, message_id: str) -> None:
    """Let the instruction's TTL run out: its creation time moved back by its TTL (as if that long
    had passed; flwr compares `created_at + ttl` with the clock)."""
    from flwr.supercore.state.schema.linkstate_models import MessageIns
    from sqlalchemy import update

    with link.state.session() as session:
        session.execute(update(MessageIns).where(MessageIns.message_id == message_id)
                        .values(created_at=MessageIns.created_at - MessageIns.ttl - 1.0))


def test_an_instruction_whose_objects_never_come_ends_by_flowers_ttl_expiry(link: Link) -> None:
    """Never handed out incomplete; once its TTL ends the ServerApp's pull gets flwr's own error
    reply for it, as it would for a message nobody answered."""
    from flwr.common.serde import message_from_proto

    message, _session_id, _to_push = _push_instruction(link)
    assert _fleet_pull(link) == []
    assert _runtime_pull(link, [message.object_id]) == []  # no reply, not expired yet
    _expire(link, message.object_id)
    assert _fleet_pull(link) == []
    (error,) = [message_from_proto(m) for m in _runtime_pull(link, [message.object_id])]
    assert error.has_error() and error.metadata.reply_to_message_id == message.object_id
    assert error.error.code == flwr_internals.ERROR_MESSAGE_UNAVAILABLE


def test_a_reply_whose_objects_never_come_ends_by_flowers_ttl_expiry_of_its_instruction(link: Link) -> None:
    from flwr.common.serde import message_from_proto

    message, session_id, to_push = _push_instruction(link)
    _push_objects(link, message, session_id, to_push)
    (instruction,) = _fleet_pull(link)
    _push_reply(link, instruction)
    assert _runtime_pull(link, [message.object_id]) == []  # held back: objects missing
    _expire(link, message.object_id)
    replies = [message_from_proto(m) for m in _runtime_pull(link, [message.object_id])]
    assert len(replies) == 1 and replies[0].metadata.reply_to_message_id == message.object_id
    assert replies[0].has_error()  # flwr's expiry, not the reply without its objects


def test_a_poll_after_a_restart_registers_the_incomplete_message_and_is_woken_by_its_objects(
        link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process's watch knows nothing of messages stored before: a poll that finds one
    incomplete starts watching it, and an object committed meanwhile is not lost (log replay)."""
    message, _session_id, to_push = _push_instruction(link)
    assert link.watch is not None
    fresh = superlink_delivery.DeliveryWatch(link.woken.append)
    link.watch.discard([message.object_id])
    # what the fresh process's watch would have seen: nothing; poll-time registration replays
    since = fresh.seq()
    fresh.objects_committed([to_push[0]])  # committed between the poll's read and its registration
    assert fresh.register(message.object_id, ("node", link.node_id), set(to_push), since)
    assert fresh.waiting(message.object_id)
    fresh.objects_committed(to_push[1:])
    assert not fresh.waiting(message.object_id) and link.woken == [("node", link.node_id)]


def test_a_registration_older_than_the_commit_log_does_not_hold_a_message_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(superlink_delivery, "LOG_MAX", 4)
    watch = superlink_delivery.DeliveryWatch(lambda _key: None)
    watch._log = type(watch._log)(maxlen=4)
    since = watch.seq()
    watch.objects_committed([f"o{i}" for i in range(10)])
    assert not watch.register("m", ("node", 1), {"x"}, since)  # cannot tell: hand it out


def _pull_request(link: Link) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    return PullMessagesRequest(node=Node(node_id=link.node_id)).SerializeToString(), _headers(link.key,
                                                                                             link.public_key)


def _http_pull(link: Link) -> tuple[int, bytes]:
    body, headers = _pull_request(link)
    return asyncio.run(call(link.app, "/v1/fleet/pull-messages", body, headers))


def _ids(body: bytes) -> list[str]:
    from flwr.proto.fleet_pb2 import PullMessagesResponse

    return [m.metadata.message_id for m in PullMessagesResponse.FromString(body).messages_list]


def test_an_idle_node_stays_idle_until_its_message_is_deliverable(link: Link) -> None:
    """Through the SuperLink's HTTP app: a message stored with objects still to come does not end
    the node's known idleness (its polls answered early, no database); its last object does."""
    from tests.federated.test_superlink_patches import _shortcut

    assert _http_pull(link)[0] == 200  # full path: idle
    message, session_id, to_push = _push_instruction(link)
    assert link.tracker.idle_key(link.node_id) == link.public_key  # stored quietly
    _push_objects(link, message, session_id, to_push[:-1])
    status, body = _http_pull(link)
    assert status == 200 and _ids(body) == []
    assert (_shortcut(link.app).answered_early, _shortcut(link.app).full_path) == (1, 1)
    _push_objects(link, message, session_id, to_push[-1:])
    assert link.tracker.idle_key(link.node_id) is None
    status, body = _http_pull(link)
    assert status == 200 and _ids(body) == [message.object_id]
    assert _shortcut(link.app).full_path == 2


def test_a_full_poll_that_finds_the_message_incomplete_leaves_the_node_idle(link: Link) -> None:
    """After a restart (nothing known) or a recheck, the full poll finds the message incomplete:
    empty, the node idle again, and woken by the last object."""
    message, session_id, to_push = _push_instruction(link)
    status, body = _http_pull(link)  # a fresh process: full path
    assert status == 200 and _ids(body) == []
    assert link.tracker.idle_key(link.node_id) == link.public_key
    _push_objects(link, message, session_id, to_push)
    assert link.tracker.idle_key(link.node_id) is None
    assert _ids(_http_pull(link)[1]) == [message.object_id]


#: a hang guard only: a held poll that is never woken would wait out its 600 s hold
GUARD_S = 120.0


def test_a_held_poll_is_woken_by_the_last_object_not_by_the_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = _link(tmp_path, monkeypatch, hold_s=600.0)
    assert _http_pull(link)[0] == 200  # full path: idle
    from tests.federated.test_superlink_patches import _shortcut, _until

    shortcut = _shortcut(link.app)
    pushed: dict[str, Any] = {}

    async def go() -> tuple[bool, bool, tuple[int, bytes]]:
        body, headers = _pull_request(link)
        poll = asyncio.create_task(call(link.app, "/v1/fleet/pull-messages", body, headers))
        await _until(lambda: shortcut.hold.holding == 1)
        message, session_id, to_push = await asyncio.to_thread(_push_instruction, link)
        pushed["id"] = message.object_id
        await asyncio.sleep(0.1)  # let a (wrong) wake-up run
        held_through_the_message = not poll.done()
        await asyncio.to_thread(_push_objects, link, message, session_id, to_push[:-1])
        await asyncio.sleep(0.1)
        held_through_the_first_objects = not poll.done()
        await asyncio.to_thread(_push_objects, link, message, session_id, to_push[-1:])
        return held_through_the_message, held_through_the_first_objects, await asyncio.wait_for(poll, GUARD_S)

    held_message, held_objects, (status, body) = asyncio.run(go())
    assert held_message and held_objects
    assert status == 200 and _ids(body) == [pushed["id"]]
    assert shortcut.hold.held == 1 and shortcut.hold.woken == 1


def test_the_setting_is_validated_by_name() -> None:
    with pytest.raises(ValueError, match="superlink_deliver_complete"):
        RuntimeSettings(superlink_deliver_complete="yes")  # type: ignore[arg-type]
    assert RuntimeSettings().superlink_deliver_complete is False  # off until a quiet A/B shows it


def test_unavailable_object_pulls_are_counted_per_api(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.proto.message_pb2 import PullObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    monkeypatch.setattr(fleet_handlers, "pull_object", fleet_handlers.pull_object)
    monkeypatch.setattr(runtime_handlers, "pull_object", runtime_handlers.pull_object)
    counts: dict[str, int] = {}
    superlink_delivery.count_unavailable_object_pulls(counts)
    message, session_id, to_push = _push_instruction(link)
    request = PullObjectRequest(node=Node(node_id=link.node_id), run_id=link.run_id, object_id=to_push[0])
    assert not fleet_handlers.pull_object(request, link.state).object_available
    _push_objects(link, message, session_id, to_push)
    assert fleet_handlers.pull_object(request, link.state).object_available
    assert counts == {superlink_delivery.UNAVAILABLE_PREFIX + "/v1/fleet/pull-object": 1}


def test_a_message_is_held_back_at_most_hold_max_s_then_handed_out_as_flower_does(
        link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound on the delay, should an object's arrival never be seen: past `HOLD_MAX_S` after its
    store the message goes out incomplete, as flwr hands it out (the node's pulls back off)."""
    message, _session_id, to_push = _push_instruction(link)
    assert _fleet_pull(link) == []
    monkeypatch.setattr(superlink_delivery, "HOLD_MAX_S", 0.0)
    assert [m.metadata.message_id for m in _fleet_pull(link)] == [message.object_id]
    assert link.state.get_object(link.run_id, to_push[0]) == b""
