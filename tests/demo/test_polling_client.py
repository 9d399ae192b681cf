"""The consortium polls the coordinator with one client: a client per poll built an httpx client
and its TLS context each time, CPU in the process that also runs the coordinator and the
ServerApp (docs/benchmarks/scale.md, 25 hospitals)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exchange.demo.consortium import Consortium, DemoConfig


@pytest.fixture
def coordinator() -> Iterator[tuple[str, list[int]]]:
    """A stand-in coordinator on loopback that answers every GET with a study and records the
    client port of each request (one port: one connection, kept alive)."""
    ports: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            ports.append(self.client_address[1])
            body = json.dumps({"id": "st-1", "status": "running"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", ports
    finally:
        server.shutdown()
        server.server_close()


def test_the_study_is_polled_over_one_client_and_stop_closes_it(
        coordinator: tuple[str, list[int]], tmp_path: Path) -> None:
    url, ports = coordinator
    demo = Consortium(DemoConfig(out=tmp_path))
    demo.url, demo.researcher_key, demo.study_id = url, "researcher-key", "st-1"
    for _ in range(3):
        assert demo.study()["status"] == "running"
    assert len(ports) == 3 and len(set(ports)) == 1  # one client, one kept-alive connection
    client = demo.polling_api()
    demo.stop()
    assert demo.polling_api() is not client  # closed by stop: a later poll gets a fresh one
    demo.polling_api().close()

