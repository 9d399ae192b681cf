"""Per-request metrics and the access log, in one ASGI middleware.

Why one middleware of our own instead of Litestar's PrometheusMiddleware plus a separate access
log: every request pays for each middleware layer (a Request object, label dicts, a send
wrapper, a structlog processor chain). On the GET study path the two
layers were a large share of the request (docs/benchmarks.md). This one wraps `send` once, looks the
Prometheus children up in a dict (no `.labels()` per request) and renders the access line
through the same structlog configuration as every other log line.

Metric names are those Litestar's Prometheus plugin used (prefix `exchange`):
`exchange_requests_total`, `exchange_request_duration_seconds`,
`exchange_requests_in_progress`, `exchange_requests_error_total`, labelled by method, route
template (never the raw path: one series per route, not per study id), status code and app.

The access log names the method, the route's path, the status, the duration and the caller
(API key prefix or hospital id, not secrets): never the query string, headers or body.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram

from exchange.logging import get_logger

APP_NAME = "exchange"
_LABELS = ("method", "path", "status_code", "app_name")

REQUESTS = Counter("exchange_requests_total", "Total requests", _LABELS)
REQUEST_SECONDS = Histogram("exchange_request_duration_seconds", "Request duration, in seconds",
                            _LABELS)
REQUESTS_IN_PROGRESS = Gauge("exchange_requests_in_progress", "Requests being served",
                             ("method", "path", "app_name"), multiprocess_mode="livesum")
REQUEST_ERRORS = Counter("exchange_requests_error_total", "Requests answered with a 5xx", _LABELS)

access_log = get_logger("exchange.access")


class _Series:
    """The labelled Prometheus children of one (method, route, status): looked up once."""

    __slots__ = ("count", "errors", "seconds")

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        self.count = REQUESTS.labels(*labels)
        self.seconds = REQUEST_SECONDS.labels(*labels)
        self.errors = REQUEST_ERRORS.labels(*labels) if int(labels[2]) >= 500 else None


class ObservabilityMiddleware:
    """Counts, times and logs every HTTP request (metrics: all but `/metrics` itself)."""

    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True,
                 metrics_excluded: tuple[str, ...] = ("/metrics",)) -> None:
        self.app = app
        self._log = access_log_enabled
        self._excluded = metrics_excluded
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._in_progress: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        method: str = scope["method"]  # type: ignore[typeddict-item]  # http, checked above
        # The route template (Litestar sets it when a route matched); without one, one series
        # for all, never one per raw path.
        route: str = scope.get("path_template") or "<unmatched>"
        gauge = None
        if scope["path"] not in self._excluded:
            gauge = self._in_progress.get((method, route))
            if gauge is None:
                gauge = self._in_progress.setdefault(
                    (method, route), REQUESTS_IN_PROGRESS.labels(method, route, APP_NAME))
            gauge.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            if gauge is not None:
                gauge.dec()
                key = (method, route, status)
                series = self._series.get(key)
                if series is None:
                    series = self._series.setdefault(
                        key, _Series((method, route, str(status), APP_NAME)))
                series.count.inc()
                series.seconds.observe(elapsed)
                if series.errors is not None:
                    series.errors.inc()
            if self._log:
                principal = scope.get("state", {}).get("principal")
                access_log.info("http.request", method=method, path=scope["path"], status=status,
                                duration_ms=round(elapsed * 1000, 2),
                                caller=getattr(principal, "ref", None),
                                client=(scope.get("client") or ("", 0))[0])
