"""Hostile requests against every endpoint of the coordinator (issue 19's fuzz suite, API part).

Hypothesis generates requests for every operation of the served OpenAPI document, as the
caller the operation is for (hospital requests really RFC 9421-signed, so a hostile body gets
past authentication to the validators), with hostile bodies (deep nesting, control and
bidirectional characters, lone surrogates, huge and non-finite numbers, duplicate keys,
oversized bodies, the wrong JSON type, invalid UTF-8), hostile path parameters and hostile
query strings. Every answer must be below 500, an RFC 9457 problem when it is a refusal, and
hold no traceback; no error may be logged. The requests actually sent are counted, and the
count is asserted (at least `TARGET` per run, issue 19's target) along with the database's
integrity afterwards (the audit log verifies, the ledger conserves). Schema-driven generation
(schemathesis, positive and negative) is in test_schemathesis.py.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.signing import Signer
from exchange.coordinator.client import decision_entry
from exchange.http_signing import sign_request
from tests.exchange.conftest import World, make_world, study_body

#: Issue 19's target: hostile requests per CI run, all below 500. The two properties below send
#: BODY_EXAMPLES + TARGET_EXAMPLES requests (hypothesis runs exactly max_examples valid examples
#: here: nothing is filtered or assumed), a little above the target and no more: every request
#: is suite time (docs/testing.md).
TARGET = 2_000
BODY_EXAMPLES = 1_400
TARGET_EXAMPLES = 640
MAX_BODY = 64 * 1024  # the fuzz world's body limit, so that "oversized" costs little to send
SENT: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz")
    yield from make_world(f"sqlite:///{tmp / 'fuzz.db'}", tmp, rate_limit_per_minute=10**9,
                          max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def operations(fuzz_world: World) -> list[dict[str, Any]]:
    """Every operation of the served document: method, path template, tags, query parameter
    names and the request body's top-level property names."""
    document = fuzz_world.client.get("/schema/openapi.json").json()
    schemas = document.get("components", {}).get("schemas", {})
    found = []
    for path, item in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            body = (operation.get("requestBody", {}).get("content", {})
                    .get("application/json", {}).get("schema", {}))
            if "$ref" in body:
                body = schemas.get(body["$ref"].rsplit("/", 1)[1], {})
            found.append({"method": method.upper(), "path": path, "tags": operation.get("tags", []),
                          "query": [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"],
                          "fields": sorted(body.get("properties", {})), "has_body": bool(body)})
    assert len(found) >= 25
    return found


# -- strategies --------------------------------------------------------------------------------------


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "0" + "}" * depth


hostile_chars = st.one_of(st.characters(categories=["Cc", "Cf", "Co", "Zl", "Zp"]),
                          st.sampled_from(list(BIDI)))
#: JSON texts of hostile values (as they would appear inside a body).
hostile_json_values = st.one_of(
    st.builds(_deep, st.sampled_from([40, 200, 1_500, 20_000]), st.sampled_from(["array", "object"])),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1E+99999", "9" * 5_000,
                     "-" + "9" * 400, "1" + "0" * 400 + ".5", "2e-99999", "-0", "0.1e-400"]),
    st.builds(lambda s: json.dumps(s, ensure_ascii=False), st.text(hostile_chars, min_size=1, max_size=10)),
    st.builds(lambda s: json.dumps("x" + s + "y"), st.text(hostile_chars, min_size=1, max_size=4)),
    st.builds(lambda n: f'"a\\u{n:04x}b"', st.integers(0xD800, 0xDFFF)),  # lone surrogate
    st.sampled_from(["null", "true", "[]", "{}", '""', "0", "-1", "[null]", '{"": null}',
                     '"' + "x" * 5_000 + '"']),
    st.builds(lambda k: json.dumps({k: 1}), st.text(hostile_chars, min_size=1, max_size=3)),  # hostile key
)


def _seed(world: World, operation: dict[str, Any], study_id: str) -> dict[str, Any]:
    """A valid body for the operation where one is at hand, else one holding each field."""
    if operation["path"] == "/v1/studies" and operation["method"] == "POST":
        return study_body()
    if "decision" in operation["path"] or operation["path"].endswith("/entries"):
        return decision_entry(world.hospitals["h-one"], "h-one", study_id, decision="refuse",
                              reasons=["fuzz"]).to_json()
    return {name: "x" for name in operation["fields"]}


@st.composite
def hostile_bodies(draw: st.DrawFn, seed: dict[str, Any]) -> bytes:
    """A body with one hostile thing: a hostile value for one field (a nested one, for signed
    entries), a hostile whole body, a duplicated key, an oversized body or invalid bytes."""
    how = draw(st.sampled_from(["field", "field", "field", "whole", "duplicate", "oversized", "bytes"]))
    text = json.dumps(seed, separators=(",", ":"))
    if how == "field" and seed:
        target: dict[str, Any] = dict(seed)
        holder = target
        if isinstance(seed.get("payload"), dict) and draw(st.booleans()):
            holder = target["payload"] = dict(seed["payload"])
        holder[draw(st.sampled_from(sorted(holder)))] = "@@HOSTILE@@"
        text = json.dumps(target, separators=(",", ":"))
        return text.replace('"@@HOSTILE@@"', draw(hostile_json_values)).encode("utf-8", "surrogatepass")
    if how == "duplicate" and seed:
        key = draw(st.sampled_from(sorted(seed)))
        return (text[:-1] + f',"{key}":{draw(hostile_json_values)}}}').encode("utf-8", "surrogatepass")
    if how == "oversized":
        return (text[:-1] + ',"pad":"' + "x" * (MAX_BODY + draw(st.integers(1, 4096))) + '"}').encode()
    if how == "bytes":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]))
        return text.encode()[:at] + junk + text.encode()[at:]
    return draw(hostile_json_values).encode("utf-8", "surrogatepass")


hostile_segments = st.one_of(
    st.text(hostile_chars, min_size=1, max_size=6),
    st.sampled_from(["..", "%2e%2e", "a" * 5_000, "st-" + "0" * 20, "9" * 30, "-1", " ", "\ud800", "é", "🙂",
                     "x'; DROP TABLE studies; --", "{study_id}", "%", "%%", "%zz"]))


def _path(template: str, segment: str, study_id: str) -> str:
    def fill(match: re.Match[str]) -> str:
        if segment:
            return quote(segment.encode("utf-8", "surrogatepass"), safe="%")
        return "acme" if match.group(1) == "organisation_id" else study_id

    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", fill, template)


def _send(world: World, operation: dict[str, Any], path: str, query: list[tuple[str, str]],
          body: bytes | None) -> Any:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    params = [(k, v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")) for k, v in query]
    request = world.client.build_request(operation["method"], path, content=body, headers=headers,
                                         params=params or None)
    if "hospitals" in operation["tags"]:
        # a URL the signing library cannot parse (a bare '%') goes unsigned and must be refused (401)
        with contextlib.suppress(HTTPMessageSignaturesException):
            sign_request(request, world.hospitals["h-one"])
    else:
        who = "alice" if "studies" in operation["tags"] else "operator"
        request.headers["Authorization"] = f"Bearer {world.keys[who]}"
    return world.client.send(request)


def _check(response: Any, what: str) -> None:
    SENT[what.split(" ", 1)[0]] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), (what, response.text)
        problem = response.json()
        assert problem["status"] == response.status_code and problem["title"]


@pytest.fixture(scope="module")
def running_study(fuzz_world: World) -> str:
    return str(fuzz_world.submit(min_hospitals=3)["id"])


@pytest.fixture(scope="module")
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Error events logged while the fuzz runs (an unexpected failure logs one)."""
    with structlog.testing.capture_logs() as events:
        yield events


@settings(FUZZ, max_examples=BODY_EXAMPLES)
@given(data=st.data())
def test_hostile_bodies_on_every_endpoint(fuzz_world: World, operations: list[dict[str, Any]],
                                          running_study: str, logged_errors: list[dict[str, Any]],
                                          data: st.DataObject) -> None:
    operation = data.draw(st.sampled_from([o for o in operations if o["method"] != "GET"]), label="operation")
    body = data.draw(hostile_bodies(_seed(fuzz_world, operation, running_study)), label="body")
    path = _path(operation["path"], "", running_study)
    response = _send(fuzz_world, operation, path, [], body)
    _check(response, f"body {operation['method']} {path}")


@settings(FUZZ, max_examples=TARGET_EXAMPLES)
@given(data=st.data())
def test_hostile_paths_and_queries_on_every_endpoint(fuzz_world: World, operations: list[dict[str, Any]],
                                                     running_study: str, logged_errors: list[dict[str, Any]],
                                                     data: st.DataObject) -> None:
    operation = data.draw(st.sampled_from(operations), label="operation")
    segment = data.draw(hostile_segments, label="segment") if "{" in operation["path"] else ""
    names = operation["query"] or ["limit"]
    query = data.draw(st.lists(st.tuples(st.sampled_from([*names, "x\x00"]), st.one_of(
        hostile_segments, st.sampled_from(["-1", "1e999", "NaN", "9" * 400, "", "true", "[]"]))), max_size=3),
        label="query")
    body = json.dumps(_seed(fuzz_world, operation, running_study)).encode() if operation["has_body"] else None
    response = _send(fuzz_world, operation, _path(operation["path"], segment, running_study), query, body)
    _check(response, f"target {operation['method']} {operation['path']}")


def test_the_fuzz_sent_enough_and_broke_nothing(fuzz_world: World,
                                                logged_errors: list[dict[str, Any]]) -> None:
    """Runs after the two properties (file order): the count of hostile requests really sent,
    no error logged, and the log and the ledger still sound."""
    from tests.exchange.test_lifecycle import fold, served_balances

    assert SENT["body"] + SENT["target"] >= TARGET, SENT
    # the hostile input reached the parser, the size limit, the validators and the handlers
    # (a signature or a key that failed would make them all 401s)
    assert {400, 404, 413, 422} <= set(STATUSES) and STATUSES[401] <= SENT["target"] // 50, STATUSES
    assert [e for e in logged_errors if e.get("log_level") in ("error", "critical")] == []
    assert fold(fuzz_world) == served_balances(fuzz_world)
    # the world still works: a good request after all that
    assert fuzz_world.submit()["status"] == "submitted"


def test_a_signed_request_from_an_unknown_key_with_a_hostile_body_is_401(fuzz_world: World) -> None:
    request = fuzz_world.client.build_request("POST", "/v1/hospital/entries", content=b"[" * 50_000,
                                              headers={"Content-Type": "application/json"})
    sign_request(request, Signer.generate())
    response = fuzz_world.client.send(request)
    assert response.status_code == 401, response.text

