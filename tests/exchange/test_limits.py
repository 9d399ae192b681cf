"""Rate limits and body size: a clear 429 / 413 problem answer, nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.exchange.conftest import World, make_world, study_body


@pytest.fixture
def limited(sqlite_url: str, tmp_path: Path) -> Iterator[World]:
    yield from make_world(sqlite_url, tmp_path, rate_limit_per_minute=3, max_body_bytes=4096)


def test_submissions_are_rate_limited(limited: World) -> None:
    answers = [limited.as_("alice", "POST", "/v1/studies", json=study_body(token_budget=1))
               for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
    assert answers[0].headers["RateLimit-Limit"] == "3"
    assert answers[0].headers["RateLimit-Policy"] == "3; w=60"
    assert 0 < int(answers[0].headers["RateLimit-Reset"]) <= 60
    size = limited.runtime.audit_log.size()
    response = limited.as_("alice", "POST", "/v1/studies", json=study_body(token_budget=1))
    assert response.status_code == 429
    assert response.headers["content-type"].startswith("application/problem+json")
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert limited.runtime.audit_log.size() == size
    # Per key: another researcher is not throttled by alice's submissions, and reads never are.
    assert limited.as_("bob", "POST", "/v1/studies", json=study_body(token_budget=1)).status_code == 201
    reads = [limited.as_("alice", "GET", "/v1/studies") for _ in range(5)]
    assert all(r.status_code == 200 and "RateLimit-Limit" not in r.headers for r in reads)


def test_the_window_resets(limited: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import exchange.coordinator.rate_limit as rate_limit

    clock = [1_000_000.0]
    monkeypatch.setattr(rate_limit, "_epoch_seconds", lambda: clock[0])
    codes = [limited.as_("anna", "POST", "/v1/studies", json=study_body(token_budget=1)).status_code
             for _ in range(4)]
    assert codes == [201, 201, 201, 429]
    clock[0] += 60  # the next window
    assert limited.as_("anna", "POST", "/v1/studies", json=study_body(token_budget=1)).status_code == 201


def test_configured_body_limit(limited: World) -> None:
    size = limited.runtime.audit_log.size()
    big = study_body(title="x" * 200, columns={"labs": [f"column_{i}" for i in range(400)]})
    response = limited.as_("alice", "POST", "/v1/studies", json=big)
    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert limited.runtime.audit_log.size() == size


def test_expired_windows_are_swept_and_bad_limits_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import exchange.coordinator.rate_limit as rate_limit

    async def app(_scope: object, _receive: object, _send: object) -> None:
        return None

    with pytest.raises(ValueError, match="limit and window_s"):
        rate_limit.FixedWindowRateLimitMiddleware(app, limit=0, window_s=60, identify=str)
    clock = [1_000.0]
    monkeypatch.setattr(rate_limit, "_epoch_seconds", lambda: clock[0])
    monkeypatch.setattr(rate_limit, "MAX_TRACKED_CALLERS", 3)
    limiter = rate_limit.FixedWindowRateLimitMiddleware(app, limit=2, window_s=60, identify=str)
    assert [limiter._take("a")[0] for _ in range(3)] == [True, True, False]
    limiter._take("b")
    limiter._take("c")
    clock[0] += 60  # a, b and c have expired
    assert limiter._take("d") == (True, 1, 60)  # the sweep made room; nobody else is held
    assert set(limiter._windows) == {"d"}
    assert limiter._take("a") == (True, 1, 60)  # a new window for a
