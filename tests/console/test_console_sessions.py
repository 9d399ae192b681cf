"""Console sessions end server-side: after the idle timeout and after the maximum age (both
configurable), a request with the old cookie is refused and redirected to sign-in, which says
why; the cookie's Max-Age follows the setting. The store's rules with a controlled clock; the
coordinator's behaviour over HTTP with short limits."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from exchange.console.session import SessionStore
from exchange.coordinator.app import app_config_from_settings
from exchange.settings import CoordinatorSettings
from tests.console.conftest import Console
from tests.exchange.conftest import World, make_world


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_store_ends_an_idle_session_and_one_past_its_maximum_age() -> None:
    clock = Clock()
    store = SessionStore(idle_seconds=60, max_age_seconds=300, clock=clock)
    idle = store.create("key-1")
    clock.now += 61
    assert store.lookup(idle) == (None, "idle")
    assert store.lookup(idle) == (None, "")  # dropped: gone for good

    active = store.create("key-2")
    for _ in range(5):  # used every 59 s: never idle
        clock.now += 59
        assert store.lookup(active) == ("key-2", "")
    clock.now += 59  # 354 s after sign-in
    assert store.lookup(active) == (None, "expired")
    assert store.lookup("never-issued") == (None, "")
    with pytest.raises(ValueError, match="positive"):
        SessionStore(idle_seconds=0)


def test_the_limits_are_settings_and_bad_values_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGE_CONSOLE_IDLE_TIMEOUT_S", "120")
    monkeypatch.setenv("EXCHANGE_CONSOLE_SESSION_MAX_S", "3600")
    config = app_config_from_settings(CoordinatorSettings(), migrate=False)
    assert (config.console_idle_timeout_s, config.console_session_max_s) == (120, 3600)
    monkeypatch.setenv("EXCHANGE_CONSOLE_IDLE_TIMEOUT_S", "0")
    with pytest.raises(ValidationError, match="console_idle_timeout_s"):
        CoordinatorSettings()


@pytest.fixture(scope="module")
def idle_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("idle")
    yield from make_world(f"sqlite:///{tmp / 'idle.db'}", tmp, console_idle_timeout_s=1.0,
                          console_session_max_s=600.0)


@pytest.fixture(scope="module")
def short_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("short")
    yield from make_world(f"sqlite:///{tmp / 'short.db'}", tmp, console_idle_timeout_s=6.0,
                          console_session_max_s=7.0)


def _refused(console: Console, path: str, reason: str) -> None:
    """The page is not served: a redirect to sign-in naming the page and why; the cookie cleared;
    the sign-in page says why."""
    cookie = console.cookies["hx_console"]
    response = console.get(path)
    assert response.status_code in (302, 303), response.text
    target = urlsplit(response.headers["location"])
    assert target.path == "/console/sign-in"
    assert parse_qs(target.query) == {"next": [path], "ended": [reason]}
    assert "hx_console" not in console.cookies  # the response deleted it
    page = console.get(response.headers["location"]).text
    assert "Sign in again to continue" in page
    # the old cookie, replayed, is no session at all
    console.cookies["hx_console"] = cookie
    again = console.get(path)
    assert again.status_code in (302, 303) and "ended=" not in again.headers["location"]


def test_an_idle_session_is_refused_and_sent_to_sign_in(idle_world: World) -> None:
    console = Console(idle_world)
    response = console.sign_in("alice")
    assert "Max-Age=600" in response.headers["set-cookie"]  # the browser's copy: the maximum age
    assert console.get("/console/studies").status_code == 200
    time.sleep(1.6)
    _refused(console, "/console/studies", "idle")
    # signing in again works, and lands on the page asked for
    again = console.post("/console/sign-in",
                         {"api_key": idle_world.keys["alice"], "next": "/console/studies"})
    assert again.status_code == 303 and again.headers["location"] == "/console/studies"
    assert console.get("/console/studies").status_code == 200


def test_an_active_session_ends_at_its_maximum_age(short_world: World) -> None:
    """Used well within the idle timeout, the session still ends at the maximum age."""
    console = Console(short_world)
    console.sign_in("operator")
    signed_in = time.monotonic()
    time.sleep(3.5)
    assert console.get("/console/hospitals").status_code == 200  # 3.5 s: neither limit
    time.sleep(max(0.0, signed_in + 8.5 - time.monotonic()))  # 5 s idle (< 6), 8.5 s old (> 7)
    _refused(console, "/console/hospitals", "expired")


def test_the_sign_in_page_ignores_an_unknown_reason(idle_world: World) -> None:
    page = Console(idle_world).get("/console/sign-in?ended=<b>x</b>").text
    assert "Sign in again" not in page and "<b>x</b>" not in page


def test_settings_file_sets_the_limits(tmp_path: Path) -> None:
    toml = tmp_path / "exchange.toml"
    toml.write_text("console_idle_timeout_s = 90\nconsole_session_max_s = 1800\n")
    CoordinatorSettings.toml_path = toml
    try:
        settings = CoordinatorSettings()
    finally:
        CoordinatorSettings.toml_path = None
    assert (settings.console_idle_timeout_s, settings.console_session_max_s) == (90, 1800)


def test_in_the_browser_an_idle_session_lands_on_sign_in_with_the_reason(idle_world: World) -> None:
    """Chromium (Playwright): signed in, idle past the limit, the next navigation shows the
    sign-in page with the reason; signing in again returns to the page asked for."""
    from tests.console.conftest import LiveServer
    from tests.console.test_browser import _chromium, check

    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with LiveServer(idle_world) as live, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_context(base_url=live).new_page()
            page.goto("/console/studies")
            page.get_by_label("API key").fill(idle_world.keys["alice"])
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/studies")
            cookie = next(c for c in page.context.cookies() if c["name"] == "hx_console")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            time.sleep(1.6)
            page.goto("/console/studies")
            assert "/console/sign-in" in page.url and "ended=idle" in page.url
            assert "period without activity" in page.locator("#session-ended").inner_text()
            assert not [c for c in page.context.cookies() if c["name"] == "hx_console"]
            check(page, Path(tempfile.mkdtemp()), "session-ended")
            page.get_by_label("API key").fill(idle_world.keys["alice"])
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/studies")
        finally:
            browser.close()
