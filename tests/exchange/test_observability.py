"""Request metrics and the access log (exchange.coordinator.observability): one series per route
template and status (never per raw path), 5xx counted as errors, /metrics not measured, one
JSON-able access line per request naming the caller by key prefix, never by secret."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from exchange.study.lifecycle import StudyLifecycle
from tests.exchange.conftest import World, make_world

ROUTE = "/v1/studies/{study_id}"  # Litestar's path template (no type)


@pytest.fixture
def logged(sqlite_url: str, tmp_path: Path) -> Iterator[World]:
    yield from make_world(sqlite_url, tmp_path, access_log=True)


def _count(metric: str, path: str, status: int, method: str = "GET") -> float:
    value = REGISTRY.get_sample_value(metric, {"method": method, "path": path,
                                               "status_code": str(status), "app_name": "exchange"})
    return value or 0.0


def test_metrics_are_per_route_template_and_status(logged: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    study = logged.submit()
    ok, missing = _count("exchange_requests_total", ROUTE, 200), _count(
        "exchange_requests_total", ROUTE, 404)
    timed = _count("exchange_request_duration_seconds_count", ROUTE, 200)
    for _ in range(3):
        assert logged.as_("alice", "GET", f"/v1/studies/{study['id']}").status_code == 200
    assert logged.as_("alice", "GET", "/v1/studies/no-such-study").status_code == 404
    assert _count("exchange_requests_total", ROUTE, 200) == ok + 3
    assert _count("exchange_request_duration_seconds_count", ROUTE, 200) == timed + 3
    assert _count("exchange_requests_total", ROUTE, 404) == missing + 1
    assert REGISTRY.get_sample_value("exchange_requests_in_progress",
                                     {"method": "GET", "path": ROUTE, "app_name": "exchange"}) == 0

    def broken(*_args: object) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(StudyLifecycle, "get_study", broken)
    errors = _count("exchange_requests_error_total", ROUTE, 500)
    assert logged.as_("alice", "GET", f"/v1/studies/{study['id']}").status_code == 500
    assert _count("exchange_requests_error_total", ROUTE, 500) == errors + 1

    text = logged.client.get("/metrics").text
    assert f'path="{ROUTE}"' in text
    assert study["id"] not in text  # no series per raw path
    assert 'path="/metrics"' not in text


def test_one_access_line_per_request_without_secrets(logged: World) -> None:
    study = logged.submit()
    token = logged.keys["alice"]
    with capture_logs() as events:
        logged.as_("alice", "GET", f"/v1/studies/{study['id']}?secret=1")
        logged.as_("anonymous", "GET", "/v1/studies")
    lines = [e for e in events if e["event"] == "http.request"]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("GET", f"/v1/studies/{study['id']}", 200), ("GET", "/v1/studies", 401)]
    assert lines[0]["caller"] == f"apikey:{token.split('_')[1]}"
    assert lines[1]["caller"] is None
    assert all(e["duration_ms"] >= 0 for e in lines)
    flat = repr(lines)
    assert token not in flat and token.split("_", 2)[2] not in flat and "secret" not in flat


def test_start_up_objects_are_frozen_out_of_the_collector(logged: World) -> None:
    """The app's start-up (torch, templates) is moved out of the GC's generations, so full
    collections under load do not walk it again (a tail-latency stall otherwise)."""
    import gc

    assert gc.get_freeze_count() > 0
