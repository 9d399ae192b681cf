"""Bad input gets a clear 4xx problem answer naming the field, and changes nothing.

"Nothing stored" is checked the strong way: the audit log's size, the study count and the
balances are the same before and after."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from audit.signing import Signer
from exchange.coordinator.client import decision_entry
from exchange.coordinator.models import Role
from exchange.coordinator.registry import Principal
from exchange.http_signing import new_nonce, sign_request
from tests.exchange.conftest import World, study_body


@pytest.fixture
def world(shared_world: World) -> World:
    """Refusals change nothing, so one world per database serves the whole module."""
    return shared_world


def snapshot(world: World) -> tuple[int, int, dict[str, Any]]:
    studies = world.runtime.lifecycle.list_studies(Principal(role=Role.OPERATOR, ref="test"),
                                                     None, 0, 1)[1]
    return world.runtime.audit_log.size(), studies, world.runtime.registry.balances()


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    return dict(body)


def fields(body: dict[str, Any]) -> dict[str, str]:
    return {e["field"]: e["reason"] for e in body.get("errors", [])}


def test_every_problem_of_a_study_is_listed_at_once(world: World) -> None:
    before = snapshot(world)
    bad = study_body(purpose="DUO:0000007", disease=None, epsilon=0, delta=1.5, rounds=0,
                     min_hospitals=0, token_budget=10**9, template="logistic_regression",
                     task="regression", data_categories=["labs", "telepathy"],
                     columns={"vitals": [" heart rate"]}, colour="blue", title="")
    body = problem(world.as_("alice", "POST", "/v1/studies", json=bad), 422)
    errors = fields(body)
    for field in ("disease", "epsilon", "delta", "rounds", "min_hospitals", "task", "data_categories.1",
                  "columns.vitals", "columns.vitals.0", "colour", "title"):
        assert field in errors, (field, errors)
    assert "ICD-10" in errors["disease"]
    assert "template 'logistic_regression' is for task 'binary'" in errors["task"]
    assert "telepathy" in errors["data_categories.1"]
    assert snapshot(world) == before


def test_budget_over_balance_is_listed_with_other_problems(world: World) -> None:
    before = snapshot(world)
    balance = world.runtime.registry.balance("org:acme")
    body = problem(world.as_("alice", "POST", "/v1/studies",
                             json=study_body(token_budget=balance + 10_000, epsilon=-1)), 422)
    errors = fields(body)
    assert f"exceeds the organisation's balance {balance}" in errors["token_budget"]
    assert "epsilon" in errors
    # Alone, too: the budget check runs after a valid body as well.
    body = problem(world.as_("alice", "POST", "/v1/studies",
                             json=study_body(token_budget=balance + 1)), 422)
    assert list(fields(body)) == ["token_budget"]
    assert snapshot(world) == before


@pytest.mark.parametrize(("field", "value"), [
    ("purpose", "DUO:0000999"), ("disease", "XYZ"), ("template", "resnet"), ("epsilon", "3"),
    ("rounds", 2.5), ("rounds", True), ("token_budget", "100"), ("token_budget", 2**60),
    ("delta", 0), ("commercial", "no"), ("data_categories", []), ("columns", {}),
    ("label", "mean_radius"),
])
def test_single_bad_field_is_named(world: World, field: str, value: Any) -> None:
    before = snapshot(world)
    body = problem(world.as_("alice", "POST", "/v1/studies", json=study_body(**{field: value})), 422)
    assert field in {f.split(".")[0] for f in fields(body)}, body
    assert snapshot(world) == before


def test_malformed_json(world: World) -> None:
    before = snapshot(world)
    response = world.as_("alice", "POST", "/v1/studies", content=b'{"title": "x",',
                         headers={"Content-Type": "application/json"})
    body = problem(response, 400)
    assert "malformed JSON" in fields(body)["body"]
    response = world.as_("alice", "POST", "/v1/studies", content=b"[1, 2]",
                         headers={"Content-Type": "application/json"})
    assert "body" in fields(problem(response, 400))
    assert snapshot(world) == before


def test_oversized_body(world: World) -> None:
    before = snapshot(world)
    huge = study_body(title="x" * 100, columns={"labs": [f"c{i}" for i in range(120_000)]})
    response = world.as_("alice", "POST", "/v1/studies", content=json.dumps(huge).encode(),
                         headers={"Content-Type": "application/json"})
    problem(response, 413)
    assert snapshot(world) == before


def test_unknown_fields_in_operator_requests(world: World) -> None:
    before = snapshot(world)
    body = problem(world.as_("operator", "POST", "/v1/organisations",
                             json={"id": "x-org", "name": "X", "region": "de", "admin": True}), 422)
    assert set(fields(body)) == {"region", "admin"}
    body = problem(world.as_("operator", "POST", "/v1/hospitals", json={
        "id": "h-x", "organisation_id": "clinics", "name": "X", "signing_public_key": "AAAA",
        "flower_public_key": "k"}), 422)
    assert "32 bytes" in fields(body)["signing_public_key"]
    assert "OpenSSH" in fields(body)["flower_public_key"]
    ed25519_ssh = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMaHmSYSWGXMG5shgS1LMDZzi8LUEZLm7yQnQNbVrtsx")
    body = problem(world.as_("operator", "POST", "/v1/hospitals", json={
        "id": "h-y", "organisation_id": "clinics", "name": "Y",
        "signing_public_key": Signer.generate().public_key_b64, "flower_public_key": ed25519_ssh}), 422)
    assert "ECDSA" in fields(body)["flower_public_key"]
    body = problem(world.as_("operator", "POST", "/v1/ledger/mint",
                             json={"account": "acme", "amount": 0}), 422)
    assert set(fields(body)) == {"account", "amount"}
    assert snapshot(world) == before


def test_bad_signature_is_refused(world: World) -> None:
    before = snapshot(world)
    sid = world.submit()["id"]
    before = snapshot(world)
    entry = decision_entry(world.hospitals["h-one"], "h-one", sid, decision="approve", reasons=[])
    request = world.client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                         json=entry.to_json())
    sign_request(request, world.hospitals["h-one"])
    # Tamper with the body after signing: the Content-Digest no longer matches.
    tampered = json.dumps({**entry.to_json(), "kind": "study.decisionX"}).encode()
    request = world.client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                         content=tampered, headers=dict(request.headers))
    request.headers["content-length"] = str(len(tampered))
    body = problem(world.client.send(request), 401)
    assert "Content-Digest" in body["detail"]
    # Signed by an unregistered key.
    body = problem(world.signed("h-one", "GET", "/v1/hospital/me", signer=Signer.generate()), 401)
    assert "key" in body["detail"]
    # A decision entry signed by another hospital's key, sent by h-one: refused, named.
    foreign = decision_entry(world.hospitals["h-two"], "h-one", sid, decision="approve", reasons=[])
    body = problem(world.signed("h-one", "POST", f"/v1/hospital/studies/{sid}/decision",
                                json=foreign.to_json()), 422)
    assert "key_id" in fields(body)
    # A decision whose envelope signature was forged.
    forged = {**entry.to_json(), "signature": Signer.generate().public_key_b64 * 2}
    body = problem(world.signed("h-one", "POST", f"/v1/hospital/studies/{sid}/decision",
                                json=forged), 422)
    assert "signature" in fields(body)
    assert snapshot(world) == before


def test_replayed_request_is_refused(world: World) -> None:
    sid = world.submit()["id"]
    before = snapshot(world)
    nonce = new_nonce()
    entry = decision_entry(world.hospitals["h-one"], "h-one", sid, decision="refuse", reasons=["no"])
    request = world.client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                         json=entry.to_json())
    sign_request(request, world.hospitals["h-one"], nonce=nonce)
    replay = world.client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                        content=request.read(), headers=dict(request.headers))
    assert world.client.send(request).status_code == 201
    after_first = snapshot(world)
    assert after_first[0] == before[0] + 1
    body = problem(world.client.send(replay), 401)
    assert "replay" in body["detail"]
    assert snapshot(world) == after_first


def test_stale_or_future_signature_is_refused(world: World) -> None:
    for created in (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
                    dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)):
        request = world.client.build_request("GET", "/v1/hospital/me")
        sign_request(request, world.hospitals["h-one"], created=created)
        body = problem(world.client.send(request), 401)
        assert "created" in body["detail"] or "age" in body["detail"]


def test_unsigned_and_badly_authenticated_requests(world: World) -> None:
    problem(world.client.get("/v1/hospital/me"), 401)
    problem(world.client.get("/v1/studies", headers={"Authorization": "Basic abc"}), 401)
    problem(world.client.get("/v1/studies", headers={"Authorization": "Bearer hx_nope_nope"}), 401)
    alice = world.keys["alice"]
    problem(world.client.get("/v1/studies", headers={"X-API-Key": alice[:-2] + "xx"}), 401)
    response = world.client.get("/v1/studies", headers={"Signature-Input": "garbage", "Signature": "x"})
    assert "malformed" in problem(response, 401)["detail"] or "signature" in response.text


def test_bad_query_and_path_parameters(world: World) -> None:
    body = problem(world.as_("auditor", "GET", "/v1/audit/entries", params={"limit": 5000}), 422)
    assert "limit" in fields(body)
    body = problem(world.as_("auditor", "GET", "/v1/audit/proofs/inclusion",
                             params={"index": 5, "size": 10**6}), 422)
    assert "size" in fields(body)
    problem(world.as_("alice", "GET", "/v1/studies/st-does-not-exist"), 404)
    problem(world.as_("alice", "GET", "/v1/studies", params={"status": "sideways"}), 422)


def test_secure_aggregation_that_cannot_be_had_is_refused_at_submission(world: World) -> None:
    """SecAgg+ needs at least 3 hospitals per aggregate (docs/secure-aggregation.md): an explicit
    request with min_hospitals 2 is refused, naming the field, and nothing changes; a bad type too."""
    before = snapshot(world)
    body = problem(world.as_("alice", "POST", "/v1/studies",
                             json=study_body(secure_aggregation=True, min_hospitals=2)), 422)
    assert "min_hospitals >= 3" in fields(body)["secure_aggregation"]
    body = problem(world.as_("alice", "POST", "/v1/studies", json=study_body(secure_aggregation="yes")), 422)
    assert "secure_aggregation" in fields(body)
    assert snapshot(world) == before


def test_distributed_noise_without_secure_aggregation_is_refused_at_submission(world: World) -> None:
    """Distributed noise needs SecAgg+ (docs/secure-aggregation.md, "Noise"): with too few
    hospitals, with secure aggregation turned off, for a survival study, or an unknown mode, the
    submission is refused naming the field, and nothing changes."""
    before = snapshot(world)
    few = fields(problem(world.as_("alice", "POST", "/v1/studies",
                                   json=study_body(noise="distributed", min_hospitals=2)), 422))
    assert "min_hospitals >= 3" in few["noise"]
    off = fields(problem(world.as_("alice", "POST", "/v1/studies", json=study_body(
        noise="distributed", min_hospitals=3, secure_aggregation=False)), 422))
    assert "needs secure aggregation" in off["noise"]
    survival = study_body(template="cox_ph", task="survival", label="time", event="death",
                          noise="distributed", min_hospitals=3)
    assert "binary, regression and multi-class" in fields(
        problem(world.as_("alice", "POST", "/v1/studies", json=survival), 422))["noise"]
    unknown = study_body(noise="global")
    assert "noise" in fields(problem(world.as_("alice", "POST", "/v1/studies", json=unknown), 422))
    assert snapshot(world) == before


def test_distributed_noise_reaches_the_study_spec() -> None:
    from exchange.study.spec import AcceptedStudy, study_spec

    def spec(**overrides: Any) -> Any:
        return study_spec(AcceptedStudy(study_id="s", spec=study_body(**overrides), organisation_id="acme",
                                        region="DE"))

    assert spec(min_hospitals=3, noise="distributed").noise == "distributed"
    assert spec(min_hospitals=3).noise == "local"
    # the default leaves the canonical spec (and its hash, in every receipt) as it was
    assert "noise" not in spec(min_hospitals=3).to_json()


def test_secure_aggregation_is_on_by_default_from_three_hospitals() -> None:
    from exchange.study.spec import AcceptedStudy, study_spec

    def spec(**overrides: Any) -> Any:
        return study_spec(AcceptedStudy(study_id="s", spec=study_body(**overrides), organisation_id="acme",
                                        region="DE"))

    assert spec(min_hospitals=3).secure_aggregation is True
    assert spec(min_hospitals=2).secure_aggregation is False
    assert spec(min_hospitals=3, secure_aggregation=False).secure_aggregation is False


def test_survival_and_multiclass_studies_name_their_extra_field(world: World) -> None:
    before = snapshot(world)
    no_event = study_body(template="cox_ph", task="survival", label="time")
    errors = fields(problem(world.as_("alice", "POST", "/v1/studies", json=no_event), 422))
    assert "a survival study needs its event column" in errors["event"]
    stray = study_body(event="death")
    errors = fields(problem(world.as_("alice", "POST", "/v1/studies", json=stray), 422))
    assert "only a survival study has one" in errors["event"]
    same = study_body(template="cox_ph", task="survival", label="time", event="time")
    assert "must differ from the label" in fields(
        problem(world.as_("alice", "POST", "/v1/studies", json=same), 422))["event"]
    no_classes = study_body(template="softmax_regression", task="multiclass")
    errors = fields(problem(world.as_("alice", "POST", "/v1/studies", json=no_classes), 422))
    assert "number of classes" in errors["classes"]
    wrong_task = study_body(template="cox_ph", task="binary")
    assert "template 'cox_ph' is for task 'survival'" in fields(
        problem(world.as_("alice", "POST", "/v1/studies", json=wrong_task), 422))["task"]
    assert snapshot(world) == before
    accepted = world.submit(template="cox_ph", task="survival", label="time", event="event")
    assert accepted["spec"]["event"] == "event" and accepted["spec"]["task"] == "survival"


# ---------------------------------------------------------------- issue 19, findings 1, 2, 3, 9
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20_000 + b"0" + b"}" * 20_000])
def test_deeply_nested_json_is_a_named_400_with_or_without_credentials(world: World, body: bytes) -> None:
    before = snapshot(world)
    headers = {"Content-Type": "application/json"}
    assert problem(world.as_("anonymous", "POST", "/v1/studies", content=body, headers=headers), 401)
    refused = problem(world.as_("alice", "POST", "/v1/studies", content=body, headers=headers), 400)
    assert fields(refused) == {"body": "JSON nested too deeply"}
    entry = b'{"v":1,"kind":"study.decision","key_id":"' + b"0" * 32 + b'","time":"t","signature":"s",' \
            b'"payload":' + body + b"}"
    refused = problem(world.signed("h-one", "POST", "/v1/hospital/entries", content=entry), 400)
    assert fields(refused) == {"body": "JSON nested too deeply"}
    assert snapshot(world) == before


def test_a_payload_nested_within_the_parser_limit_is_still_refused_by_name(world: World) -> None:
    before = snapshot(world)
    entry = decision_entry(world.hospitals["h-one"], "h-one", "st-x", decision="refuse",
                           reasons=["r"]).to_json()
    entry["payload"]["reasons"] = [json.loads("[" * 200 + "]" * 200)]
    refused = problem(world.signed("h-one", "POST", "/v1/hospital/entries", json=entry), 422)
    assert "nested deeper than 32 levels" in fields(refused)["payload"]
    assert snapshot(world) == before


@pytest.mark.parametrize("text", ["a\x00b", "line\nbreak", "esc\x1b[2J", "admin\u202egnp.exe", "a\u2066b",
                                  "\ue000private", "del\x7f"])
def test_control_and_bidi_characters_in_free_text_are_refused_by_name(world: World, text: str) -> None:
    """Finding 3: a NUL in a title was 201 on SQLite and a 500 on PostgreSQL; both databases
    (the `shared_world` runs on each) now refuse it, naming the field, and store nothing."""
    before = snapshot(world)
    errors = fields(problem(world.as_("alice", "POST", "/v1/studies", json=study_body(title=text)), 422))
    assert "must not contain" in errors["title"]
    errors = fields(problem(world.as_("operator", "POST", "/v1/organisations",
                                      json={"id": "x-org", "name": text, "region": "DE"}), 422))
    assert "must not contain" in errors["name"]
    sid = world.submit()["id"]
    after_submit = snapshot(world)
    errors = fields(problem(world.as_("alice", "POST", f"/v1/studies/{sid}/cancel",
                                      json={"reason": text}), 422))
    assert "must not contain" in errors["reason"]
    refusal = decision_entry(world.hospitals["h-one"], "h-one", sid, decision="refuse", reasons=[text])
    errors = fields(problem(world.signed("h-one", "POST", f"/v1/hospital/studies/{sid}/decision",
                                         json=refusal.to_json()), 422))
    assert "payload.reasons" in " ".join(f"{k} {v}" for k, v in errors.items())
    assert snapshot(world) == after_submit
    assert before[0] < after_submit[0]


@pytest.mark.parametrize("target", ["/v1/studies/st-a%00b", "/v1/studies?status=submitted%00",
                                    "/v1/studies/%E2%80%AEx", "/v1/studies/%ff%fe", "/v1/api-keys/a%1bb"])
def test_control_characters_in_the_path_or_query_are_refused_by_name(world: World, target: str) -> None:
    who = "operator" if "api-keys" in target else "alice"
    method = "DELETE" if "api-keys" in target else "GET"
    body = problem(world.as_(who, method, target), 400)
    assert fields(body).keys() == {"query" if "?" in target else "path"}


@pytest.mark.parametrize("who", ["alice", "operator", "auditor"])
@pytest.mark.parametrize("path", ["/v1/hospital/studies/st-x/decision", "/v1/hospital/entries",
                                  "/v1/hospital/rewards/claims", "/v1/hospital/witness/cosignature"])
def test_authorization_comes_before_the_body_on_hospital_posts(world: World, who: str, path: str) -> None:
    """Finding 9: a caller who is no hospital learns nothing of the body's schema: 403, not 422."""
    for body in ({}, {"v": 2}, []):
        assert problem(world.as_(who, "POST", path, json=body), 403)["detail"].startswith(
            "this endpoint is for: hospital")


def test_an_unexpected_failure_is_logged_with_its_cause(world: World,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2: a 500 carries an incident id, and the error log line holds the same id, the
    exception and its traceback (the answer holds no internals)."""
    import io
    import sys

    from exchange.logging import configure_logging

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(world.runtime.registry, "balances", broken)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", json_format=True)
    try:
        response = world.as_("auditor", "GET", "/v1/ledger/balances")
    finally:
        configure_logging("INFO", json_format=True)
    body = problem(response, 500)
    assert "disk on fire" not in response.text and "Traceback" not in response.text
    incident = body["detail"].split("incident ")[1].rstrip(")")
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines() if "http.unhandled_exception" in x]
    assert line["incident"] == incident and line["level"] == "error" and line["path"] == "/v1/ledger/balances"
    assert "RuntimeError: disk on fire" in line["exception"] and "Traceback" in line["exception"]
