"""The request's target (path and query string) checked for hostile text before routing.

Why: a control or bidirectional-control character in a path or query reaches handlers, logs
and the database otherwise; the rule is `exchange.text_safety.text_problem`, the same as for
free-text fields and signed payloads.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from litestar.types import ASGIApp, HTTPResponseStartEvent, Receive, Scope, Send

from exchange.text_safety import text_problem


def _request_text_problem(scope: Scope) -> tuple[str, str] | None:
    """(field, reason) for a path or query string that holds a control character, or bytes
    that are no UTF-8, once percent-decoding is undone."""
    # raw_path: the target as sent (some servers and test clients leave the query on it)
    raw_path = (scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")).split(b"?")[0]
    for field, raw in (("path", raw_path), ("query", scope.get("query_string", b""))):
        decoded = unquote_to_bytes(raw.replace(b"+", b" ") if field == "query" else raw)
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return field, "is not valid UTF-8 once percent-decoded"
        problem = text_problem(text)
        if problem is not None:
            return field, problem
    return None


class RequestTextMiddleware:
    """Refuses (400, a problem naming `path` or `query`) a request whose target holds control,
    surrogate or bidirectional-control characters, before routing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _request_text_problem(scope)
            if problem is not None:
                await _refuse(scope, send, *problem)
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, field: str, reason: str) -> None:
    import json

    from exchange.coordinator.problems import PROBLEM_JSON, TYPE_BASE

    body = json.dumps({"type": TYPE_BASE + "validation", "title": "Bad request", "status": 400,
                       "detail": f"{field}: {reason}", "instance": scope["path"],
                       "errors": [{"field": field, "reason": reason}]}, ensure_ascii=True).encode()
    start: HTTPResponseStartEvent = {
        "type": "http.response.start", "status": 400,
        "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
