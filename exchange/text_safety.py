"""Hostile text in requests: refused where it enters, naming where it was found.

Why: a NUL character is accepted by SQLite and refused by PostgreSQL (a 500 there); control and
bidirectional-override characters in a title or a reason change what an operator reads in a
terminal, a log line or the console (the "Trojan Source" trick); a JSON value nested thousands
deep overflows the recursion of every walker that comes after the parser. So:

- free-text fields (titles, names, labels, reasons) take printable text only (`PlainText`);
- the payload of a signed entry is walked once: at most `MAX_PAYLOAD_DEPTH` levels, no control
  character other than tab and newline, no bidirectional control (`payload_problems`);
- the request's path and query string hold no control character (the coordinator's
  `exchange.coordinator.request_text.RequestTextMiddleware`), checked before routing, so no
  handler and no database ever sees one.

Shared by the coordinator's API and the node's importer (which refuses the same text in a
hospital's files), so it sits below both: the node never imports the coordinator.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

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
