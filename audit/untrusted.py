"""Reading files an auditor did not write: strict JSON documents and printable messages.

Why: every file the `audit` command reads (an export's entries, checkpoint and trust file, a state
file, an earlier checkpoint) may come from an adversary. Python's JSON reader gives up on such
input with exceptions that are not `JSONDecodeError` (RecursionError for deep nesting, ValueError
for an integer over 4,300 digits) and silently keeps the last of duplicate keys; and a message
that quotes hostile text can carry terminal escapes, bidirectional overrides (text that displays
differently from what it is) or lone surrogates (which cannot even be printed as UTF-8). This
module turns all of that into a refusal with a reason, and makes any quoted text safe to print.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

#: A message longer than this is cut (a hostile value quoted in full could be megabytes).
MAX_MESSAGE_CHARS = 1000
#: Integers with more digits than this are beyond any range a log file uses (RFC 8785 allows
#: |n| <= 2**53 - 1, 16 digits) and are refused before Python converts them.
MAX_INTEGER_DIGITS = 20
#: Characters that reorder the display of text around them (Unicode bidirectional controls).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class UntrustedJSONError(ValueError):
    """A JSON document is refused; the message says why (without the document's text)."""


class DuplicateKeyError(UntrustedJSONError):
    """An object repeats a key (parsers disagree on which value counts)."""


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` with every control, format (bidirectional included), surrogate, private-use and
    unassigned character escaped as \\xNN / \\uNNNN, cut to `limit` characters."""
    out = []
    for char in text:
        if char.isprintable() and char not in _BIDI_CONTROLS and unicodedata.category(char)[0] != "C":
            out.append(char)
        else:
            out.append(_escape(char))
    safe = "".join(out)
    if len(safe) > limit:
        return f"{safe[:limit]}... ({len(safe) - limit} more characters)"
    return safe


def _refuse_constant(token: str) -> Any:
    raise UntrustedJSONError(f"{token} is not a JSON value")


def _bounded_int(token: str) -> int:
    if len(token.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise UntrustedJSONError(f"an integer of {len(token.lstrip('-'))} digits is out of range")
    return int(token)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"duplicate key {printable(repr(key), 80)}")
            seen.add(key)
    return obj


def load_json(raw: bytes, *, max_depth: int | None = None) -> Any:
    """Parse one JSON document from untrusted bytes. UntrustedJSONError says what is wrong:
    invalid UTF-8, invalid JSON (the position), nesting too deep for the parser (or deeper than
    `max_depth` levels, for readers that walk the document recursively), an integer out of
    range, NaN or Infinity, a duplicate key."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedJSONError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_constant=_refuse_constant,
                           object_pairs_hook=_unique_keys)
    except UntrustedJSONError:
        raise
    except RecursionError as exc:
        raise UntrustedJSONError("nested too deeply for the JSON parser") from exc
    except json.JSONDecodeError as exc:
        raise UntrustedJSONError(f"not valid JSON ({exc})") from exc
    except ValueError as exc:  # a number the parser could not convert
        raise UntrustedJSONError(f"not valid JSON ({printable(str(exc), 200)})") from exc
    _require_unicode(value)
    if max_depth is not None and _depth_exceeds(value, max_depth):
        raise UntrustedJSONError(f"nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels. Iterative: no stack."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _require_unicode(value: Any) -> None:
    """JSON's \\uD800-style escapes can spell lone surrogates, which are not Unicode text (they
    cannot be encoded, printed or signed): refuse them. Iterative, so depth costs no stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UntrustedJSONError(f"a string holds a lone surrogate "
                                         f"({_escape(item[exc.start])}), which is not Unicode text") from exc
