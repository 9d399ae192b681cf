"""The warm executor's Runtime API calls answered in process (`flwr_internals.InProcessRuntimeClient`):
in `hosted_supernode` the executor is a thread of the SuperNode's process, so its claims and task
calls go to the SuperNode's own handlers and state, not over loopback HTTP (docs/flower.md)."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest

from federated.runtime import flwr_internals

#: nothing listens here: a call that still went over HTTP would fail
NOWHERE = "127.0.0.1:1"
RUN_ID, NODE_ID = 5, 7


def _node_state_with_one_task() -> tuple[Any, Any]:
    """A SuperNode's state as its loop leaves it when a message arrived: the run, its FAB, the
    node's context, the message and its objects, a pending ClientApp task."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.constant import TaskType
    from flwr.supercore.fab import Fab
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.supernode.start_client_internal import _insert_message

    from federated.runtime.server_runner import build_fab

    state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
    state.set_node_id(NODE_ID)
    fab, sha = build_fab()
    state.store_run(dataclasses.replace(Run.create_empty(RUN_ID), fab_hash=sha,
                                        primary_task_type=TaskType.CLIENT_APP, series_id=RUN_ID))
    state.store_fab(Fab(hash_str=sha, content=fab, verifications={}))
    state.set_run_series_context(RUN_ID, Context(run_id=RUN_ID, node_id=NODE_ID, node_config={},
                                                 state=RecordDict(), run_config={}))
    flwr_internals.set_task_identity(0, RUN_ID, 0)
    message = Message(RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=NODE_ID, message_type="query")
    _insert_message(message, state, state.object_store)
    assert state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=sha) is not None
    return state, message


def test_the_executor_runs_a_task_through_the_supernode_state_in_process() -> None:
    """Claim, input, the message's objects, the reply and its objects, the output: all through
    the state, with no Runtime API listening."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from federated.runtime.executor import WarmExecutor

    state, sent = _node_state_with_one_task()
    executor = WarmExecutor(NOWHERE, in_process=True)
    executor._state = state
    seen: list[Any] = []

    def answer(message: Message, context: Any) -> Message:
        seen.append((dict(message.content.config_records["ask"]), context.node_id))
        return Message(RecordDict({"reply": ConfigRecord({"ok": 1})}), reply_to=message)

    executor._client_app = answer  # type: ignore[assignment]
    claim = flwr_internals.TaskQueue(NOWHERE, "clientapp", state=state).acquire()
    assert claim is not None and claim.run_id == RUN_ID
    executor.run_task(claim.token)

    assert seen == [({"x": 1}, NODE_ID)]
    assert executor.stats.tasks == 1 and executor.stats.failed == 0
    replies = state.get_messages_legacy(run_ids=[RUN_ID], is_reply=True, limit=5)
    assert len(replies) == 1 and replies[0].metadata.reply_to_message_id == sent.metadata.message_id
    # the reply's objects are all in the store, whence the SuperNode's loop sends them on
    tree = state.object_store.get_object_tree(replies[0].metadata.message_id)
    contents = [state.object_store.get(node.object_id) for node in _walk(tree)]
    assert len(contents) >= 3 and all(contents)  # message, record dict, config record
    assert any(b"reply" in content for content in contents)
    # the task is finished: its token is spent, nothing more to claim
    assert state.get_task_by_token(claim.token) is None
    assert flwr_internals.TaskQueue(NOWHERE, "clientapp", state=state).acquire() is None


def _walk(tree: Any) -> list[Any]:
    return [tree, *(node for child in tree.children for node in _walk(child))]


def test_a_task_call_needs_the_token_of_a_claimed_task() -> None:
    """As the HTTP route's task-token check (a 401 there): an unknown or spent token is refused
    for every task call, and the task heartbeat only says False (flwr would SIGINT)."""
    from flwr.proto.message_pb2 import PullObjectRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.error import ApiErrorCode, FlowerError

    state, _ = _node_state_with_one_task()
    for token in ("not-a-token", None):
        client = flwr_internals.InProcessRuntimeClient(state, token=token)
        for call, request in ((client.PullTaskInput, PullTaskInputRequest()),
                              (client.PullMessages, PullAppMessagesRequest()),
                              (client.PullObject, PullObjectRequest()),
                              (client.PushTaskOutput, PushTaskOutputRequest())):
            with pytest.raises(FlowerError) as raised:
                call(request)
            assert raised.value.code == ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED
        assert flwr_internals.task_heartbeat_fn(client)() is False
    # the pending task was not touched by any of that
    assert flwr_internals.TaskQueue(NOWHERE, "clientapp", state=state).acquire() is not None


def test_the_executor_finds_the_state_of_the_supernode_flwr_starts_in_this_process() -> None:
    """`capture_supernode_state` hands out the one state flwr's `flower_supernode` builds (a local
    of that function) to the executor thread (`supernode_state`)."""
    from flwr.supercore.object_store import ObjectStoreFactory

    module = importlib.import_module("flwr.supernode.cli.flower_supernode")
    original = module.NodeStateFactory
    try:
        flwr_internals.capture_supernode_state()
        flwr_internals.capture_supernode_state()  # once only
        assert module.NodeStateFactory.__mro__[1] is original
        factory = module.NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        assert flwr_internals.supernode_state(timeout=0) is factory.state()
    finally:
        module.NodeStateFactory = original
