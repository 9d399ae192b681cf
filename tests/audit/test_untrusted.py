"""Strict JSON for files an auditor did not write, and printable messages (audit.untrusted)."""

from __future__ import annotations

import pytest

from audit.store import MAX_ENTRY_BYTES
from audit.untrusted import DuplicateKeyError, UntrustedJSONError, load_json, printable
from audit.verify import MAX_LINE_BYTES


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b'{"v":' + b"9" * 5_000 + b"}", "an integer of 5000 digits is out of range"),
    (b"-" + b"1" * 21, "an integer of 21 digits is out of range"),
    (b'{"x":NaN}', "NaN is not a JSON value"),
    (b"[-Infinity]", "-Infinity is not a JSON value"),
    (b'{"a":1,"b":{"c":2,"c":3}}', "duplicate key 'c'"),
    (b'{"x":"\\ud800"}', r"lone surrogate (\ud800)"),
    (b'{"\\udfff":1}', r"lone surrogate (\udfff)"),
    (b'{"x":"\xff"}', "not valid UTF-8 (invalid start byte at byte 6)"),
    (b'{"x":"\x01"}', "not valid JSON (Invalid control character at: line 1 column 7 (char 6))"),
    (b'{"x":', "not valid JSON (Expecting value: line 1 column 6 (char 5))"),
])
def test_hostile_documents_are_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(UntrustedJSONError) as refused:
        load_json(raw)
    assert reason in str(refused.value)


def test_duplicate_keys_have_their_own_error() -> None:
    with pytest.raises(DuplicateKeyError):
        load_json(b'{"a":1,"a":1}')


def test_ordinary_documents_are_read_as_json_reads_them() -> None:
    text = ('{"origin":"exchange.example/log","n":9007199254740991,"f":0.5,"s":"\u202e is data",'
            '"l":[null,true]}')
    assert load_json(text.encode()) == {"origin": "exchange.example/log", "n": 9007199254740991, "f": 0.5,
                                        "s": "\u202e is data", "l": [None, True]}


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert printable("a\x1b[31mb\u202ec\ud800d\te\x85") == "a\\x1b[31mb\\u202ec\\ud800d\\x09e\\x85"
    assert printable("x" * 50, limit=10) == "x" * 10 + "... (40 more characters)"
    assert printable("entrée ✓ 患者") == "entrée ✓ 患者"


def test_the_verifier_refuses_lines_the_store_would_refuse() -> None:
    assert MAX_LINE_BYTES == MAX_ENTRY_BYTES
