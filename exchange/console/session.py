"""Console sessions: an API key exchanged once for an opaque session cookie.

Why server-side: the cookie holds only a random session id; the API key stays in this
process's memory, and every request authenticates it again through the coordinator (a revoked
key ends its sessions at once, and the role is the key's, as in the API). Sessions live in one
process: a restart signs everyone out, which is the safe failure.
"""

from __future__ import annotations

import secrets
import threading
import time
from ipaddress import ip_address
from typing import Any

from litestar import Request

COOKIE = "hx_console"
IDLE_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000


class SignInRequired(Exception):  # noqa: N818 - a control-flow signal, not an error
    """No valid session: the console answers with a redirect to the sign-in page."""


class SessionStore:
    """session id -> (API key, last use). Thread-safe (sync handlers run on worker threads).
    A plain class: Litestar would try to convert a dataclass dependency field by field."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._items: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def create(self, api_key: str) -> str:
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._items) >= MAX_SESSIONS:
                self._expire(now)
                if len(self._items) >= MAX_SESSIONS:  # drop the oldest rather than grow
                    oldest = min(self._items, key=lambda k: self._items[k][1])
                    del self._items[oldest]
            self._items[session_id] = (api_key, now)
        return session_id

    def api_key(self, session_id: str | None) -> str | None:
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            item = self._items.get(session_id)
            if item is None:
                return None
            if now - item[1] > self.idle_seconds:
                del self._items[session_id]
                return None
            self._items[session_id] = (item[0], now)
            return item[0]

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._items.pop(session_id or "", None)

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, t) in self._items.items() if now - t > self.idle_seconds]:
            del self._items[key]


def is_loopback(request: Request[Any, Any, Any]) -> bool:
    """Whether the console is reached on a loopback address (the only place a cookie may go
    without `Secure`: a browser keeps Secure cookies from http://localhost and 127.0.0.1)."""
    host = request.url.hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
