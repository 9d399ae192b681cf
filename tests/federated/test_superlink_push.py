"""The ServerApp's `PushMessages` on flwr's real SuperLink handler and SQLite LinkState, with
`flwr_internals.patch_superlink_push_one_transaction`: a round's messages (one per hospital,
their content shared) are stored in one write transaction, not one per message plus one for
the push session; their shared content is preregistered once, not walked again for every
message; and they are stored as flwr stores them (each node gets its message with its whole
object tree; the shared objects are asked for once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federated.runtime import flwr_internals
from federated.runtime.settings import disable_phone_home


@pytest.fixture
def superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """flwr's SuperLink state on its own SQLite file, with three active nodes and a run."""
    disable_phone_home()
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    from flwr.superlink.servicer.runtime import runtime_handlers

    # as a fresh SuperLink process: flwr's handler, whatever an earlier test patched
    monkeypatch.setattr(runtime_handlers, "push_messages", runtime_handlers.push_messages)
    import flwr.superlink.main as superlink_main
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    state = superlink_main.create_app().state.linkstate_factory.state()
    nodes = []
    for _ in range(5):
        _, public_key = generate_key_pairs()
        node_id = state.create_node(NOOP_FLWR_AID, "noop", public_key_to_bytes(public_key), 30)
        state.activate_node(node_id, 30)
        nodes.append(int(node_id))
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    state.test_nodes, state.test_run_id = nodes, run_id
    yield state


def _push(state: Any, round_: int) -> tuple[Any, int, int, dict[str, Any]]:
    """One PushMessages of a round's messages (shared content) through flwr's Runtime handler:
    the response, the transactions committed and the statements run on the LinkState's engine,
    and each message's object tree by message id."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.superlink.servicer.runtime import runtime_handlers
    from sqlalchemy import event

    flwr_internals.set_task_identity(1, state.test_run_id, 1)
    content = RecordDict({"global": ArrayRecord({"weights": Array(np.full(4, float(round_)))})})
    messages = []
    for node_id in state.test_nodes:
        message = Message(content=content, dst_node_id=node_id, message_type="train", group_id=str(round_))
        message.metadata.__dict__["_message_id"] = message.object_id
        messages.append(message)
    request = PushAppMessagesRequest(
        messages_list=[message_to_proto(remove_content_from_message(m)) for m in messages],
        message_object_trees=[get_object_tree(m) for m in messages])

    commits: list[int] = []
    statements: list[int] = []

    def count(_connection: Any) -> None:
        commits.append(1)

    def count_statement(*_args: Any) -> None:
        statements.append(1)

    event.listen(state._engine, "commit", count)
    event.listen(state._engine, "before_cursor_execute", count_statement)
    try:
        response = runtime_handlers.push_messages(request, state, Task(run_id=state.test_run_id))
    finally:
        event.remove(state._engine, "commit", count)
        event.remove(state._engine, "before_cursor_execute", count_statement)
    return response, len(commits), len(statements), {m.object_id: get_object_tree(m) for m in messages}


def test_a_rounds_messages_are_stored_in_one_transaction_their_shared_content_once(superlink: Any) -> None:
    unpatched, commits_before, statements_before, _ = _push(superlink, 1)
    assert commits_before == len(superlink.test_nodes) + 1  # flwr: the session, then one per message
    flwr_internals.patch_superlink_push_one_transaction()
    patched, commits_after, statements_after, trees = _push(superlink, 2)
    assert commits_after == 1
    # flwr walked the shared content (record dict, array record, array) again per message
    assert statements_after < 0.6 * statements_before, (statements_before, statements_after)
    # stored as flwr stores them: every message, the shared objects asked for once
    assert all(patched.message_ids) and len(patched.message_ids) == len(superlink.test_nodes)
    assert len(patched.objects_to_push) == len(unpatched.objects_to_push)
    assert len(set(patched.objects_to_push)) == len(patched.objects_to_push)
    for message_id, tree in trees.items():  # each message's whole tree, as the node will pull it
        assert superlink.object_store.get_object_tree(message_id) == tree
    for node_id in superlink.test_nodes:
        delivered = superlink.get_message_ins(node_id=node_id, limit=None)
        assert {m.metadata.group_id for m in delivered} == {"1", "2"}


def test_a_heartbeat_for_a_finished_task_does_not_interrupt_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """flwr's task heartbeat raises SIGINT in its process when the Runtime API answers that the
    task is gone: right for a flwr-clientapp process of its own, fatal for a hospital's hosted
    Flower process (SuperNode and warm executor in one) when the heartbeat races the task's end
    (a 25-hospital round lost a hospital that way). Ours says False instead."""
    import signal

    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse
    from flwr.supercore.heartbeat import make_task_heartbeat_fn_http

    interrupts: list[int] = []
    monkeypatch.setattr(signal, "raise_signal", interrupts.append)

    class FinishedTask:  # the Runtime API's answer once the task's token is spent
        def SendTaskHeartbeat(self, _request: Any) -> SendTaskHeartbeatResponse:
            return SendTaskHeartbeatResponse(success=False)

    make_task_heartbeat_fn_http(FinishedTask())()  # type: ignore[arg-type]
    assert interrupts == [signal.SIGINT]  # flwr's
    interrupts.clear()
    assert flwr_internals.task_heartbeat_fn(FinishedTask())() is False
    assert interrupts == []


def test_a_401_on_a_task_call_gives_up_instead_of_interrupting_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """flwr's HTTP retry invoker answers a 401 (a spent task token: the heartbeat that outlived
    its task) with SIGINT to its own process, which for the warm executor is the hospital's
    whole Flower process. The task clients we build give up instead: the error reaches the
    call, the process stays up."""
    import os
    import signal

    import httpx
    from flwr.supercore.retry import http_retry

    interrupts: list[int] = []
    monkeypatch.setattr(os, "kill", lambda _pid, signum: interrupts.append(signum))
    monkeypatch.setattr(http_retry.time, "sleep", lambda _s: None)
    request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/send-task-heartbeat")
    spent = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))

    flower = http_retry.make_simple_http_retry_invoker()
    assert flower.should_giveup is not None
    flower.should_giveup(spent)
    assert interrupts == [signal.SIGINT]  # flwr's
    interrupts.clear()

    client = flwr_internals._runtime_http_client("127.0.0.1:1", insecure=True, root_certificates=None,
                                                 component="flwr-clientapp", token="spent")
    try:
        ours = client._retry_invoker
        assert ours.should_giveup(spent) is True
        assert interrupts == []
    finally:
        client.close()
