"""Feasibility at submission (issue 21, item 2): hospitals publish signed catalogs, and a study
no set of `min_hospitals` hospitals can serve is refused at once with every reason, by hospital;
also methods-development studies through the API (item 5)."""

from __future__ import annotations

import json
from typing import Any

from audit.entry import Entry, sign_entry
from audit.keyring import Keyring
from audit.signing import Signer
from audit.trust import Trust
from exchange.study.feasibility import CATALOG_KIND
from tests.exchange.conftest import World, study_body

COLUMNS = [{"name": "mean_radius", "category": "labs", "type": "number"},
           {"name": "mean_texture", "category": "labs", "type": "number"},
           {"name": "label", "category": "outcomes", "type": "integer"},
           {"name": "note", "category": "diagnoses", "type": "string"}]


def catalog(hospital: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hospital": f"hospital:{hospital}", "columns": COLUMNS, "purposes": ["*"],
                            "organisations": ["*"], "regions": ["*"], "allow_commercial": False,
                            "max_epsilon_per_study": 5.0, "max_delta": 1e-5, "accepts_studies": True}
    body.update(overrides)
    return body


def publish(world: World, hospital: str, payload: dict[str, Any], signer: Signer | None = None) -> Any:
    entry = sign_entry(signer or world.hospitals[hospital], CATALOG_KIND, payload)
    return world.signed(hospital, "POST", "/v1/hospital/catalog", json=entry.to_json())


def test_catalogs_are_logged_and_a_study_none_can_serve_is_refused_at_once(world: World) -> None:
    before = world.runtime.audit_log.size()
    assert publish(world, "h-one", catalog("h-one", max_epsilon_per_study=2.0)).status_code == 201
    assert publish(world, "h-two", catalog("h-two", purposes=["HMB"])).status_code == 201
    assert publish(world, "h-three", catalog("h-three", columns=COLUMNS[:2])).status_code == 201
    kinds = [e.kind for e in list(world.runtime.audit_log.entries())[before:]]
    assert kinds == [CATALOG_KIND] * 3  # each signed by its hospital, in the public log
    listed = world.as_("alice", "GET", "/v1/catalogs").json()["hospitals"]
    assert {h["hospital_id"]: h["catalog"]["max_epsilon_per_study"] for h in listed} == {
        "h-one": 2.0, "h-two": 5.0, "h-three": 5.0}
    balance = world.as_("auditor", "GET", "/v1/ledger/balances").json()["balances"]["org:acme"]
    # epsilon 3 (h-one caps 2), purpose DS is within HMB (h-two could), h-three lacks the label:
    # with min_hospitals 2 only h-two might serve -> refused, every reason by hospital
    response = world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=2))
    assert response.status_code == 422, response.text
    errors = {(e["field"], e["reason"]) for e in response.json()["errors"]}
    assert ("hospitals.h-one", "epsilon 3 exceeds the site maximum per study (2)") in errors
    assert ("hospitals.h-three", "label 'label' is not a column held here") in errors
    assert not any(field == "hospitals.h-two" for field, _ in errors)
    assert any(field == "min_hospitals" and "1 of the 3 registered" in reason for field, reason in errors)
    # nothing escrowed, nothing logged
    assert world.as_("auditor", "GET", "/v1/ledger/balances").json()["balances"]["org:acme"] == balance
    # a label no hospital holds: refused at once, each hospital naming it, nothing escrowed
    label = world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=1, epsilon=1.0,
                                                                      label="hba1c"))
    assert label.status_code == 422
    naming = {e["field"] for e in label.json()["errors"]
              if "'hba1c' is not a column held here" in e["reason"]}
    assert naming == {"hospitals.h-one", "hospitals.h-two", "hospitals.h-three"}
    assert world.as_("auditor", "GET", "/v1/ledger/balances").json()["balances"]["org:acme"] == balance
    # one hospital suffices, or a study within every catalog: accepted
    assert world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=1)).status_code == 201
    assert world.as_("alice", "POST", "/v1/studies", json=study_body(
        min_hospitals=2, epsilon=1.0, purpose="HMB", disease=None)).status_code == 201
    # a text column cannot be read by a model; more hospitals than exist can never be served
    text = world.as_("alice", "POST", "/v1/studies", json=study_body(
        min_hospitals=1, columns={"diagnoses": ["note"]}, epsilon=1.0))
    assert text.status_code == 422 and any("not numeric: note" in e["reason"] for e in text.json()["errors"])
    # the catalogs verify offline with the rest of the log (signed by registered hospital keys)
    trust = Trust.from_json(world.as_("auditor", "GET", "/v1/audit/trust").json())
    keyring = Keyring(trust.operator_public_key)
    entries = [Entry.from_json(json.loads(line))
               for line in world.as_("auditor", "GET", "/v1/audit/export").content.splitlines()]
    for index, entry in enumerate(entries):
        keyring.check(entry, index)
        keyring.apply(entry, index)
    assert sum(e.kind == CATALOG_KIND for e in entries) == 3
    many = world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=4, epsilon=1.0))
    assert many.status_code == 422
    assert any("of the 3 registered" in e["reason"] for e in many.json()["errors"])


def test_hospitals_without_a_catalog_might_serve(world: World) -> None:
    assert publish(world, "h-one", catalog("h-one", accepts_studies=False)).status_code == 201
    # h-two and h-three have published nothing: they might serve a study asking two
    assert world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=2)).status_code == 201
    refused = world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=3))
    assert refused.status_code == 422
    assert {"field": "hospitals.h-one", "reason": "site policy refuses studies automatically"} in \
        refused.json()["errors"]


def test_bad_catalogs_are_refused_naming_the_field(world: World) -> None:
    bad = publish(world, "h-one", catalog("h-one", max_delta=2, columns=[{"name": "x"}]))
    assert bad.status_code == 422
    fields = {e["field"] for e in bad.json()["errors"]}
    assert "payload.max_delta" in fields and any(f.startswith("payload.columns.0") for f in fields)
    other = publish(world, "h-one", catalog("h-two"))
    assert other.status_code == 422 and other.json()["errors"] == [
        {"field": "payload.hospital", "reason": "must be 'hospital:h-one'"}]
    forged = publish(world, "h-one", catalog("h-one"), signer=Signer.generate())
    assert forged.status_code in (401, 422)
    counts = publish(world, "h-one", {**catalog("h-one"), "records": 120})  # no count may leave
    assert counts.status_code == 422
    assert world.as_("alice", "GET", "/v1/catalogs").json()["hospitals"][0]["catalog"] is None


def test_methods_development_studies_through_the_api(world: World) -> None:
    alone = world.as_("alice", "POST", "/v1/studies", json=study_body(purpose="MDS", disease=None))
    assert alone.status_code == 201, alone.text
    assert alone.json()["spec"]["purpose"] == "MDS"
    on_disease = world.submit(methods_development=True)
    assert on_disease["spec"]["methods_development"] is True
    wrong = world.as_("alice", "POST", "/v1/studies", json=study_body(methods_development="yes"))
    assert wrong.status_code in (400, 422) and "methods_development" in wrong.text
    with_disease = world.as_("alice", "POST", "/v1/studies", json=study_body(purpose="MDS"))
    assert with_disease.status_code in (400, 422) and "disease" in with_disease.text
