"""Hostile text in requests: refused where it enters, naming where it was found.

Why: a NUL character is accepted by SQLite and refused by PostgreSQL (a 500 there); control and
bidirectional-override characters in a title or a reason change what an operator reads in a
terminal, a log line or the console (the "Trojan Source" trick); a JSON value nested thousands
deep overflows the recursion of every walker that comes after the parser. So:

- free-text fields (titles, names, labels, reasons) take printable text only (`PlainText`);
- the payload of a signed entry is walked once: at most `MAX_PAYLOAD_DEPTH` levels, no control
  character other than tab and newline, no bidirectional control (`payload_problems`);
- the request's path and query string hold no control character (`RequestTextMiddleware`),
  checked before routing, so no handler and no database ever sees one.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from litestar.types import ASGIApp, HTTPResponseStartEvent, Receive, Scope, Send
from pydantic import AfterValidator

#: Unicode's bidirectional formatting characters (UAX #9): embeddings, overrides, isolates, marks.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
MAX_PAYLOAD_DEPTH = 32
_ALLOWED_IN_PAYLOAD = frozenset("\t\n")


def text_problem(value: str, allowed: frozenset[str] = frozenset()) -> str | None:
    """Why `value` is no acceptable text (None: it is): the first control, surrogate,
    private-use or bidirectional-control character, by code point."""
    for ch in value:
        if ch in allowed:
            continue
        if ch in BIDI_CONTROLS:
            return f"must not contain bidirectional control characters (U+{ord(ch):04X})"
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Co"):
            kind = {"Cc": "control", "Cs": "surrogate", "Co": "private-use"}[category]
            return f"must not contain {kind} characters (U+{ord(ch):04X})"
    return None


def _plain_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A free-text field: printable characters only (a pydantic type: the refusal names the field).
PlainText = Annotated[str, AfterValidator(_plain_text)]


def payload_problems(value: Any, field: str = "payload", depth: int = 0) -> list[dict[str, str]]:
    """Every hostile string or key in a signed entry's payload, and nesting over the limit,
    each with the path of the field (`payload.reasons.0`). Stops at the first problem of a
    branch that is too deep."""
    if depth > MAX_PAYLOAD_DEPTH:
        return [{"field": field, "reason": f"nested deeper than {MAX_PAYLOAD_DEPTH} levels"}]
    found: list[dict[str, str]] = []
    if isinstance(value, str):
        problem = text_problem(value, _ALLOWED_IN_PAYLOAD)
        if problem is not None:
            found.append({"field": field, "reason": problem})
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(str(key))
            if problem is not None:
                found.append({"field": field, "reason": f"a key {problem}"})
                continue
            found.extend(payload_problems(item, f"{field}.{key}", depth + 1))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(payload_problems(item, f"{field}.{index}", depth + 1))
    return found


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
