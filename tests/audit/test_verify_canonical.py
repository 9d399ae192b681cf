"""The verifier's fast canonical check agrees with the rfc8785 package on every JSON value."""

from __future__ import annotations

import json
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.verify import NotCanonicalError, parse_canonical_line

SAFE = 2**53 - 1
# An integral float beyond 2**53 prints as an integer that then parses as a Python int, which
# rfc8785 (and so the verifier) refuses, as I-JSON asks: such values cannot be in a log.
floats = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: not (f.is_integer() and abs(f) > SAFE))
scalars = st.none() | st.booleans() | st.integers(-SAFE, SAFE) | floats | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(values)
def test_canonical_lines_are_accepted(value: Any) -> None:
    line = rfc8785.dumps(value)
    assert rfc8785.dumps(parse_canonical_line(line)) == line


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from(["python", "ascii", "spaced", "unsorted"]))
def test_other_encodings_are_accepted_exactly_when_canonical(value: Any, style: str) -> None:
    if style == "python":
        line = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    elif style == "ascii":
        line = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    elif style == "spaced":
        line = json.dumps(value, sort_keys=True).encode()
    else:
        line = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if line == rfc8785.dumps(value):
        parse_canonical_line(line)
    else:
        with pytest.raises(NotCanonicalError):
            parse_canonical_line(line)


@pytest.mark.parametrize(("text", "ok"), [
    (b'{"a":0.00001}', True), (b'{"a":1e-05}', False), (b'{"a":1e-7}', True),
    (b'{"a":5}', True), (b'{"a":5.0}', False), (b'{"a":-0}', False), (b'{"a":0}', True),
    (b'{"a":123.456}', True), (b'{"a":1e+21}', True), (b'{"a":1e21}', False),
    (b'{"a":100000000000000000000}', False), (b'{"a":9007199254740991}', True),
    (b'{"a":9007199254740992}', False), (b'{"a":NaN}', False), (b'{"a":Infinity}', False),
    (b'{"a":"\\u00e9"}', False), ('{"a":"é"}'.encode(), True), (b'{"a":"\\/"}', False),
    (b'{"a":"\\u001f"}', True), (b'{"a":"\\u001F"}', False), (b'{"a":"\\n"}', True),
    (b'{"a":"\\ud800"}', False), (b'{"b":1,"a":2}', False), (b'{"a":1,"a":2}', False),
    ('{"\U0001f600":1,"\ufb01":2}'.encode(), True), ('{"\ufb01":2,"\U0001f600":1}'.encode(), False),
])
def test_edge_cases(text: bytes, ok: bool) -> None:
    if ok:
        assert rfc8785.dumps(parse_canonical_line(text)) == text
    else:
        with pytest.raises((NotCanonicalError, ValueError)):
            parse_canonical_line(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, max_size=5), st.text(min_size=1, max_size=12))
def test_a_signed_entry_knows_its_exact_leaf(payload: dict[str, Any], kind: str) -> None:
    """sign_entry splices the signature into the signed bytes instead of encoding the envelope
    again: the result must be byte for byte the RFC 8785 encoding of the whole envelope, and
    the verifier's cut (signing_input_from_line) must give the signed bytes back."""
    from audit.entry import sign_entry
    from audit.signing import Signer
    from audit.verify import signing_input_from_line

    entry = sign_entry(Signer.generate(), kind, payload)
    assert entry._leaf == rfc8785.dumps(entry.to_json())
    assert signing_input_from_line(entry._leaf, entry) == entry.signing_input()



def test_a_changed_entry_forgets_its_leaf() -> None:
    """`dataclasses.replace` never carries a leaf over to an entry with other fields."""
    import dataclasses

    from audit.entry import sign_entry
    from audit.signing import Signer

    entry = sign_entry(Signer.generate(), "study.submit", {"study_id": "s-1"})
    assert entry._leaf
    changed = dataclasses.replace(entry, payload={"study_id": "s-2"})
    assert changed._leaf == b"" and changed.leaf_bytes() == rfc8785.dumps(changed.to_json())


@pytest.mark.parametrize(("text", "plain"), [
    (b'{"a":[1,2.5,"x"],"b":{"c":null,"d":true}}', True),
    (b'{"a":1.0}', False),  # canonical is 1: the general path refuses it
    (b'{"a":1e+21}', True),  # ECMAScript's form (Python prints the same), vouched by rfc8785
    (b'{"a":[0.00001,{"b":1e-7}]}', True),  # ECMAScript's forms, not Python's (1e-05, 1e-07)
    (b'{"a":1e-05}', False),  # Python's form: not canonical
    (b'{"a":1e400}', False),  # overflows to infinity
    (b'{"a":12345678901234567}', False),  # outside +-(2**53 - 1)
    (b'{"a":[-9007199254740992]}', False),
    (b'{"a":9007199254740991,"b":"12345678901234567890"}', True),  # in range; digits in a string
    (b'{"a":"\\n"}', False),  # escapes: encoders differ, the general path decides
    (b'{"b":1,"a":2}', False),  # unsorted
    (b'{"a":1,"a":1}', False),  # a repeated key
    (b'{"a": 1}', False),
    ('{"a":"é"}'.encode(), False),
])
def test_the_plain_path_takes_only_lines_it_can_vouch_for(text: bytes, plain: bool) -> None:
    """Ordinary lines are checked by msgspec (the fast path); every other line goes the general
    way, and both agree with rfc8785 on what is canonical."""
    from audit.verify import _NOT_PLAIN, CanonicalParser

    value = CanonicalParser()._parse_plain(text)
    assert (value is not _NOT_PLAIN) == plain
    if plain:
        assert rfc8785.dumps(value) == text
        assert json.loads(text) == value  # numbers are Python numbers again (no msgspec.Raw)


ENVELOPE = (b'{"key_id":"k1","kind":"study.submitted","payload":%s,"signature":"c2ln",'
            b'"time":"2026-01-05T08:00:05.887193Z","v":1}')


@pytest.mark.parametrize("payload", [b'{}', b'{"delta":0.00001,"epsilon":8.75}',
                                     b'{"a":[1,{"b":null}],"h":"12345678901234567890"}'])
def test_the_envelope_fast_path_gives_the_fields_of_the_line(payload: bytes) -> None:
    """An ordinary line is decoded straight into the verifier's envelope record: the same
    fields (and numbers) as the general path's Entry."""
    from audit.verify import CanonicalParser, _Envelope, envelope_from_json

    line = ENVELOPE % payload
    fast = CanonicalParser().envelope(line)
    assert isinstance(fast, _Envelope)
    slow = envelope_from_json(json.loads(line))
    assert (fast.kind, fast.key_id, fast.time, fast.payload, fast.signature, fast.v) == \
        (slow.kind, slow.key_id, slow.time, slow.payload, slow.signature, slow.v)


@pytest.mark.parametrize(("line", "reason"), [
    (ENVELOPE.replace(b'"v":1', b'"v":2') % b'{}', "v: unsupported envelope version 2"),
    (ENVELOPE.replace(b'"v":1', b'"v":1.0') % b'{}', "not in RFC 8785 canonical form"),
    (ENVELOPE.replace(b'"v":1', b'"v":true') % b'{}', "v: unsupported envelope version True"),
    (ENVELOPE.replace(b'"k1"', b'""') % b'{}', "key_id: must be a non-empty string"),
    (ENVELOPE.replace(b'"k1"', b'7') % b'{}', "key_id: must be a non-empty string"),
    (ENVELOPE % b'[]', "payload: must be a JSON object"),
    (ENVELOPE.replace(b'.887193Z', b'Z') % b'{}', "time: not RFC 3339 UTC with microseconds"),
    (ENVELOPE.replace(b'"v":1}', b'"v":1,"x":1}') % b'{}', "envelope: unknown field(s) ['x']"),
    (ENVELOPE.replace(b'"time":"2026-01-05T08:00:05.887193Z",', b'') % b'{}',
     "envelope: missing field(s) ['time']"),
    (ENVELOPE.replace(b'"kind":"study.submitted",', b'"kind":"a","kind":"b",') % b'{}',
     "duplicate key 'kind'"),
    (ENVELOPE % b'{"a":1e-05}', "not in RFC 8785 canonical form"),
    (ENVELOPE % b'{"a":9007199254740992}', "cannot be canonicalized"),
])
def test_the_envelope_fast_path_refuses_what_the_general_path_refuses(line: bytes,
                                                                      reason: str) -> None:
    """A line the fast path cannot vouch for goes the general way, which names the reason."""
    from audit.entry import MalformedEntryError
    from audit.verify import CanonicalParser

    with pytest.raises((NotCanonicalError, MalformedEntryError)) as caught:
        CanonicalParser().envelope(line)
    assert reason in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, max_size=5),
       st.sampled_from(["canonical", "python", "ascii"]))
def test_the_envelope_path_agrees_with_the_general_path(payload: dict[str, Any], style: str) -> None:
    """Whatever the payload and its encoding, `envelope` accepts a line exactly when the
    general path (parse + envelope_from_json) does, with the same fields."""
    from audit.entry import MalformedEntryError
    from audit.verify import CanonicalParser, envelope_from_json

    envelope = {"key_id": "k1", "kind": "study.submitted", "payload": payload,
                "signature": "c2ln", "time": "2026-01-05T08:00:05.887193Z", "v": 1}
    if style == "canonical":
        line = rfc8785.dumps(envelope)
    else:
        line = json.dumps(envelope, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=style == "ascii").encode()
    try:
        general = envelope_from_json(CanonicalParser().parse(line))
    except (NotCanonicalError, MalformedEntryError):
        with pytest.raises((NotCanonicalError, MalformedEntryError)):
            CanonicalParser().envelope(line)
        return
    fast = CanonicalParser().envelope(line)
    assert (fast.kind, fast.key_id, fast.time, fast.payload, fast.signature, fast.v) == \
        (general.kind, general.key_id, general.time, general.payload, general.signature, general.v)
    assert rfc8785.dumps(fast.payload) == rfc8785.dumps(general.payload)
