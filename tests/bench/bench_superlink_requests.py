"""CPU per SuperLink Fleet request, in process: flwr's app as shipped against our patches.

``python -m tests.bench.bench_superlink_requests [--requests N]``

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the three configurations, interleaved")
    args = parser.parse_args()
    disable_phone_home()
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
