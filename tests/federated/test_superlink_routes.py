"""`superlink_routes.patch_superlink_routes`: the SuperLink's hot routes (a message's object
pushes, pulls and receipt confirmations; the SuperNodes' polls, reply pushes and heartbeats; the
ServerApp's message pushes, reply pulls, node lists and task heartbeats) answered by flwr's own
route functions outside FastAPI's middleware and routing, on flwr's real SuperLink app and SQLite
LinkState, driven by raw ASGI requests signed as a SuperNode signs them (or carrying a task's
token, as the ServerApp's do). What must not change: every reply and every refusal is byte for
byte what flwr's full path answers, on an app built without the patch from the same requests
(and, where replies carry ids, on a copy of the same database)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals, superlink_routes
from federated.runtime.settings import disable_phone_home
from tests.bench.bench_superlink_requests import _headers, call


@dataclass
class Link:
    app: Any
    state: Any
    node_id: int
    key: Any
    public_key: bytes
    run_id: int
    token: str
    session_id: str
    contents: dict[str, bytes]  # preregistered, not yet pushed: object id -> content

    def fleet(self, path: str, body: bytes,
              headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
        return asyncio.run(call(self.app, f"/v1/fleet/{path}", body,
                                headers if headers is not None else _headers(self.key, self.public_key)))

    def runtime(self, path: str, body: bytes, token: str | None = None) -> tuple[int, bytes]:
        from flwr.supercore.constant import TASK_TOKEN_HEADER

        headers = [(b"content-type", b"application/protobuf"),
                   (TASK_TOKEN_HEADER.encode(), (self.token if token is None else token).encode())]
        return asyncio.run(call(self.app, f"/v1/runtime/{path}", body, headers))


def _app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, routes: bool, *,
         routes_first: bool = False) -> Any:
    """flwr's SuperLink app with the fast mode's middleware patches (and the hot routes, applied
    after the idle-poll shortcuts or, `routes_first`, before them; or not) on the database
    `name`.db."""
    disable_phone_home()
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / f"{name}.db"))
    if routes and routes_first:
        superlink_routes.patch_superlink_routes()
    flwr_internals.patch_superlink_middleware()
    flwr_internals.patch_superlink_idle_pulls(recheck_s=30.0)
    if routes:
        superlink_routes.patch_superlink_routes()
        superlink_routes.patch_superlink_routes()  # idempotent
    app = superlink_main.create_app()
    monkeypatch.undo()  # the next app is built from flwr's own middleware list again
    return app


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, object_routes: bool, *,
           routes_first: bool = False) -> Link:
    """`_app` with one active node and a running run with 8 objects preregistered for a push:
    the same for every call, so two apps can be compared."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    app = _app(tmp_path, monkeypatch, name, object_routes, routes_first=routes_first)
    state = app.state.linkstate_factory.state()
    private_key, public_key = generate_key_pairs()
    pk = public_key_to_bytes(public_key)
    node_id = int(state.create_node("noop", "noop", pk, 0))
    state.activate_node(node_id, 30)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    token = state.claim_task(task_id)
    state.activate_task(task_id)
    content = RecordDict({f"r{i}": ConfigRecord({"i": i}) for i in range(8)})
    objects = get_all_nested_objects(content)
    session_id = state.start_session(run_id)
    missing = state.preregister_object_tree(get_object_tree(content), session_id)
    contents = {oid: objects[oid].deflate() for oid in missing if oid != content.object_id}
    return Link(app, state, node_id, private_key, pk, int(run_id), str(token), session_id, contents)


@pytest.fixture
def links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Link, Link]]:
    """(flwr's full path, the object routes), built alike."""
    with monkeypatch.context() as m:
        full = _build(tmp_path, m, "full", object_routes=False)
    with monkeypatch.context() as m:
        fast = _build(tmp_path, m, "fast", object_routes=True)
    yield full, fast


def _routes(app: Any) -> Any:
    """The `HotRoutes` instance in the app's built middleware stack (None: not there)."""
    layer = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = layer
    while layer is not None:
        if isinstance(layer, superlink_routes.HotRoutes):
            return layer
        layer = getattr(layer, "app", None)
    return None


@pytest.fixture
def layers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `BaseHTTPMiddleware` layers each request crossed (by dispatch name), in order."""
    from starlette.middleware.base import BaseHTTPMiddleware

    crossed: list[str] = []
    original = BaseHTTPMiddleware.__call__

    async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            crossed.append(getattr(self.dispatch_func, "__qualname__", type(self).__name__))
        await original(self, scope, receive, send)

    monkeypatch.setattr(BaseHTTPMiddleware, "__call__", counting)
    return crossed


def _push(link: Link, object_id: str) -> bytes:
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    return PushObjectRequest(node=Node(node_id=link.node_id), run_id=link.run_id, session_id=link.session_id,
                             object_id=object_id, object_content=link.contents[object_id]).SerializeToString()


def _pull(link: Link, object_id: str, node_id: int | None = None, run_id: int | None = None) -> bytes:
    from flwr.proto.message_pb2 import PullObjectRequest
    from flwr.proto.node_pb2 import Node

    return PullObjectRequest(node=Node(node_id=link.node_id if node_id is None else node_id),
                             run_id=link.run_id if run_id is None else run_id,
                             object_id=object_id).SerializeToString()


def _confirm(link: Link, object_id: str, node_id: int | None = None) -> bytes:
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.proto.node_pb2 import Node

    return ConfirmMessageReceivedRequest(node=Node(node_id=link.node_id if node_id is None else node_id),
                                         run_id=link.run_id, message_object_id=object_id).SerializeToString()


def test_a_messages_object_requests_cross_no_basehttpmiddleware_and_get_flowers_replies(
        links: tuple[Link, Link], layers: list[str]) -> None:
    full, fast = links
    ids = sorted(full.contents)
    assert ids == sorted(fast.contents) and len(ids) >= 4
    for link, expect_layers in ((full, 2), (fast, 0)):
        replies = []
        for oid in ids[:2]:  # a SuperNode pushes two, pulls them back, confirms one
            layers.clear()
            replies.append(link.fleet("push-object", _push(link, oid)))
            assert len(layers) == expect_layers, layers  # flwr's: error translator + protobuf translation
        for oid in ids[:2]:
            layers.clear()
            replies.append(link.fleet("pull-object", _pull(link, oid)))
            assert len(layers) == expect_layers, layers
        layers.clear()
        replies.append(link.fleet("confirm-message-received", _confirm(link, ids[0])))
        assert len(layers) == expect_layers, layers
        link.replies = replies  # type: ignore[attr-defined]
        link.stored = [link.state.get_object(link.run_id, oid) for oid in ids]  # type: ignore[attr-defined]
    assert fast.replies == full.replies  # type: ignore[attr-defined]
    assert fast.stored == full.stored  # type: ignore[attr-defined]  # what is stored is flwr's
    assert fast.stored[:2] == [fast.contents[oid] for oid in ids[:2]] and fast.stored[2] == b""  # type: ignore[attr-defined]
    from flwr.proto.message_pb2 import PullObjectResponse, PushObjectResponse

    assert all(PushObjectResponse.FromString(body).stored for _status, body in fast.replies[:2])  # type: ignore[attr-defined]
    pulled = PullObjectResponse.FromString(fast.replies[3][1])  # type: ignore[attr-defined]
    assert pulled.object_available and pulled.object_content == fast.contents[ids[1]]
    routes = _routes(fast.app)
    assert routes is not None and (sum(routes.answered.values()), routes.full_path) == (5, 0)
    assert _routes(full.app) is None


def test_the_servers_object_requests_are_answered_alike_with_its_token(links: tuple[Link, Link],
                                                                       layers: list[str]) -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID

    full, fast = links
    oid = sorted(full.contents)[0]
    for link in (full, fast):
        layers.clear()
        link.answers = [  # type: ignore[attr-defined]
            # preregistered, not pushed: found, not available
            link.runtime("pull-object", _pull(link, oid, node_id=SUPERLINK_NODE_ID)),
            link.runtime("pull-object", _pull(link, oid, node_id=7)),  # refused: not the SuperLink's node
            link.runtime("pull-object", _pull(link, oid, node_id=SUPERLINK_NODE_ID), token="not-a-token"),
            link.runtime("confirm-message-received", _confirm(link, "00" * 32, node_id=SUPERLINK_NODE_ID)),
        ]
        link.crossed = len(layers)  # type: ignore[attr-defined]
    assert fast.answers == full.answers  # type: ignore[attr-defined]
    statuses = [status for status, _body in fast.answers]  # type: ignore[attr-defined]
    assert statuses[0] == 200 and statuses[3] == 200
    assert statuses[1] >= 400 and statuses[2] in (401, 403)
    assert full.crossed == 8 and fast.crossed == 0  # type: ignore[attr-defined]
    assert sum(_routes(fast.app).answered.values()) == 4


def test_every_refusal_is_flowers_own(links: tuple[Link, Link]) -> None:
    """A bad signature (401), another node's id, a run that does not exist, a body that is not the
    protobuf, another media type: the same status and body as flwr's full path (the last two take
    that path: flwr's translation refuses them)."""
    from flwr.supercore.constant import FLEET_HTTP_SIGNATURE_HEADER

    full, fast = links
    oid = sorted(full.contents)[0]
    for link in (full, fast):
        good = _headers(link.key, link.public_key)
        signature = FLEET_HTTP_SIGNATURE_HEADER.encode()
        forged = [(k, v[:-8] + b"AAAAAAA=" if k == signature else v) for k, v in good]
        assert forged != good
        other_type = [(k, b"application/json" if k == b"content-type" else v) for k, v in good]
        link.refusals = [  # type: ignore[attr-defined]
            link.fleet("pull-object", _pull(link, oid), forged),
            link.fleet("pull-object", _pull(link, oid, node_id=link.node_id + 1)),
            link.fleet("pull-object", _pull(link, oid, run_id=link.run_id + 1)),
            link.fleet("push-object", b"\xff\xff not a protobuf"),
            link.fleet("pull-object", _pull(link, oid), other_type),
        ]
    assert fast.refusals == full.refusals  # type: ignore[attr-defined]
    statuses = [status for status, _body in fast.refusals]  # type: ignore[attr-defined]
    assert statuses[:2] == [401, 401] and all(status >= 400 for status in statuses), fast.refusals  # type: ignore[attr-defined]
    routes = _routes(fast.app)
    assert (sum(routes.answered.values()), routes.full_path) == (3, 2)


def test_a_fleet_event_log_plugin_gets_every_request(links: tuple[Link, Link]) -> None:
    """With flwr's Fleet event log on, its middleware must see the object requests: they take
    flwr's full path."""
    _full, fast = links
    routes = _routes(fast.app)
    fast.app.state.fleet_event_log_plugin = object()  # flwr's middleware acts only with one
    oid = sorted(fast.contents)[0]
    fast.fleet("pull-object", _pull(fast, oid))  # this stand-in plugin fails flwr's middleware: any reply
    assert (sum(routes.answered.values()), routes.full_path) == (0, 1)


# -- the rest of a round's traffic: polls, message pushes and pulls, heartbeats, node lists --------


@pytest.fixture
def twins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Link, Link]]:
    """(flwr's full path, the hot routes) on two copies of one database (same run, node, key and
    token), so that replies carrying ids and message contents compare byte for byte."""
    import dataclasses
    import sqlite3

    with monkeypatch.context() as m:
        full = _build(tmp_path, m, "full", object_routes=False)
    with sqlite3.connect(tmp_path / "full.db") as source, sqlite3.connect(tmp_path / "fast.db") as copy:
        source.backup(copy)
    with monkeypatch.context() as m:
        app = _app(tmp_path, m, "fast", routes=True)
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", full.run_id), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what `Message()` stamps (as in a ServerApp)
    yield full, dataclasses.replace(full, app=app, state=app.state.linkstate_factory.state())


def _instruction(link: Link) -> tuple[bytes, dict[str, bytes]]:
    """A ServerApp's `PushMessages` body for one message to the link's node, and its objects."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    message = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=link.node_id,
                      message_type="train", ttl=3600.0, group_id="1")
    flwr_internals.stamp_metadata(message.metadata, run_id=link.run_id)
    flwr_internals.stamp_metadata(message.metadata, message_id=message.object_id)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    body = PushAppMessagesRequest(messages_list=[message_to_proto(remove_content_from_message(message))],
                                  message_object_trees=[get_object_tree(message)]).SerializeToString()
    return body, objects


def _reply(link: Link, pulled: bytes) -> tuple[bytes, dict[str, bytes]]:
    """A SuperNode's `PushMessages` body replying to the message it pulled, and its objects."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    instruction = message_from_proto(PullMessagesResponse.FromString(pulled).messages_list[0])
    reply = Message(RecordDict({"metrics": ConfigRecord({"loss": 0.5})}), reply_to=instruction)
    flwr_internals.stamp_metadata(reply.metadata, message_id=reply.object_id)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
    body = PushMessagesRequest(node=Node(node_id=link.node_id),
                               messages_list=[message_to_proto(remove_content_from_message(reply))],
                               message_object_trees=[get_object_tree(reply)],
                               clientapp_runtime_list=[0.25]).SerializeToString()
    return body, objects


def _object_push(link: Link, node_id: int, session_id: str, object_id: str, content: bytes) -> bytes:
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    return PushObjectRequest(node=Node(node_id=node_id), run_id=link.run_id, session_id=session_id,
                             object_id=object_id, object_content=content).SerializeToString()


Replies = list[tuple[str, tuple[int, bytes]]]  # (what was asked, (status, body)) in order


def _round(link: Link, made: dict[str, tuple[bytes, dict[str, bytes]]]) -> Replies:
    """One message's way through the SuperLink as a round makes it: the ServerApp pushes it and
    its objects; the SuperNode beats, polls and gets it, replies and pushes the reply's objects;
    the ServerApp lists the nodes, beats, pulls the reply; the SuperNode's next poll finds
    nothing. The message and the reply (each body with its objects) are made once, on the first
    link, and kept in `made` for the next: the same bytes, so the same ids."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesResponse
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import (
        GetNodesRequest,
        PullAppMessagesRequest,
        PushAppMessagesResponse,
        SendTaskHeartbeatRequest,
    )

    instruction, instruction_objects = made.setdefault("instruction", _instruction(link))
    out: Replies = [("push", link.runtime("push-messages", instruction))]
    pushed = PushAppMessagesResponse.FromString(out[0][1][1])
    for oid in sorted(pushed.objects_to_push):
        out.append(("push object", link.runtime("push-object", _object_push(
            link, SUPERLINK_NODE_ID, pushed.session_id, oid, instruction_objects[oid]))))
    node = Node(node_id=link.node_id)
    poll = PullMessagesRequest(node=node).SerializeToString()
    beat = SendNodeHeartbeatRequest(node=node, heartbeat_interval=30.0).SerializeToString()
    out.append(("beat", link.fleet("send-node-heartbeat", beat)))
    out.append(("poll", link.fleet("pull-messages", poll)))
    if "reply" not in made:
        made["reply"] = _reply(link, out[-1][1][1])
    body, objects = made["reply"]
    out.append(("reply", link.fleet("push-messages", body)))
    accepted = PushMessagesResponse.FromString(out[-1][1][1])
    for oid in sorted(accepted.objects_to_push):
        out.append(("reply object", link.fleet("push-object", _object_push(
            link, link.node_id, accepted.session_id, oid, objects[oid]))))
    out.append(("nodes", link.runtime("get-nodes", GetNodesRequest().SerializeToString())))
    task_beat = SendTaskHeartbeatRequest().SerializeToString()
    out.append(("task beat", link.runtime("send-task-heartbeat", task_beat)))
    out.append(("pull", link.runtime("pull-messages", PullAppMessagesRequest(
        message_ids=list(pushed.message_ids)).SerializeToString())))
    out.append(("idle poll", link.fleet("pull-messages", poll)))
    return out


def _without_clocks(replies: Replies) -> Replies:
    """`replies` with what differs on every call blanked: the object push sessions' ids (random
    UUIDs flwr makes per message push; each checked to be there) and the node list's time of the
    node's heartbeat (its `online_until`, and when it was activated: each run's own clock)."""
    from flwr.proto.fleet_pb2 import PushMessagesResponse
    from flwr.proto.runtime_pb2 import GetNodesResponse, PushAppMessagesResponse

    out: Replies = []
    for what, (status, said) in replies:
        body = said
        kind = what.split()[-1]  # "push" (the ServerApp's), "reply" (a SuperNode's)
        if kind in ("push", "reply") and status == 200:
            parsed = (PushAppMessagesResponse if kind == "push" else PushMessagesResponse).FromString(body)
            assert len(parsed.session_id) == 36, parsed
            parsed.session_id = ""
            body = parsed.SerializeToString()
        elif what == "nodes" and status == 200:
            nodes = GetNodesResponse.FromString(body)
            for node in nodes.nodes:
                assert node.online_until > 0 and node.last_activated_at, node
                node.online_until, node.last_activated_at = 0.0, ""
            body = nodes.SerializeToString()
        out.append((what, (status, body)))
    return out


def test_a_rounds_message_traffic_gets_flowers_replies_outside_basehttpmiddleware(
        twins: tuple[Link, Link], layers: list[str]) -> None:
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesResponse
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatResponse
    from flwr.proto.runtime_pb2 import GetNodesResponse, PullAppMessagesResponse, PushAppMessagesResponse

    full, fast = twins
    made: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    got: dict[str, Replies] = {}
    crossed: dict[str, int] = {}
    for name, link in (("full", full), ("fast", fast)):
        layers.clear()
        got[name] = _round(link, made)
        crossed[name] = len(layers)
    assert _without_clocks(got["fast"]) == _without_clocks(got["full"])
    assert all(status == 200 for _what, (status, _body) in got["fast"]), got["fast"]
    assert crossed == {"full": 2 * len(got["full"]), "fast": 0}  # flwr's: error translator + protobuf
    said = {what: body for what, (_status, body) in got["fast"]}
    kinds = [what for what, _reply in got["fast"]]
    assert kinds.count("push object") >= 2 and kinds.count("reply object") >= 2
    assert len(PushAppMessagesResponse.FromString(said["push"]).message_ids) == 1
    assert SendNodeHeartbeatResponse.FromString(said["beat"]).success
    delivered = PullMessagesResponse.FromString(said["poll"]).messages_list
    assert len(delivered) == 1 and delivered[0].metadata.dst_node_id == fast.node_id
    assert len(PushMessagesResponse.FromString(said["reply"]).results) == 1
    assert [n.node_id for n in GetNodesResponse.FromString(said["nodes"]).nodes] == [fast.node_id]
    answered = PullAppMessagesResponse.FromString(said["pull"]).messages_list
    assert len(answered) == 1 and answered[0].metadata.reply_to_message_id == delivered[0].metadata.message_id
    assert not PullMessagesResponse.FromString(said["idle poll"]).messages_list
    routes = _routes(fast.app)
    assert routes.full_path == 0
    assert {path: n for path, n in routes.answered.items() if not path.endswith("-object")} == {
        "/v1/runtime/push-messages": 1, "/v1/fleet/send-node-heartbeat": 1, "/v1/fleet/pull-messages": 2,
        "/v1/fleet/push-messages": 1, "/v1/runtime/get-nodes": 1, "/v1/runtime/send-task-heartbeat": 1,
        "/v1/runtime/pull-messages": 1}


def test_every_refusal_on_the_rounds_routes_is_flowers_own(twins: tuple[Link, Link]) -> None:
    """A forged signature, a key registered nowhere, another node's id, a body that is not the
    protobuf, another media type, a reply to a message that does not exist, a heartbeat for
    another node, a bad or empty task token: the same status and body as flwr's full path."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import GetNodesRequest, PullAppMessagesRequest
    from flwr.supercore.constant import FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    full, fast = twins
    made: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    stranger_key, stranger_public = generate_key_pairs()  # registered nowhere
    stranger = (stranger_key, public_key_to_bytes(stranger_public))
    got = {}
    for name, link in (("full", full), ("fast", fast)):
        good = _headers(link.key, link.public_key)
        signature = FLEET_HTTP_SIGNATURE_HEADER.encode()
        forged = [(k, v[:-8] + b"AAAAAAA=" if k == signature else v) for k, v in good]
        other_type = [(k, b"application/json" if k == b"content-type" else v) for k, v in good]
        poll = PullMessagesRequest(node=Node(node_id=link.node_id)).SerializeToString()
        beat = SendNodeHeartbeatRequest(node=Node(node_id=link.node_id),
                                        heartbeat_interval=30.0).SerializeToString()
        other_node = PullMessagesRequest(node=Node(node_id=link.node_id + 1)).SerializeToString()
        instruction, _objects = made.setdefault("instruction", _instruction(link))
        orphan_reply = made.setdefault("orphan", _orphan_reply(link))[0]
        got[name] = [
            ("forged poll", link.fleet("pull-messages", poll, forged)),
            ("forged beat", link.fleet("send-node-heartbeat", beat, forged)),
            ("other node's poll", link.fleet("pull-messages", other_node)),
            ("stranger's poll", link.fleet("pull-messages", poll, _headers(*stranger))),
            ("garbage reply", link.fleet("push-messages", b"\xff\xff not a protobuf")),
            ("json poll", link.fleet("pull-messages", poll, other_type)),
            ("orphan reply", link.fleet("push-messages", orphan_reply)),
            ("beat of another node", link.fleet("send-node-heartbeat", SendNodeHeartbeatRequest(
                node=Node(node_id=link.node_id + 1), heartbeat_interval=30.0).SerializeToString())),
            ("bad token push", link.runtime("push-messages", instruction, token="not-a-token")),
            ("bad token pull", link.runtime("pull-messages", PullAppMessagesRequest().SerializeToString(),
                                            token="not-a-token")),
            ("bad token nodes", link.runtime("get-nodes", GetNodesRequest().SerializeToString(), token="")),
            ("garbage push", link.runtime("push-messages", b"\xff\xff not a protobuf")),
        ]
    assert _without_clocks(got["fast"]) == _without_clocks(got["full"])
    status = {what: code for what, (code, _body) in got["fast"]}
    unauthenticated = ("forged poll", "forged beat", "other node's poll", "stranger's poll")
    assert [status[w] for w in unauthenticated] == [401] * 4
    assert status["bad token push"] in (401, 403) and status["bad token nodes"] in (401, 403)
    assert all(status[w] >= 400 for w in ("garbage reply", "json poll", "garbage push")), got["fast"]
    routes = _routes(fast.app)
    assert routes.full_path == 3  # the garbage bodies and the other media type: flwr's parse refuses them
    assert sum(routes.answered.values()) == len(got["fast"]) - 3


def _orphan_reply(link: Link) -> tuple[bytes, dict[str, bytes]]:
    """A SuperNode's `PushMessages` body replying to a message the SuperLink never had."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PullMessagesResponse

    stray = Message(RecordDict({"config": ConfigRecord({"round": 9})}), dst_node_id=link.node_id,
                    message_type="train", ttl=3600.0, group_id="9")
    flwr_internals.stamp_metadata(stray.metadata, run_id=link.run_id)
    flwr_internals.stamp_metadata(stray.metadata, message_id=stray.object_id)
    pulled = PullMessagesResponse(messages_list=[message_to_proto(stray)]).SerializeToString()
    return _reply(link, pulled)


def _stack(app: Any) -> list[Any]:
    """The app's built middleware layers, outermost first."""
    layer = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = layer
    out = []
    while layer is not None:
        out.append(layer)
        layer = getattr(layer, "app", None)
    return out


@pytest.mark.parametrize("routes_first", [False, True])
def test_the_idle_poll_shortcuts_stay_outside_and_learn_from_the_routes_replies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes_first: bool) -> None:
    """Whichever patch comes first, the idle-poll shortcuts sit outside `HotRoutes` (they must
    see every poll): an empty poll that `HotRoutes` answered teaches the shortcut that the node is
    idle, and the next poll is answered early without reaching the routes."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    with monkeypatch.context() as m:
        link = _build(tmp_path, m, "fast", object_routes=True, routes_first=routes_first)
    kinds = [type(layer) for layer in _stack(link.app)]
    routes = kinds.index(superlink_routes.HotRoutes)
    assert kinds.index(flwr_internals._IdlePullShortcut) < routes
    assert kinds.index(flwr_internals._IdleReplyPullShortcut) < routes
    shortcut = _stack(link.app)[kinds.index(flwr_internals._IdlePullShortcut)]
    poll = PullMessagesRequest(node=Node(node_id=link.node_id)).SerializeToString()
    first, second = link.fleet("pull-messages", poll), link.fleet("pull-messages", poll)
    assert first == second and first[0] == 200
    assert (shortcut.full_path, shortcut.answered_early) == (1, 1)
    assert _routes(link.app).answered == {"/v1/fleet/pull-messages": 1}


def test_a_patched_flower_handler_applies_on_the_routes(twins: tuple[Link, Link],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The routes call flwr's handlers through their module attributes (and the Runtime API's
    handler object on the app's state), as flwr's route functions do: a patch of a handler
    (another helper holds a message back until its objects are complete this way) applies on the
    routes as on flwr's full path."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.superlink.servicer.fleet import fleet_handlers

    full, fast = twins
    seen: list[str] = []
    fleet_pull = fleet_handlers.pull_messages

    def pull_messages(*args: Any, **kwargs: Any) -> Any:
        seen.append("fleet")
        return fleet_pull(*args, **kwargs)

    monkeypatch.setattr(fleet_handlers, "pull_messages", pull_messages)
    for link in (full, fast):
        handlers = link.app.state.runtime_handlers
        runtime_pull = handlers.pull_messages

        def runtime_pull_messages(*args: Any, _pull: Any = runtime_pull, **kwargs: Any) -> Any:
            seen.append("runtime")
            return _pull(*args, **kwargs)

        monkeypatch.setattr(handlers, "pull_messages", runtime_pull_messages)
        assert link.fleet("pull-messages", PullMessagesRequest(node=Node(node_id=link.node_id))
                          .SerializeToString())[0] == 200
        assert link.runtime("pull-messages", PullAppMessagesRequest().SerializeToString())[0] == 200
        monkeypatch.setattr(handlers, "pull_messages", runtime_pull)
    assert seen == ["fleet", "runtime"] * 2
    assert _routes(fast.app).answered == {"/v1/fleet/pull-messages": 1, "/v1/runtime/pull-messages": 1}


# -- the object push's SQL ------------------------------------------------------------------------


@pytest.fixture
def statements(twins: tuple[Link, Link]) -> Iterator[list[str]]:
    """Every SQL statement the twins' databases run, in order."""
    from sqlalchemy import event

    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engines = [link.state._engine for link in twins]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    yield seen
    for engine in engines:
        event.remove(engine, "before_cursor_execute", count)


def test_an_object_push_claims_its_object_in_one_statement_with_flowers_results(
        twins: tuple[Link, Link], statements: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`patch_superlink_object_claim`: the same claims, results and stored objects as flwr's two
    statements, on a copy of the same database: a pending object (claimed once, then not), an
    object of another run's session, an unknown object, a session that expired (flwr then
    removes it and its messages: the push is refused), each claim one statement."""
    import datetime

    from flwr.supercore.corestate.sql_corestate import ObjectPushSessionModel, SqlCoreState
    from sqlalchemy import update

    full, fast = twins
    ids = sorted(full.contents)
    original = SqlCoreState._claim_pending_object
    monkeypatch.setattr(SqlCoreState, "_claim_pending_object", original)
    superlink_routes.patch_superlink_object_claim()
    superlink_routes.patch_superlink_object_claim()  # idempotent
    patched = SqlCoreState._claim_pending_object
    assert patched is not original
    got: dict[str, list[Any]] = {}
    per_push: dict[str, list[int]] = {}
    for name, link, claim in (("full", full, original), ("fast", fast, patched)):
        monkeypatch.setattr(SqlCoreState, "_claim_pending_object", claim)
        got[name], per_push[name] = [], []
        state = link.state
        for run_id, object_id in ((link.run_id, ids[0]), (link.run_id, ids[0]), (link.run_id + 1, ids[1]),
                                  (link.run_id, "00" * 32), (link.run_id, ids[1])):
            statements.clear()
            got[name].append(state._claim_pending_object(run_id, link.session_id, object_id))
            per_push[name].append(len(statements))
            statements.clear()
        stored = [state.store_object(link.run_id, link.session_id, ids[2], link.contents[ids[2]])]
        per_push[name].append(len(statements))
        stored.append(state.get_object(link.run_id, ids[2]))
        with state.session() as session:  # the session lapses: the next push is refused, the session removed
            session.execute(update(ObjectPushSessionModel).values(
                expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)))
        stored.append(state.store_object(link.run_id, link.session_id, ids[3], link.contents[ids[3]]))
        with state.session() as session:
            sessions = session.query(ObjectPushSessionModel).count()
        got[name] += [stored, sessions, [state.get_object(link.run_id, oid) for oid in ids]]
    assert got["fast"] == got["full"]
    claimed, again, other_run, unknown, second = got["fast"][:5]
    assert isinstance(claimed, datetime.datetime) and isinstance(second, datetime.datetime)
    assert (again, other_run, unknown) == (None, None, None)
    assert got["fast"][5] == [True, fast.contents[ids[2]], False] and got["fast"][6] == 0
    assert per_push["full"][:5] == [2, 1, 1, 1, 2] and per_push["fast"][:5] == [1, 1, 1, 1, 1]
    assert per_push["fast"][5] == per_push["full"][5] - 1
