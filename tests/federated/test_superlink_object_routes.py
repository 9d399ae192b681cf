"""`flwr_internals.patch_superlink_object_routes`: a message's object pushes, pulls and receipt
confirmations (Fleet and Runtime APIs) answered by flwr's own endpoints outside FastAPI's
middleware and routing, on flwr's real SuperLink app and SQLite LinkState, driven by raw ASGI
requests signed as a SuperNode signs them (or carrying a task's token, as the ServerApp's do).
What must not change: every reply and every refusal is byte for byte what flwr's full path
answers, on an app built without the patch from the same requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals
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


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, object_routes: bool) -> Link:
    """flwr's SuperLink app with the fast mode's middleware patches (and the object routes, or
    not) on a database of its own, one active node and a running run with 8 objects
    preregistered for a push: the same for every call, so two apps can be compared."""
    disable_phone_home()
    import flwr.superlink.main as superlink_main
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(flwr_internals, "_pending", [])
    monkeypatch.setattr(flwr_internals, "_pending_runs", [])
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / f"{name}.db"))
    flwr_internals.patch_superlink_middleware()
    flwr_internals.patch_superlink_idle_pulls(recheck_s=30.0)
    if object_routes:
        flwr_internals.patch_superlink_object_routes()
        flwr_internals.patch_superlink_object_routes()  # idempotent
    app = superlink_main.create_app()
    monkeypatch.undo()  # the next app is built from flwr's own middleware list again
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
    """The `_ObjectRoutes` instance in the app's built middleware stack (None: not there)."""
    layer = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = layer
    while layer is not None:
        if isinstance(layer, flwr_internals._ObjectRoutes):
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
    assert routes is not None and (routes.answered, routes.full_path) == (5, 0)
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
    assert _routes(fast.app).answered == 4


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
    assert (routes.answered, routes.full_path) == (3, 2)


def test_a_fleet_event_log_plugin_gets_every_request(links: tuple[Link, Link]) -> None:
    """With flwr's Fleet event log on, its middleware must see the object requests: they take
    flwr's full path."""
    _full, fast = links
    routes = _routes(fast.app)
    fast.app.state.fleet_event_log_plugin = object()  # flwr's middleware acts only with one
    oid = sorted(fast.contents)[0]
    fast.fleet("pull-object", _pull(fast, oid))  # this stand-in plugin fails flwr's middleware: any reply
    assert (routes.answered, routes.full_path) == (0, 1)
