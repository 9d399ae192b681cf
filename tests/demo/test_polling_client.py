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

#: what the stand-in coordinator answers GET /v1/catalogs with, in turn (the last one stays)
CATALOGS: list[dict[str, object]] = []


@pytest.fixture
def coordinator() -> Iterator[tuple[str, list[int]]]:
    """A stand-in coordinator on loopback that answers GET /v1/catalogs from `CATALOGS` and every
    other GET with a study, and records the client port of each request (one port: one
    connection, kept alive)."""
    ports: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            ports.append(self.client_address[1])
            if self.path == "/v1/catalogs":
                answer = CATALOGS.pop(0) if len(CATALOGS) > 1 else CATALOGS[0]
            else:
                answer = {"id": "st-1", "status": "running"}
            body = json.dumps(answer).encode()
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


def _catalogs(columns_by_hospital: dict[str, list[str] | None]) -> dict[str, object]:
    return {"hospitals": [{"hospital_id": h, "catalog": None if cols is None else
                           {"columns": [{"name": c} for c in cols]}}
                          for h, cols in columns_by_hospital.items()]}


def test_the_study_is_submitted_once_every_catalog_holds_its_columns(
        coordinator: tuple[str, list[int]], tmp_path: Path) -> None:
    """10 hospitals, min_hospitals 10: a study submitted before the last daemon republished its
    catalog after the data import was refused (422, "column(s) not held")."""
    from audit.signing import Signer
    from exchange.demo.consortium import DemoError, Hospital

    url, ports = coordinator
    demo = Consortium(DemoConfig(out=tmp_path, study="survival", features=2))
    demo.url, demo.researcher_key = url, "researcher-key"
    demo.hospitals = {h: Hospital(id=h, dir=tmp_path / h, health_port=0, issuer=Signer.generate())
                      for h in ("hospital-a", "hospital-b")}
    full = ["age", "sex", "kappa", "time", "event"]
    CATALOGS[:] = [_catalogs({"hospital-a": full, "hospital-b": None}),
                   _catalogs({"hospital-a": full, "hospital-b": ["age", "sex"]}),  # before its import
                   _catalogs({"hospital-a": full, "hospital-b": full})]
    try:
        demo.wait_for_catalogs(timeout=30)
        assert len(ports) == 3  # asked until the third answer
        CATALOGS[:] = [_catalogs({"hospital-a": full, "hospital-b": ["age", "time", "event"]})]
        with pytest.raises(DemoError, match="every hospital's catalog"):
            demo.wait_for_catalogs(timeout=1)
    finally:
        demo.stop()
