"""Hostile-file generators shared by the fuzz suites of the `audit` and `exchange node` CLIs
(tests/audit/test_cli_hostile.py, tests/node/test_cli_hostile.py): JSON values and documents
no reader may accept, and the check that what a command prints is safe to show."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from audit.verify import MAX_LINE_BYTES

#: Bidirectional-override and isolate characters: never printed raw by a refusal.
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def printable_output(output: str) -> bool:
    """Whether command output is printable text: no raw control or bidi character."""
    return all(ch == "\n" or (ch.isprintable() and ch not in BIDI) for ch in output)


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "0" + "}" * depth


deep_values = st.builds(_deep, st.one_of(st.integers(200, 2_000), st.integers(2_000, 200_000)),
                        st.sampled_from(["array", "object"]))
huge_numbers = st.one_of(
    st.builds(lambda sign, n: sign + "9" * n, st.sampled_from(["", "-"]), st.integers(16, 12_000)),
    st.builds(lambda n: "1" + "0" * n + ".5", st.integers(300, 6_000)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1E+99999", "2e-99999"]))
hostile_chars = st.one_of(st.characters(categories=["Cc", "Cf", "Co"]), st.sampled_from(list(BIDI)))
hostile_strings = st.one_of(
    st.builds(lambda s: json.dumps(s, ensure_ascii=False), st.text(hostile_chars, min_size=1, max_size=8)),
    st.builds(lambda s: '"' + s + '"', st.text(hostile_chars, min_size=1, max_size=8)),  # raw controls
    st.builds(lambda n: f'"x\\u{n:04x}y"', st.integers(0xD800, 0xDFFF)),  # lone surrogate
    st.builds(lambda n: f'{{"\\u{n:04x}":1}}', st.integers(0xD800, 0xDFFF)))
duplicate_keys = st.builds(lambda k, a, b: f'{{"{k}":{a},"{k}":{b}}}', st.sampled_from(["a", "v", "kind"]),
                           st.integers(0, 9), st.integers(0, 9))
hostile_values = st.one_of(deep_values, huge_numbers, hostile_strings, duplicate_keys,
                           st.just('"' + "a" * (MAX_LINE_BYTES + 10) + '"'))


def hostile_documents(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """JSON documents (and non-documents) that no reader may accept: hostile values in place of
    the whole document or of one field, duplicated fields, invalid UTF-8, truncation."""
    text = json.dumps(valid, separators=(",", ":"))

    def field_replaced(key: str, value: str) -> bytes:
        return text.replace(json.dumps(valid[key]), value, 1).encode("utf-8", "surrogatepass")

    return st.one_of(
        hostile_values.map(lambda value: value.encode("utf-8", "surrogatepass")),
        st.builds(field_replaced, st.sampled_from(sorted(valid)),
                  st.one_of(deep_values, huge_numbers, hostile_strings, st.just("[]"), st.just("{}")))
        .filter(lambda document: document != text.encode()),  # "[]" for an empty list is no change
        st.builds(lambda key: (text[:-1] + f',"{key}":{json.dumps(valid[key])}}}').encode(),
                  st.sampled_from(sorted(valid))),  # the same field twice
        st.builds(lambda at: text.encode()[:at] + b"\xff" + text.encode()[at:], st.integers(0, len(text))),
        st.builds(lambda at: text.encode()[:at], st.integers(0, len(text) - 1)),
        st.binary(max_size=200))
