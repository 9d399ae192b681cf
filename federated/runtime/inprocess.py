"""An in-process Flower grid for fast tests of the ServerApp and ClientApp logic.

`InProcessGrid` implements Flower's `Grid` interface by calling the real `ClientApp` object
(`federated.client_app.app`) in this process for every message, one Context per simulated node
(with that hospital's node config). No SuperLink, no SuperNode, no HTTP: the same message
contents and the same ServerApp code path (`run_study_rounds`) as the deployment, in a fraction
of the time. What it does NOT cover (timeouts of real processes, serialisation over HTTP, Flower's
own error replies) is covered by the deployment tests in tests/federated/test_flower_deployment.py.

A ClientApp that raises (a SecAgg+ share that does not decrypt, a broken site) gets Flower's
CLIENT_APP_RAISED_EXCEPTION error reply, as from the warm executor, and counts as dropped.
A node can be made to drop out: `drop(node_id)` makes it stop answering (its messages then time
out at the server, as a killed SuperNode's would). `restart(node_id)` models a restarted SuperNode:
the hospital comes back under a NEW node id while the old id stays listed and answers nothing (or
Flower's NODE_UNAVAILABLE error reply), as at a real SuperLink for ~40 s;
`restart_when_messaged(node_id, message_type)` does that the moment such a message arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from federated.runtime import flwr_internals


def _node_unavailable() -> Error:
    """The error reply a SuperLink gives for a message to a node id that is gone."""
    return Error(code=flwr_internals.ERROR_NODE_UNAVAILABLE, reason="Error: Node Unavailable")


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, node_configs: Mapping[int, Mapping[str, Any]], run_config: Mapping[str, Any],
                 client_app: Any = None, run_id: int = 1) -> None:
        if client_app is None:
            from federated.client_app import app as client_app
        self.client_app = client_app
        self.run_id = run_id
        self.contexts = {node: Context(run_id=run_id, node_id=node, node_config=dict(cfg), state=RecordDict(),
                                       run_config=dict(run_config))
                         for node, cfg in node_configs.items()}
        self.dropped: set[int] = set()
        #: old node id of a restarted node -> whether messages to it get a NODE_UNAVAILABLE error
        self.stale: dict[int, bool] = {}
        self._restart_on: dict[tuple[int, str], bool] = {}
        self._same_id: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._run: Any = None
        self.pushed: list[Message] = []
        # Messages take their run and sender from the process's task identity, which the real
        # runner sets from the ServerApp task it claimed.
        flwr_internals.set_task_identity(task_id=1, run_id=run_id, node_id=0)

    # -- what tests control -------------------------------------------------------------------
    def drop(self, node_id: int) -> None:
        """The node stops answering (and disappears from get_node_ids)."""
        self.dropped.add(node_id)

    def restart(self, node_id: int, *, error: bool = False) -> int:
        """The node's SuperNode restarts: the same hospital under a new node id (returned)."""
        old = self.contexts[node_id]
        new = max(self.contexts) + 1
        self.contexts[new] = Context(run_id=self.run_id, node_id=new, node_config=dict(old.node_config),
                                     state=RecordDict(), run_config=dict(old.run_config))
        self.stale[node_id] = error
        return new

    def restart_when_messaged(self, node_id: int, message_type: str, *, error: bool = False,
                              same_id: bool = False) -> None:
        """Restart the node when its next `message_type` message arrives (that message is lost).
        `same_id`: as with SuperNode authentication, the node comes back under the same id and
        the lost message gets Flower's NODE_UNAVAILABLE error reply."""
        self._restart_on[(node_id, message_type)] = error
        if same_id:
            self._same_id.add(node_id)

    # -- Grid -----------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dropped]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            flwr_internals.stamp_metadata(message.metadata, message_id=message.object_id, run_id=self.run_id)
            self.pushed.append(message)
            node = message.metadata.dst_node_id
            ids.append(message.metadata.message_id)
            restart = self._restart_on.pop((node, message.metadata.message_type), None)
            if restart is not None and node in self._same_id:
                self._same_id.discard(node)
                old = self.contexts[node]
                self.contexts[node] = Context(run_id=self.run_id, node_id=node, state=RecordDict(),
                                              node_config=dict(old.node_config),
                                              run_config=dict(old.run_config))
                error = _node_unavailable()
                self._replies[message.metadata.message_id] = Message(error, reply_to=message)
                continue
            if restart is not None:
                self.restart(node, error=restart)
            if node in self.stale:
                if self.stale[node]:
                    error = _node_unavailable()
                    self._replies[message.metadata.message_id] = Message(error, reply_to=message)
                continue
            if node in self.dropped or node not in self.contexts:
                continue
            try:
                reply = self.client_app(message=message, context=self.contexts[node])
            except Exception as exc:  # as the warm executor does: an error reply, not a crashed study
                error = Error(code=flwr_internals.ERROR_CLIENT_APP_RAISED_EXCEPTION,
                              reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=message)
            flwr_internals.stamp_metadata(reply.metadata, message_id=reply.object_id)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))
