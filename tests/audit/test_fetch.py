"""`audit fetch` against a real HTTP server on loopback: the JSON API and tlog-tiles, and every
way a server can break the contract."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.fetch import FetchError, fetch_api, fetch_tiles
from audit.generate import GeneratedLog, generate_log
from audit.tiles import write_tiles
from audit.verify import verify_export

from .export_server import API_KEY, ExportServer

runner = CliRunner()


@pytest.fixture(scope="module")
def log() -> GeneratedLog:
    return generate_log(730, seed=12, witnesses=3)


@pytest.fixture
def server(log: GeneratedLog, tmp_path: Path) -> Iterator[ExportServer]:
    export = tmp_path / "served"
    log.write(export)
    tiles = tmp_path / "served-tiles"
    write_tiles(tiles, log.lines(), log.checkpoint(), log.trust)
    with ExportServer(export, tiles, page_cap=300) as running:
        yield running


def test_fetch_pages_through_the_api_and_the_folder_verifies(server: ExportServer, log: GeneratedLog,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "fetched"
    fetched = fetch_api(server.url, out, api_key=API_KEY, page=200)
    assert fetched.entries == 730
    assert (out / "entries.jsonl").read_bytes() == b"".join(line + b"\n" for line in log.lines())
    assert (out / "checkpoint").read_text() == log.checkpoint()
    assert verify_export(out).ok
    pages = [r for r in server.requests if r.startswith("/v1/audit/export")]
    assert pages == [f"/v1/audit/export?start={s}&limit={min(200, 730 - s)}"
                     for s in (0, 200, 400, 600)]
    # A server cap below the page size is followed (300 here): pages continue where they end.
    server.requests.clear()
    fetch_api(server.url, tmp_path / "capped", api_key=API_KEY, page=500)
    assert [r for r in server.requests if r.startswith("/v1/audit/export")] == [
        "/v1/audit/export?start=0&limit=500", "/v1/audit/export?start=300&limit=430",
        "/v1/audit/export?start=600&limit=130"]


def test_the_cli_fetches_verifies_and_enforces_the_quorum(server: ExportServer, log: GeneratedLog,
                                                          tmp_path: Path) -> None:
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(log.trust.to_json()))
    out = tmp_path / "fetched"
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(out), "--trust",
                                 str(pinned), "--api-key", API_KEY])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "OK 730 entries" in result.stdout and "witnesses: 3 cosigned (quorum 2)" in result.stdout
    # Without a pinned policy the server's own is used, and the output says so.
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "b")],
                           env={"EXCHANGE_API_KEY": API_KEY})
    assert result.exit_code == 0 and "SERVER's trust.json" in result.stderr
    # A checkpoint cosigned by one witness only: fetched, then refused below the quorum (1).
    (server.export / "checkpoint").write_text(log.checkpoint(cosigners=["hospital:h03"]))
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "c"),
                                 "--trust", str(pinned), "--api-key", API_KEY])
    assert result.exit_code == 1 and "below the quorum of 2" in " ".join(result.stdout.split())
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "d"),
                                 "--trust", str(pinned), "--api-key", API_KEY,
                                 "--witness-quorum", "1"])
    assert result.exit_code == 0


def test_a_pinned_policy_catches_a_server_that_serves_another_log(server: ExportServer,
                                                                  tmp_path: Path) -> None:
    stranger = generate_log(5, seed=99)
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(stranger.trust.to_json()))
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "x"),
                                 "--trust", str(pinned), "--api-key", API_KEY])
    assert result.exit_code == 1 and "INVALID" in result.stdout


@pytest.mark.parametrize(("misbehave", "message"), [
    ("ignore-paging", "more than 200 lines (the server must honour start and limit)"),
    ("truncate-line", "the response ended inside a line"),
    ("empty-page", "no entries, but the checkpoint covers 730"),
])
def test_contract_breaches_are_unusable_and_write_nothing(server: ExportServer, tmp_path: Path,
                                                          misbehave: str, message: str) -> None:
    server.misbehave = misbehave
    out = tmp_path / "fetched"
    with pytest.raises(FetchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fetch_api(server.url, out, api_key=API_KEY, page=200)
    assert not out.exists() and not list(tmp_path.glob(".fetched*"))
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(out), "--api-key",
                                 API_KEY, "--page", "200"])
    assert result.exit_code == 2


def test_tampered_entries_are_fetched_then_found_invalid(server: ExportServer, tmp_path: Path) -> None:
    server.misbehave = "tamper"
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "t"),
                                 "--api-key", API_KEY])
    assert result.exit_code == 1 and "INVALID entry" in result.stdout


def test_http_errors_name_the_request(server: ExportServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"/v1/audit/checkpoint: HTTP 401"):
        fetch_api(server.url, tmp_path / "x", api_key="wrong")
    with pytest.raises(FetchError, match="ConnectError"):
        fetch_api("http://127.0.0.1:9", tmp_path / "x", api_key=API_KEY, timeout=2)
    result = runner.invoke(app, ["fetch", "--url", server.url, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "HTTP 401" in result.stderr


def test_fetch_from_tiles_in_parallel(server: ExportServer, log: GeneratedLog, tmp_path: Path) -> None:
    out = tmp_path / "from-tiles"
    fetched = fetch_tiles(server.url + "/tiles", out, parallel=4)
    assert fetched.entries == 730
    assert (out / "entries.jsonl").read_bytes() == b"".join(line + b"\n" for line in log.lines())
    assert verify_export(out).ok
    bundles = sorted(r for r in server.requests if "/tile/entries/" in r)
    assert bundles == ["/tiles/tile/entries/000", "/tiles/tile/entries/001",
                       "/tiles/tile/entries/002.p/218"]
    result = runner.invoke(app, ["fetch", "--tiles", "--url", server.url + "/tiles", "--out",
                                 str(tmp_path / "cli")])
    assert result.exit_code == 0, result.stdout + result.stderr
    server.misbehave = "missing-tile"
    with pytest.raises(FetchError, match="tile/entries/000: HTTP 404"):
        fetch_tiles(server.url + "/tiles", tmp_path / "none", parallel=2)
    assert not (tmp_path / "none").exists()
