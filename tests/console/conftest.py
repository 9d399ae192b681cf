"""Fixtures for the console: a signed-in browser-less client (TestClient) per user, and a live
coordinator (uvicorn on a free loopback port) for the browser tests."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.exchange.conftest import World, make_world

CSRF_INPUT = re.compile(r'name="_csrf_token" value="([^"]+)"')


class Console:
    """One person's console session over the World's TestClient. Cookies are kept here, per
    person (the session cookie is Secure off loopback, so httpx's jar would not send it over
    the test's plain http)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.cookies: dict[str, str] = {}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = self.world.client.request(method, path, headers=headers, follow_redirects=False, **kwargs)
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in header or value in ("", '""'):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._send("GET", path, **kwargs)

    def csrf(self) -> str:
        """The CSRF token of a fresh form (the sign-in page always has one)."""
        match = CSRF_INPUT.search(self.get("/console/sign-in").text)
        assert match, "no CSRF input on the sign-in form"
        return match.group(1)

    def post(self, path: str, data: dict[str, Any], *, csrf: bool = True) -> httpx.Response:
        form = dict(data)
        if csrf:
            form.setdefault("_csrf_token", self.csrf())
        return self._send("POST", path, data=form)

    def sign_in(self, who: str) -> httpx.Response:
        response = self.post("/console/sign-in", {"api_key": self.world.keys[who]})
        assert response.status_code == 303, response.text
        return response


@pytest.fixture(scope="module")
def console_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("console")
    yield from make_world(f"sqlite:///{tmp / 'console.db'}", tmp)


@pytest.fixture
def as_user(console_world: World) -> Any:
    def make(who: str) -> Console:
        console = Console(console_world)
        console.sign_in(who)
        return console

    return make


class LiveServer:
    """The same app served by uvicorn on 127.0.0.1 (lifespan off: the World's TestClient owns
    start-up and shut-down of the runtime)."""

    def __init__(self, world: World) -> None:
        import uvicorn

        from exchange.coordinator.app import create_app

        config = uvicorn.Config(
            create_app(world.runtime),
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console-live", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live console server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def screenshot_dir(tmp: Path) -> Path:
    """docs/console when EXCHANGE_CONSOLE_SCREENSHOTS=docs (to refresh the documentation),
    else a temporary folder."""
    import os

    from tests.conftest import REPO_ROOT

    if os.environ.get("EXCHANGE_CONSOLE_SCREENSHOTS") == "docs":
        out = REPO_ROOT / "docs" / "console"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp
