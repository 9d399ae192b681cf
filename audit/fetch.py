"""`audit fetch`: download a verifiable export over HTTP, then verify it like any export.

Why: an auditor should not need database access or the operator's help to check the log; the
coordinator serves everything an export holds, and this client turns it into an export folder
(audit/export.py) that `audit verify` checks offline. The HTTP contract (docs/audit-log.md,
"Fetching over HTTP") is small enough for any server, including a static file host of tiles:

JSON API (the coordinator), every request with `Authorization: Bearer <auditor API key>`:
    GET <url>/v1/audit/checkpoint        Accept: text/plain -> the signed note, cosignatures
                                          included (text/plain; charset=utf-8); an
                                          application/json answer {"checkpoint": note, ...} is
                                          also accepted
    GET <url>/v1/audit/trust             the trust policy (trust.json, application/json)
    GET <url>/v1/audit/export?start=S&limit=L
                                          application/x-ndjson: entries S, S+1, ... (at least 1
                                          and at most L of them, fewer only at the end of the log
                                          or at a server cap), each its exact leaf bytes and "\\n"
tlog-tiles (audit/tiles.py), a static prefix:
    GET <url>/checkpoint, <url>/tile/entries/<N>[.p/<W>], <url>/tile/<L>/<N>[.p/<W>],
        <url>/trust.json (optional)

The checkpoint is fetched first and fixes the size: exactly its entries are downloaded, even if
the log grows meanwhile. Nothing is written unless every download succeeded (the folder appears
atomically); then the folder is verified with the pinned trust policy (`--trust`), or, without
one, with the server's own (said so in the output: an auditor should pin a copy).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from audit.checkpoint import CheckpointError, parse_checkpoint
from audit.export import ExportError, write_export
from audit.tiles import CHECKPOINT_PATH, ENTRIES, TILE_WIDTH, TRUST_PATH, Tile, TileError, decode_bundle
from audit.trust import Trust

CHECKPOINT_PATH_API = "/v1/audit/checkpoint"
TRUST_PATH_API = "/v1/audit/trust"
EXPORT_PATH_API = "/v1/audit/export"
DEFAULT_PAGE = 10_000
NOTE_LIMIT = 1 << 20


class FetchError(ExportError):
    """A download failed or the server broke the contract; the message names the request."""


@dataclass(frozen=True)
class Fetched:
    """What was downloaded: the folder, the entries, the trust policy used, and from where."""

    folder: Path
    entries: int
    trust: Trust
    bytes: int


class _Client:
    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        headers = {"Accept-Encoding": "gzip, identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base = url.rstrip("/")
        self.http = httpx.Client(headers=headers, timeout=timeout, follow_redirects=True)
        self.received = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, *, params: dict[str, Any] | None = None,
            accept: str | None = None) -> httpx.Response:
        url = self.base + path
        try:
            response = self.http.get(url, params=params,
                                     headers={"Accept": accept} if accept else None)
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {exc.__class__.__name__}: {exc}") from exc
        self._check(url, response)
        with self._lock:
            self.received += len(response.content)
        return response

    @staticmethod
    def _check(url: str, response: httpx.Response) -> None:
        if response.status_code != 200:
            detail = response.text[:300].strip()
            raise FetchError(f"GET {url}: HTTP {response.status_code}"
                             + (f": {detail}" if detail else ""))

    def stream_lines(self, path: str, params: dict[str, Any]) -> Iterator[bytes]:
        """The response body split into lines, each WITH its newline (the last may lack it)."""
        url = self.base + path
        try:
            with self.http.stream("GET", url, params=params,
                                  headers={"Accept": "application/x-ndjson"}) as response:
                if response.status_code != 200:
                    response.read()
                    self._check(url, response)
                pending = b""
                for chunk in response.iter_bytes(1 << 16):
                    with self._lock:
                        self.received += len(chunk)
                    pending += chunk
                    lines = pending.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        yield line + b"\n"
                if pending:
                    yield pending
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {exc.__class__.__name__}: {exc}") from exc


def _checkpoint_from(response: httpx.Response, where: str) -> bytes:
    body = response.content
    if len(body) > NOTE_LIMIT:
        raise FetchError(f"{where}: checkpoint larger than {NOTE_LIMIT} bytes")
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            note = response.json()["checkpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"{where}: JSON without a 'checkpoint' string") from exc
        if not isinstance(note, str):
            raise FetchError(f"{where}: 'checkpoint' is not a string")
        return note.encode()
    return body


def _size(note: bytes, where: str) -> tuple[str, int]:
    """The note as text and the size its checkpoint commits to (its signatures are verified
    later, with the rest of the export)."""
    try:
        return note.decode("utf-8"), parse_checkpoint(note).size
    except (UnicodeDecodeError, CheckpointError) as exc:
        raise FetchError(f"{where}: not a checkpoint ({exc})") from exc


def _trust_from(response: httpx.Response, where: str) -> Trust:
    try:
        return Trust.from_json(response.json())
    except ValueError as exc:  # JSON errors and ExportError alike
        raise FetchError(f"{where}: not a usable trust policy ({exc})") from exc


def fetch_api(url: str, out: Path, *, api_key: str | None = None, pinned: Trust | None = None,
              page: int = DEFAULT_PAGE, timeout: float = 60.0, overwrite: bool = False,
              progress: Callable[[int, int], None] | None = None) -> Fetched:
    """Download checkpoint, trust and entries from the JSON API into the export folder `out`."""
    if page < 1:
        raise FetchError(f"page: must be >= 1, got {page}")
    client = _Client(url, api_key, timeout)
    try:
        where = client.base + CHECKPOINT_PATH_API
        note = _checkpoint_from(client.get(CHECKPOINT_PATH_API,
                                           accept="text/plain, application/json;q=0.5"), where)
        text, size = _size(note, where)
        served = _trust_from(client.get(TRUST_PATH_API), client.base + TRUST_PATH_API)

        def lines() -> Iterator[bytes]:
            start = 0
            while start < size:
                limit = min(page, size - start)
                got = 0
                for raw in client.stream_lines(EXPORT_PATH_API, {"start": start, "limit": limit}):
                    if got == limit:
                        raise FetchError(f"GET {client.base}{EXPORT_PATH_API}?start={start}&limit="
                                         f"{limit}: more than {limit} lines (the server must "
                                         f"honour start and limit)")
                    if not raw.endswith(b"\n"):
                        raise FetchError(f"entry {start + got}: the response ended inside a line")
                    got += 1
                    yield raw[:-1]
                if got == 0:
                    raise FetchError(f"GET {client.base}{EXPORT_PATH_API}?start={start}: no "
                                     f"entries, but the checkpoint covers {size}")
                start += got
                if progress is not None:
                    progress(start, size)

        count = write_export(out, lines(), text, served, overwrite=overwrite)
        return Fetched(out, count, pinned or served, client.received)
    finally:
        client.close()


def fetch_tiles(url: str, out: Path, *, api_key: str | None = None, pinned: Trust | None = None,
                parallel: int = 8, timeout: float = 60.0, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> Fetched:
    """Download a tlog-tiles prefix's checkpoint and entry bundles (in parallel) into `out`.

    The hash tiles are not needed to rebuild the export (the verifier recomputes the tree);
    `audit verify` on a tile folder checks them (audit/tiles.py `verify_tiles`).
    """
    client = _Client(url, api_key, timeout)
    try:
        where = f"{client.base}/{CHECKPOINT_PATH}"
        note = client.get("/" + CHECKPOINT_PATH).content
        if len(note) > NOTE_LIMIT:
            raise FetchError(f"{where}: checkpoint larger than {NOTE_LIMIT} bytes")
        text, size = _size(note, where)
        served = pinned
        if served is None:
            try:
                response = client.get("/" + TRUST_PATH)
            except FetchError as exc:
                raise FetchError(f"{exc} (a tile prefix need not serve trust.json: pin one with "
                                 f"--trust)") from exc
            served = _trust_from(response, f"{client.base}/{TRUST_PATH}")
        full, partial = divmod(size, TILE_WIDTH)
        bundles = [Tile(ENTRIES, n) for n in range(full)]
        if partial:
            bundles.append(Tile(ENTRIES, full, partial))

        def download(tile: Tile) -> list[bytes]:
            try:
                return decode_bundle(client.get("/" + tile.path).content, tile)
            except TileError as exc:
                raise FetchError(f"{client.base}/{exc}") from exc

        def lines() -> Iterator[bytes]:
            with ThreadPoolExecutor(max(1, parallel)) as pool:
                window = max(1, parallel) * 4  # bundles in flight, consumed in order
                pending = deque(pool.submit(download, tile) for tile in bundles[:window])
                queued = len(pending)
                done = 0
                while pending:
                    entries = pending.popleft().result()
                    if queued < len(bundles):
                        pending.append(pool.submit(download, bundles[queued]))
                        queued += 1
                    for entry in entries:
                        if b"\n" in entry:
                            raise FetchError(f"entry {done}: contains a newline (not canonical "
                                             f"JSON)")
                        done += 1
                        yield entry
                    if progress is not None:
                        progress(done, size)

        count = write_export(out, lines(), text, served, overwrite=overwrite)
        return Fetched(out, count, pinned or served, client.received)
    finally:
        client.close()
