"""`superlink_delivery`: no message is held back longer than a bound, whatever becomes of the
delivery watch's wake (issues 15 and 20, the 180 s stall seen once with delivery on).

A message stored with objects still to come is stored "quietly": its receiver stays known idle,
its polls answered early without the database, until the watch wakes it at the last object's
commit. Should that wake never come (the watch's entry dropped, the wake lost), only the idle
entry's lapse (`superlink_idle_recheck`, up to 60 s; 30 s here) let a poll reach the database,
and `HOLD_MAX_S` applied no sooner. Now each receiver with a message held back is looked at in
the database within `RECHECK_FIRST_S` of the store, then after as long as the message has waited
(`DeliveryWatch.schedule` / `due`, `flwr_internals.set_recheck_due`). Also shown: the paths that
do wake (an object shared with another message's push, an object there before the message)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals, superlink_delivery
from tests.federated.test_superlink_delivery import (
    Link,
    _fleet_pull,
    _http_pull,
    _ids,
    _link,
    _objects,
    _push_instruction,
    _push_objects,
    _push_reply,
    _runtime_pull,
)

FIRST_S = 0.3  # RECHECK_FIRST_S in these tests (the idle entries vouch 30 s: `_link`)


@pytest.fixture
def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Link:
    monkeypatch.setattr(superlink_delivery, "RECHECK_FIRST_S", FIRST_S)
    return _link(tmp_path, monkeypatch)


def _lose_wakes(link: Link, how: str, monkeypatch: pytest.MonkeyPatch, message_id: str) -> None:
    """Make the watch fail to wake the receiver: its entry dropped (`_drop_old`, as after
    `WAIT_MAX_S`), or its wake call lost."""
    assert link.watch is not None
    if how == "entry dropped":
        monkeypatch.setattr(superlink_delivery, "WAIT_MAX_S", -1.0)
        link.watch._drop_old()
        assert not link.watch.waiting(message_id)
    else:
        monkeypatch.setattr(link.watch, "_wake", lambda _key: None)


def _poll_until_delivered(link: Link, limit_s: float) -> tuple[list[str], float]:
    """The node's polls through the SuperLink's HTTP app, every 0.05 s, until one brings a
    message or `limit_s` passed: (the ids delivered, seconds it took)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        status, body = _http_pull(link)
        assert status == 200
        if _ids(body):
            return _ids(body), time.monotonic() - started
        time.sleep(0.05)
    return [], time.monotonic() - started


@pytest.mark.parametrize("how", ["entry dropped", "wake lost"])
def test_a_complete_message_whose_wake_never_comes_reaches_its_idle_node_within_the_first_look(
        link: Link, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    assert _http_pull(link)[0] == 200  # full path: the node is known idle (for 30 s)
    message, session_id, to_push = _push_instruction(link)
    _lose_wakes(link, how, monkeypatch, message.object_id)
    stored = time.monotonic()
    _push_objects(link, message, session_id, to_push)  # complete, and nobody told the node
    assert link.woken == []
    delivered, _ = _poll_until_delivered(link, limit_s=5.0)  # before: idle for 30 s, nothing
    assert delivered == [message.object_id]
    assert time.monotonic() - stored < FIRST_S + 2.0


def test_a_message_whose_objects_never_come_goes_out_at_hold_max_s_though_its_node_is_idle(
        link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    """`HOLD_MAX_S` is a bound only if a poll reaches the database: a node kept idle by its
    quiet message did not, until its idle entry lapsed."""
    monkeypatch.setattr(superlink_delivery, "HOLD_MAX_S", 1.0)
    assert _http_pull(link)[0] == 200
    message, _session_id, to_push = _push_instruction(link)
    delivered, took = _poll_until_delivered(link, limit_s=6.0)
    assert delivered == [message.object_id]  # incomplete, as flwr hands it out
    assert took < 1.0 + 2.0
    assert link.state.get_object(link.run_id, to_push[0]) == b""


def test_the_looks_back_off_while_the_message_waits_and_stop_once_it_is_out(link: Link) -> None:
    """A look that still holds the message back schedules the next after as long as it has
    waited (at least `RECHECK_FIRST_S`); the look that delivers it schedules none."""
    assert link.watch is not None
    key = ("node", link.node_id)
    message, session_id, to_push = _push_instruction(link)
    assert link.watch.due(key) - time.monotonic() == pytest.approx(FIRST_S, abs=0.2)
    time.sleep(0.8)
    assert _fleet_pull(link) == []  # waited ~0.8 s: the next look in ~0.8 s
    assert link.watch.due(key) - time.monotonic() == pytest.approx(0.8, abs=0.3)
    _push_objects(link, message, session_id, to_push)
    assert [m.metadata.message_id for m in _fleet_pull(link)] == [message.object_id]
    assert link.watch.due(key) == float("inf")


def test_an_idle_entry_and_a_held_poll_vouch_no_longer_than_the_due_look() -> None:
    tracker = flwr_internals.PendingTracker(30.0)
    due = {("node", 7): time.monotonic() + 0.2}
    tracker.mark_idle(7, tracker.generation(7), b"key")
    flwr_internals.set_recheck_due(lambda key: due.get(key, float("inf")))
    try:
        assert tracker.idle_key(7) == b"key"
        time.sleep(0.25)
        assert tracker.idle_key(7) is None  # 30 s were vouched; the look was due
    finally:
        flwr_internals.set_recheck_due(None)
    with pytest.raises(ValueError, match="kind"):
        flwr_internals.PendingTracker(1.0, kind="nodes")  # type: ignore[arg-type]


def test_a_reply_held_back_makes_its_run_due_for_a_look(link: Link) -> None:
    """The ServerApp's side: a reply stored with objects to come, then a pull that holds it
    back, each schedule a look at the run's replies; the run's idle entry ends by then."""
    assert link.watch is not None
    key = ("run", link.run_id)
    message, session_id, to_push = _push_instruction(link)
    _push_objects(link, message, session_id, to_push)
    (instruction,) = _fleet_pull(link)
    link.run_tracker.mark_idle(link.run_id, link.run_tracker.generation(link.run_id), b"pull")
    _push_reply(link, instruction)
    assert link.watch.due(key) < time.monotonic() + FIRST_S + 0.1  # at the store's commit
    assert _runtime_pull(link, [message.object_id]) == []  # held back: scheduled again
    assert link.watch.due(key) < time.monotonic() + FIRST_S + 0.1
    time.sleep(FIRST_S + 0.05)
    assert link.run_tracker.idle_key(link.run_id) is None


def test_an_object_pushed_for_another_message_counts_for_both(link: Link) -> None:
    """Two messages for the node sharing an object, stored by two pushes: the object pushed in
    the second push's session completes the first too, which is woken at its own last object."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    first, first_session, first_push = _push_instruction(link)
    shared = first.content["global"]
    assert isinstance(shared, ArrayRecord)
    second = _store(link, Message(RecordDict({"global": shared, "config": ConfigRecord({"n": 2})}),
                                  dst_node_id=link.node_id, message_type="train", group_id="2", ttl=600.0))
    second_id, second_session, second_push = second
    shared_ids = set(first_push) & set(second_push)
    assert shared_ids  # the array record and its array: to push in both sessions
    assert link.watch is not None and link.watch.waiting(first.object_id)
    _push_objects(link, _message_of(link, second_id), second_session, second_push)
    assert link.woken == [("node", link.node_id)]  # the second, complete
    _push_objects(link, first, first_session, [o for o in first_push if o not in shared_ids])
    assert link.woken == [("node", link.node_id)] * 2  # the first: its other objects were the last
    delivered = [m.metadata.message_id for m in _fleet_pull(link) + _fleet_pull(link)]
    assert sorted(delivered) == sorted([first.object_id, second_id])


def test_a_message_whose_content_was_there_before_it_waits_for_its_own_object_only(link: Link) -> None:
    from flwr.app import Message

    first, first_session, first_push = _push_instruction(link)
    _push_objects(link, first, first_session, first_push)
    assert [m.metadata.message_id for m in _fleet_pull(link)] == [first.object_id]
    again = Message(first.content, dst_node_id=link.node_id, message_type="train", group_id="2", ttl=600.0)
    again_id, session_id, to_push = _store(link, again)
    assert to_push == [again_id]  # its content is there: only the message object to push
    assert _fleet_pull(link) == []
    _push_objects(link, again, session_id, to_push)
    assert link.woken[-1] == ("node", link.node_id)
    assert [m.metadata.message_id for m in _fleet_pull(link)] == [again_id]


_messages: dict[str, Any] = {}


def _store(link: Link, message: Any) -> tuple[str, str, list[str]]:
    """The ServerApp's `PushMessages` of `message` (flwr's Runtime handler)."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.superlink.servicer.runtime import runtime_handlers

    flwr_internals.set_task_identity(1, link.run_id, 1)
    flwr_internals.stamp_metadata(message.metadata, message_id=message.object_id)
    request = PushAppMessagesRequest(messages_list=[message_to_proto(remove_content_from_message(message))],
                                     message_object_trees=[get_object_tree(message)])
    response = runtime_handlers.push_messages(request, link.state, Task(run_id=link.run_id))
    assert list(response.message_ids) == [message.object_id]
    _messages[message.object_id] = message
    assert set(response.objects_to_push) <= set(_objects(message))
    return message.object_id, response.session_id, list(response.objects_to_push)


def _message_of(_link: Link, message_id: str) -> Any:
    return _messages[message_id]
