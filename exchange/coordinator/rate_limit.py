"""A per-caller fixed-window rate limit for the handlers marked `opt={"rate_limited": True}`.

Why not Litestar's RateLimitMiddleware (used before): it keeps, per caller, the list of every
request's timestamp in the current window and JSON-decodes and re-encodes that whole list on
every request, only to count it. That is one integer per request in the window, decoded and
encoded on every request; under load (the API benchmark) it was a large share of the event
loop's time on POST /v1/studies and grew with the window. Here a window is two integers
(count, reset time) in a dict: O(1).

Same behaviour as before: one window per caller (the API key prefix, else the client address),
`limit` requests per `window_s` seconds, a 429 problem answer (TooManyRequestsException, turned
into RFC 9457 by the app's handler) with Retry-After once it is used up, and the IETF draft
RateLimit headers (RateLimit-Policy, -Limit, -Remaining, -Reset) on the limited routes'
answers. In memory, per process, like Litestar's default store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import time as _epoch_seconds
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import TooManyRequestsException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

MAX_TRACKED_CALLERS = 100_000  # expired windows are swept once this many are held


class FixedWindowRateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit: int, window_s: int,
                 identify: Callable[[Scope], str]) -> None:
        if limit < 1 or window_s < 1:
            raise ValueError("rate limit: limit and window_s must be >= 1")
        self.app = app
        self.limit = limit
        self.window_s = window_s
        self._identify = identify
        self._windows: dict[str, list[int]] = {}  # caller -> [count, reset (epoch s)]
        self._lock = threading.Lock()  # the app may run several event loops' worth of threads

    def _take(self, caller: str) -> tuple[bool, int, int]:
        """Count one request of `caller`: (allowed, remaining, seconds to reset)."""
        now = int(_epoch_seconds())
        with self._lock:
            window = self._windows.get(caller)
            if window is None or window[1] <= now:
                if len(self._windows) >= MAX_TRACKED_CALLERS:
                    self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
                window = self._windows[caller] = [0, now + self.window_s]
            allowed = window[0] < self.limit
            if allowed:
                window[0] += 1
            return allowed, self.limit - window[0], window[1] - now

    def _headers(self, remaining: int, reset_s: int) -> dict[str, str]:
        return {"RateLimit-Policy": f"{self.limit}; w={self.window_s}",
                "RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(remaining),
                "RateLimit-Reset": str(reset_s)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: Any = scope.get("route_handler")
        if scope["type"] != "http" or handler is None or not handler.opt.get("rate_limited"):
            await self.app(scope, receive, send)
            return
        allowed, remaining, reset_s = self._take(self._identify(scope))
        headers = self._headers(remaining, reset_s)
        if not allowed:
            raise TooManyRequestsException(headers={**headers, "Retry-After": str(reset_s)})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                mutable = MutableScopeHeaders(message)
                for name, value in headers.items():
                    mutable[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
