"""CPU per SuperLink Fleet request, in process: flwr's app as shipped against our patches.

``python -m tests.bench.bench_superlink_requests [--requests N]``
``python -m tests.bench.bench_superlink_requests --objects [--requests N]``
``python -m tests.bench.bench_superlink_requests --routes [--requests N]``

`--routes`: a message's object requests (Fleet `PushObject`, `PullObject`,
`ConfirmMessageReceived`), a `SendNodeHeartbeat` and a full `PullMessages` (one the idle-poll
shortcut does not answer) with every patch of main's SuperLink (the six object routes outside
FastAPI's layers, the two-statement object claim) against the fast mode's SuperLink now (every
hot route outside FastAPI's layers, `superlink_routes`; the one-statement claim), interleaved:
CPU ms and SQL statements per request.

`--objects`: what a message's objects cost, one request each (flwr 1.42 pushes and pulls every
object of a message's tree separately), on a running run: `PushObject` of fresh objects and
`PullObject` of stored ones, with the patches of a SuperLink before issue 15's second pass
(middleware scoped, idle polls, the task-sweep throttle) against those plus
`patch_superlink_run_status_cache`, `patch_superlink_node_key_cache` and
`patch_superlink_traffic_batching`, interleaved.

Builds flwr 1.42's SuperLink FastAPI app three times on a fresh SQLite LinkState each (stock;
`flwr_internals.patch_superlink_middleware`; plus `patch_superlink_idle_pulls`), registers and
activates one SuperNode key, and sends raw ASGI requests signed as a SuperNode signs them
(no HTTP server, no TLS: those cost the same in every configuration). Reports process CPU per
request (all threads of this process: FastAPI runs the handlers in its thread pool) for an idle
`PullMessages`, a `SendNodeHeartbeat`, and a `PullMessages` that delivers a stored message.
Numbers: docs/benchmarks/flower.md, "SuperLink CPU per request".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from federated.runtime.settings import disable_phone_home


def _headers(private_key: Any, public_key_bytes: bytes) -> list[tuple[bytes, bytes]]:
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import sign_message

    timestamp = now().isoformat()
    signature = sign_message(private_key, timestamp.encode("ascii"))
    return [(b"content-type", b"application/protobuf"),
            (FLEET_HTTP_PUBLIC_KEY_HEADER.encode(), base64.b64encode(public_key_bytes)),
            (TIMESTAMP_HEADER.encode(), timestamp.encode()),
            (FLEET_HTTP_SIGNATURE_HEADER.encode(), base64.b64encode(signature))]


async def call(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One request through the ASGI app; returns (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [*headers, (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    sent = False
    out: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return int(out["status"]), bytes(out["body"])


def build(db: Path) -> tuple[Any, Any, int, Any, bytes]:
    """A SuperLink app on `db` with one registered, active node: (app, state, node id, key, pk)."""
    os.environ["FLWR_DATABASE"] = str(db)
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from flwr.superlink.main import create_app

    app = create_app()
    state = app.state.linkstate_factory.state()
    private_key, public_key = generate_key_pairs()
    pk = public_key_to_bytes(public_key)
    node_id = state.create_node("noop", "noop", pk, 0)
    state.activate_node(node_id, 30)
    return app, state, node_id, private_key, pk


async def measure(app: Any, node_id: int, private_key: Any, pk: bytes, requests: int) -> dict[str, float]:
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    pull = PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()
    beat = SendNodeHeartbeatRequest(node=Node(node_id=node_id), heartbeat_interval=30).SerializeToString()
    out: dict[str, float] = {}
    for name, path, body in (("pull_idle", "/v1/fleet/pull-messages", pull),
                             ("heartbeat", "/v1/fleet/send-node-heartbeat", beat)):
        headers = [_headers(private_key, pk) for _ in range(requests)]  # signing is the client's CPU
        for h in headers[:5]:  # warm-up (imports, first full poll)
            status, reply = await call(app, path, body, h)
            if status != 200:
                raise SystemExit(f"{name}: HTTP {status} {reply[:200]!r}")
        start = time.process_time()
        for h in headers[5:]:
            status, reply = await call(app, path, body, h)
            if status != 200:
                raise SystemExit(f"{name}: HTTP {status} {reply[:200]!r}")
            if name == "pull_idle" and PullMessagesResponse.FromString(reply).messages_list:
                raise SystemExit("pull_idle: a message came back")
        out[name] = (time.process_time() - start) / (requests - 5) * 1e3
    return out


async def measure_objects(app: Any, state: Any, node_id: int, private_key: Any, pk: bytes,
                          requests: int) -> dict[str, float]:
    """CPU ms per `PushObject` (a fresh object each) and per `PullObject` (stored objects), on a
    run claimed and started as a ServerApp does."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.proto.message_pb2 import PullObjectRequest, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    state.claim_task(task_id)
    state.activate_task(task_id)
    content = RecordDict({f"r{i}": ConfigRecord({"i": i, "pad": b"x" * 200}) for i in range(requests)})
    objects = get_all_nested_objects(content)
    session_id = state.start_session(run_id)
    missing = set(state.preregister_object_tree(get_object_tree(content), session_id))
    ids = [oid for oid in objects if oid in missing and oid != content.object_id][:requests]
    node = Node(node_id=node_id)
    pushes = [PushObjectRequest(node=node, run_id=run_id, session_id=session_id, object_id=oid,
                                object_content=objects[oid].deflate()).SerializeToString() for oid in ids]
    pulls = [PullObjectRequest(node=node, run_id=run_id, object_id=oid).SerializeToString() for oid in ids]
    out: dict[str, float] = {}
    for name, path, bodies in (("push_object", "/v1/fleet/push-object", pushes),
                               ("pull_object", "/v1/fleet/pull-object", pulls)):
        headers = [_headers(private_key, pk) for _ in bodies]
        for body, h in zip(bodies[:5], headers[:5], strict=True):  # warm-up
            await call(app, path, body, h)
        start = time.process_time()
        for body, h in zip(bodies[5:], headers[5:], strict=True):
            status, reply = await call(app, path, body, h)
            if status != 200:
                raise SystemExit(f"{name}: HTTP {status} {reply[:200]!r}")
        out[name] = (time.process_time() - start) / (len(bodies) - 5) * 1e3
    return out


def objects_main(requests: int, repeats: int) -> None:
    """`--objects`: the SuperLink before and after the two caches and the traffic batching."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.routers.fleet import node_auth

    from federated.runtime import flwr_internals

    names = ("get_run_status", "store_traffic", "get_run_info", "get_node_id_by_public_key")
    parse = node_auth.bytes_to_public_key
    flwr_internals.patch_superlink_middleware()
    flwr_internals.patch_superlink_idle_pulls(recheck_s=5.0)
    flwr_internals.patch_superlink_task_sweep(0.5)
    before = {n: getattr(SqlLinkState, n) for n in names}
    flwr_internals.patch_superlink_run_status_cache(1.0)
    flwr_internals.patch_superlink_traffic_batching(1.0)
    flwr_internals.patch_superlink_node_key_cache(1.0)
    after = {n: getattr(SqlLinkState, n) for n in names}
    parses = {"before": parse, "after": node_auth.bytes_to_public_key}
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for name, methods in (("before", before), ("after", after)):
                for n, method in methods.items():
                    setattr(SqlLinkState, n, method)
                node_auth.bytes_to_public_key = parses[name]
                app, state, node_id, key, pk = build(Path(tmp) / f"{name}-{repeat}.db")
                results[name].append(asyncio.run(measure_objects(app, state, node_id, key, pk, requests)))
    print(f"CPU ms per request (median of {repeats}, {requests} requests each, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, runs in results.items():
        cells = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0])
        print(f"  {name:8s} {cells}")


async def measure_routes(app: Any, state: Any, node_id: int, private_key: Any, pk: bytes,
                         requests: int) -> dict[str, float]:
    """CPU ms and SQL statements per Fleet `PushObject` (fresh objects), `PullObject` and
    `ConfirmMessageReceived` (of those objects), on a run claimed and started as a ServerApp does."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, PullObjectRequest, PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    statements = [0]

    def count(*_args: Any, **_kwargs: Any) -> None:
        statements[0] += 1

    content = RecordDict({f"r{i}": ConfigRecord({"i": i, "pad": b"x" * 200}) for i in range(requests)})
    objects = get_all_nested_objects(content)
    deflated = {oid: obj.deflate() for oid, obj in objects.items()}  # before the claim: slow when loaded
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    session_id = state.start_session(run_id)
    missing = set(state.preregister_object_tree(get_object_tree(content), session_id))
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id  # claimed after the slow part:
    state.claim_task(task_id)  # a claim lapses after 60 s without a heartbeat (load 50: that long)
    state.activate_task(task_id)
    ids = [oid for oid in objects if oid in missing and oid != content.object_id][:requests]
    node = Node(node_id=node_id)
    bodies = {
        "push_object": [PushObjectRequest(node=node, run_id=run_id, session_id=session_id, object_id=oid,
                                          object_content=deflated[oid]).SerializeToString()
                        for oid in ids],
        "pull_object": [PullObjectRequest(node=node, run_id=run_id, object_id=oid).SerializeToString()
                        for oid in ids],
        "confirm": [ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=oid)
                    .SerializeToString() for oid in ids],
    }
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest

    from federated.runtime import flwr_internals

    beat = SendNodeHeartbeatRequest(node=node, heartbeat_interval=30).SerializeToString()
    bodies["heartbeat"] = [beat] * len(ids)
    bodies["poll_full"] = [PullMessagesRequest(node=node).SerializeToString()] * len(ids)
    paths = {"push_object": "/v1/fleet/push-object", "pull_object": "/v1/fleet/pull-object",
             "confirm": "/v1/fleet/confirm-message-received", "heartbeat": "/v1/fleet/send-node-heartbeat",
             "poll_full": "/v1/fleet/pull-messages"}
    out: dict[str, float] = {}
    event.listen(Engine, "before_cursor_execute", count)
    try:
        for name, path in paths.items():
            headers = [_headers(private_key, pk) for _ in ids]
            state.acknowledge_task_heartbeat(task_id)  # as the ServerApp's heartbeat keeps its claim
            for body, h in zip(bodies[name][:5], headers[:5], strict=True):  # warm-up
                await call(app, path, body, h)
            start, first = time.process_time(), statements[0]
            for body, h in zip(bodies[name][5:], headers[5:], strict=True):
                if name == "poll_full":  # as if a message were stored: the shortcut lets it through
                    flwr_internals._pending[0].bump(node_id)
                status, reply = await call(app, path, body, h)
                if status != 200:
                    raise SystemExit(f"{name}: HTTP {status} {reply[:200]!r}")
            out[name] = (time.process_time() - start) / (len(ids) - 5) * 1e3
            out[f"{name}_sql"] = (statements[0] - first) / (len(ids) - 5)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    return out


def routes_main(requests: int, repeats: int) -> None:
    """`--routes`: main's SuperLink (the six object routes outside FastAPI's layers, flwr's
    two-statement object claim) against the fast mode's now (`superlink_routes`: every hot route,
    the one-statement claim), interleaved, each on a fresh app and database."""
    import flwr.superlink.main as superlink_main
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    from federated.runtime import flwr_internals, superlink_routes

    flwr_internals.patch_superlink_middleware()
    flwr_internals.patch_superlink_idle_pulls(recheck_s=5.0)
    flwr_internals.patch_superlink_task_sweep(0.5)
    flwr_internals.patch_superlink_store_object_busy()
    flwr_internals.patch_superlink_push_one_transaction()
    flwr_internals.patch_superlink_run_status_cache(1.0)
    flwr_internals.patch_superlink_node_key_cache(1.0)
    flwr_internals.patch_superlink_task_token_cache(1.0)
    flwr_internals.patch_superlink_traffic_batching(1.0)
    base, claims = superlink_main._get_middleware, [SqlCoreState._claim_pending_object]
    every_route = dict(superlink_routes.ROUTES)
    superlink_routes.ROUTES.clear()  # main's: the object routes alone
    superlink_routes.ROUTES.update({p: r for p, r in every_route.items() if p.endswith("-object")
                                    or p.endswith("confirm-message-received")})
    superlink_routes.patch_superlink_routes()
    main_stack = superlink_main._get_middleware
    superlink_main._get_middleware = base  # type: ignore[attr-defined]
    superlink_routes.ROUTES.update(every_route)
    superlink_routes.patch_superlink_routes()
    superlink_routes.patch_superlink_object_claim()
    now_stack = superlink_main._get_middleware
    claims.append(SqlCoreState._claim_pending_object)
    configurations = {"main": (main_stack, claims[0]), "hot routes": (now_stack, claims[1])}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configurations}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for name, (stack, claim) in configurations.items():
                superlink_main._get_middleware = stack  # type: ignore[attr-defined]
                SqlCoreState._claim_pending_object = claim  # type: ignore[method-assign]
                app, state, node_id, key, pk = build(Path(tmp) / f"{name}-{repeat}.db")
                results[name].append(asyncio.run(measure_routes(app, state, node_id, key, pk, requests)))
                layer = app.middleware_stack
                while layer is not None and not isinstance(layer, superlink_routes.HotRoutes):
                    layer = getattr(layer, "app", None)
                answered = sorted(p.rsplit("/", 1)[-1] for p in layer.answered) if layer is not None else []
                print(f"  {name}: answered outside FastAPI: {', '.join(answered)}")
    print(f"CPU ms (SQL statements) per request (median of {repeats}, {requests} requests each, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, runs in results.items():
        cells = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f} "
                          f"({statistics.median(r[k + '_sql'] for r in runs):.1f})"
                          for k in runs[0] if not k.endswith("_sql"))
        print(f"  {name:10s} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the three configurations, interleaved")
    parser.add_argument("--objects", action="store_true",
                        help="PushObject / PullObject before and after the caches and traffic batching")
    parser.add_argument("--routes", action="store_true",
                        help="object requests, heartbeats, full polls: main's SuperLink against the hot "
                             "routes and the one-statement claim")
    args = parser.parse_args()
    disable_phone_home()
    if args.routes:
        routes_main(args.requests, args.repeats)
        return
    if args.objects:
        objects_main(args.requests, args.repeats)
        return
    import flwr.superlink.main as superlink_main

    from federated.runtime import flwr_internals

    stock = superlink_main._get_middleware
    results: dict[str, list[dict[str, float]]] = {"stock": [], "scoped": [], "scoped+idle": []}
    with tempfile.TemporaryDirectory() as tmp:
        flwr_internals.patch_superlink_middleware()
        scoped = superlink_main._get_middleware
        flwr_internals.patch_superlink_idle_pulls(recheck_s=5.0)
        idle = superlink_main._get_middleware
        for repeat in range(args.repeats):
            for name, factory in (("stock", stock), ("scoped", scoped), ("scoped+idle", idle)):
                superlink_main._get_middleware = factory  # type: ignore[attr-defined]
                app, _state, node_id, key, pk = build(Path(tmp) / f"{name}-{repeat}.db")
                results[name].append(asyncio.run(measure(app, node_id, key, pk, args.requests)))
        superlink_main._get_middleware = idle  # type: ignore[attr-defined]
    print(f"CPU ms per request (median of {args.repeats}, {args.requests} requests each, load "
          f"{os.getloadavg()[0]:.1f})")
    for name, runs in results.items():
        cells = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0])
        print(f"  {name:12s} {cells}")


if __name__ == "__main__":
    main()
