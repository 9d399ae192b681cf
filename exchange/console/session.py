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
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from litestar import Request

COOKIE = "hx_console"
#: Defaults of the coordinator's `console_idle_timeout_s` and `console_session_max_s` settings.
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000


class SignInRequired(Exception):  # noqa: N818 - a control-flow signal, not an error
    """No valid session: the console answers with a redirect to the sign-in page. `reason`
    ("expired", "idle" or "") is shown there, so a person knows why they were signed out."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class SessionStore:
    """session id -> (API key, created, last use). Thread-safe (sync handlers run on worker
    threads). A plain class: Litestar would try to convert a dataclass dependency field by field.

    Two limits, both enforced here on every request (the cookie's Max-Age only asks the browser):
    `idle_seconds` since the session's last request, and `max_age_seconds` since sign-in,
    however active the session is (a stolen cookie stops working, and a revoked role is picked
    up even by a session that never idles). `clock` is monotonic seconds."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS, max_age_seconds: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (idle_seconds > 0 and max_age_seconds > 0):
            raise ValueError("console sessions: idle and maximum age must be positive")
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._items: dict[str, tuple[str, float, float]] = {}
        self._lock = threading.Lock()

    def create(self, api_key: str) -> str:
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            if len(self._items) >= MAX_SESSIONS:
                self._expire(now)
                if len(self._items) >= MAX_SESSIONS:  # drop the least recently used rather than grow
                    oldest = min(self._items, key=lambda k: self._items[k][2])
                    del self._items[oldest]
            self._items[session_id] = (api_key, now, now)
        return session_id

    def lookup(self, session_id: str | None) -> tuple[str | None, str]:
        """(the session's API key, "") and the session's last use moved to now; or (None, why):
        "expired" past its maximum age, "idle" past the idle timeout (the session is then
        dropped), "" when there is no such session."""
        if not session_id:
            return None, ""
        now = self._clock()
        with self._lock:
            item = self._items.get(session_id)
            if item is None:
                return None, ""
            api_key, created, last = item
            reason = self._ended(created, last, now)
            if reason:
                del self._items[session_id]
                return None, reason
            self._items[session_id] = (api_key, created, now)
            return api_key, ""

    def api_key(self, session_id: str | None) -> str | None:
        return self.lookup(session_id)[0]

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._items.pop(session_id or "", None)

    def _ended(self, created: float, last: float, now: float) -> str:
        if now - created > self.max_age_seconds:
            return "expired"
        if now - last > self.idle_seconds:
            return "idle"
        return ""

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, c, t) in self._items.items() if self._ended(c, t, now)]:
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
