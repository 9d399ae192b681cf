"""A small real HTTP server for an export folder and a tile folder (the `audit fetch` contract).

It serves, from disk, what docs/audit-log.md ("Fetching over HTTP") asks of a server, the way
the coordinator will in phase 2: /v1/audit/checkpoint (text/plain on request, JSON otherwise),
/v1/audit/trust, /v1/audit/export?start=&limit= (NDJSON), each behind a Bearer key; a tile tree
under /tiles/; and the plain entries.jsonl under /raw/ (the benchmark's baseline download).
`misbehave` makes it break the contract in one named way, for the tests of the client.
"""

from __future__ import annotations

import json
import threading
from array import array
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from audit.checkpoint import parse_checkpoint
from audit.signing import b64encode

API_KEY = "hx_test_auditor"
MAX_PAGE = 10_000


class ExportServer:
    def __init__(self, export: Path, tiles: Path | None = None, *, page_cap: int = MAX_PAGE) -> None:
        self.export = export
        self.tiles = tiles
        self.page_cap = page_cap
        self.misbehave: str | None = None
        self.requests: list[str] = []
        self.entries = (export / "entries.jsonl").read_bytes() if export.exists() else b""
        self.offsets = array("Q", [0])
        at = self.entries.find(b"\n")
        while at >= 0:
            self.offsets.append(at + 1)
            at = self.entries.find(b"\n", at + 1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ExportServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def page(self, start: int, limit: int) -> bytes:
        size = len(self.offsets) - 1
        stop = min(size, start + min(limit, self.page_cap))
        if start >= size:
            return b""
        return self.entries[self.offsets[start]:self.offsets[stop]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                server.requests.append(self.path)
                if parts.path.startswith("/tiles/") and server.tiles is not None:
                    return self.static(server.tiles / parts.path.removeprefix("/tiles/"))
                if parts.path == "/raw/entries.jsonl":
                    return self.send(200, server.entries, "application/x-ndjson")
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self.send(401, b'{"title":"Unauthorized"}', "application/problem+json")
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if parts.path == "/v1/audit/checkpoint":
                    return self.checkpoint()
                if parts.path == "/v1/audit/trust":
                    return self.send(200, (server.export / "trust.json").read_bytes(),
                                     "application/json")
                if parts.path == "/v1/audit/export":
                    return self.export(int(query.get("start", 0)), int(query.get("limit", 100)))
                return self.send(404, b'{"title":"Not Found"}', "application/problem+json")

            def checkpoint(self) -> None:
                note = (server.export / "checkpoint").read_bytes()
                if "text/plain" in self.headers.get("Accept", ""):
                    return self.send(200, note, "text/plain; charset=utf-8")
                parsed = parse_checkpoint(note)
                body = {"size": parsed.size, "root_hash": b64encode(parsed.root),
                        "checkpoint": note.decode()}
                return self.send(200, json.dumps(body).encode(), "application/json")

            def export(self, start: int, limit: int) -> None:
                body = server.page(start, limit)
                if server.misbehave == "ignore-paging":
                    body = server.entries
                elif server.misbehave == "truncate-line" and body:
                    body = body[:-5]
                elif server.misbehave == "empty-page" and start > 0:
                    body = b""
                elif server.misbehave == "tamper" and start == 0 and body:
                    body = body.replace(b'"amount":', b'"amount":1', 1)
                return self.send(200, body, "application/x-ndjson")

            def static(self, path: Path) -> None:
                if server.misbehave == "missing-tile" and "/entries/" in str(path):
                    return self.send(404, b"not found", "text/plain")
                try:
                    body = path.read_bytes()
                except OSError:
                    return self.send(404, b"not found", "text/plain")
                kind = ("text/plain; charset=utf-8" if path.name == "checkpoint"
                        else "application/json" if path.suffix == ".json"
                        else "application/octet-stream")
                return self.send(200, body, kind)

        return Handler
