"""FHIR Consent import (R4 and R5) on realistic resources, and clear refusals of unmappable ones."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consent import duo
from consent.evaluate import evaluate
from consent.fhir import FhirImportError, detect_version, from_fhir
from consent.request import StudyRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "consent" / "examples"
DATA = Path(__file__).resolve().parent / "data"
AT = datetime(2027, 1, 1, tzinfo=UTC)


def load(name: str) -> dict[str, Any]:
    path = EXAMPLES / name if (EXAMPLES / name).exists() else DATA / name
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def study(**kw: Any) -> StudyRequest:
    data: dict[str, Any] = {
        "purpose": "HMB",
        "organisation": "uni-a",
        "region": "DE",
        "data_categories": ("labs",),
    }
    data.update(kw)
    return StudyRequest.model_validate(data)


def test_r4_permit_with_nested_deny_for_one_organisation() -> None:
    data = load("fhir-r4-hmb-deny-org.json")
    assert detect_version(data) == "R4"
    c = from_fhir(data)
    assert (c.contract_id, c.pseudonym, c.hospital, c.status) == (
        "consent-r4-0001",
        "psn-0001",
        "hospital-a",
        "active",
    )
    assert c.issued == datetime(2026, 1, 15, 8, 30, tzinfo=UTC)
    assert c.policy_basis == ("http://terminology.hl7.org/CodeSystem/v3-ActCode#OPTIN",)
    assert c.provision.type == "permit" and c.provision.purposes == (duo.HMB,)  # DUO HMB and v3 HRESCH agree
    assert [(p.type, p.organisations) for p in c.provision.provisions] == [("deny", ("pharma-x",))]
    assert evaluate(c, study(), AT).permit
    assert evaluate(c, study(purpose="DS", disease="C50"), AT).permit
    denied = evaluate(c, study(organisation="pharma-x"), AT)
    assert not denied.permit and denied.exclusion == "denied"
    assert not evaluate(c, study(purpose="POA"), AT).permit
    # the provision period limits use: after 2030 nothing applies
    late = evaluate(c, study(), datetime(2031, 6, 1, tzinfo=UTC))
    assert not late.permit and late.exclusion == "no-permit"


def test_r5_deny_base_with_ds_exception_and_nested_genomics_deny() -> None:
    data = load("fhir-r5-ds-breast-cancer.json")
    assert detect_version(data) == "R5"
    c = from_fhir(data)
    assert c.provision.type == "deny"
    [permit] = c.provision.provisions
    assert permit.type == "permit" and permit.purposes == (duo.DS,) and permit.diseases == ("C50",)
    assert permit.modifiers == (duo.IRB, duo.NCU)
    assert [(p.type, p.data_categories) for p in permit.provisions] == [("deny", ("genomics",))]
    assert c.period is not None and c.period.end == datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC)
    ok = study(purpose="DS", disease="C50.4", ethics_approval=True)
    assert evaluate(c, ok, AT).permit
    assert not evaluate(c, ok.model_copy(update={"ethics_approval": False}), AT).permit
    assert not evaluate(c, ok.model_copy(update={"commercial": True}), AT).permit
    assert not evaluate(c, ok.model_copy(update={"data_categories": ("genomics",)}), AT).permit
    assert not evaluate(c, study(purpose="HMB", ethics_approval=True), AT).permit
    assert evaluate(c, ok, datetime(2031, 2, 1, tzinfo=UTC)).exclusion == "outside-validity"


def test_inactive_consent_imports_but_permits_nothing() -> None:
    c = from_fhir(load("fhir-r4-inactive.json"))
    assert c.status == "inactive" and c.permits_nothing()
    assert evaluate(c, study(purpose="GRU"), AT).exclusion == "inactive"


@pytest.mark.parametrize("status", ["draft", "proposed", "rejected", "entered-in-error"])
def test_any_non_active_status_permits_nothing(status: str) -> None:
    data = load("fhir-r4-hmb-deny-org.json")
    data["status"] = status
    assert not evaluate(from_fhir(data), study(), AT).permit


def test_refusal_lists_every_reason_with_its_path() -> None:
    with pytest.raises(FhirImportError) as info:
        from_fhir(load("fhir-r4-unmappable.json"))
    reasons = info.value.reasons
    assert any(r.startswith("Consent.provision.dataPeriod: not mapped") for r in reasons)
    assert any(r.startswith("Consent.provision.securityLabel: not mapped") for r in reasons)
    assert any(r.startswith("Consent.provision.purpose[0]: unknown purpose system") for r in reasons)
    assert len(reasons) == 3


def _r4_with(**provision: Any) -> dict[str, Any]:
    data = load("fhir-r4-hmb-deny-org.json")
    data["provision"].update(provision)
    return data


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            lambda d: d["provision"]["provision"][0].update(
                actor=[
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "PRCP",
                                }
                            ]
                        },
                        "reference": {"reference": "Practitioner/dr-1"},
                    }
                ]
            ),
            "provision[0].actor[0].reference: only a reference",
        ),
        (
            lambda d: d["provision"]["provision"][0].update(
                actor=[
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "AUT",
                                }
                            ]
                        },
                        "reference": {"reference": "Organization/x"},
                    }
                ]
            ),
            "role http://terminology.hl7.org/CodeSystem/v3-ParticipationType#AUT",
        ),
        (
            lambda d: d["provision"].update(
                purpose=[{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]
            ),
            "v3 PurposeOfUse TREAT has no faithful DUO",
        ),
        (
            lambda d: d["provision"].update(
                purpose=[{"system": "http://purl.obolibrary.org/obo/duo", "code": "DUO:0000043"}]
            ),
            "CC (clinical care use)",
        ),
        (
            lambda d: d["provision"].update(
                purpose=[{"system": "http://purl.obolibrary.org/obo/duo", "code": "DUO:0000022"}]
            ),
            "GS (DUO:0000022 geographical restriction) needs regions",
        ),
        (
            lambda d: d["provision"].update(
                action=[
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                "code": "collect",
                            }
                        ]
                    }
                ]
            ),
            "do not govern use",
        ),
        (
            lambda d: d["provision"].update(
                **{"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}
            ),
            "Observation is ambiguous",
        ),
        (
            lambda d: d["provision"].update(
                code=[{"coding": [{"system": "http://snomed.info/sct", "code": "254837009"}]}]
            ),
            "neither an ICD-10 disease nor a data category",
        ),
        (
            lambda d: d["provision"].update(
                code=[{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "C50"}]}]
            ),
            "diseases: only meaningful with the DS purpose",
        ),
        (lambda d: d["provision"]["provision"][0].pop("type"), "a nested provision must say permit or deny"),
        (
            lambda d: d.update(
                scope={
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "treatment"}
                    ]
                }
            ),
            "Consent.scope",
        ),
        (
            lambda d: d.update(patient={"reference": "Group/g1"}),
            "Consent.patient: needs a reference Patient/",
        ),
        (lambda d: d.pop("dateTime"), "Consent.dateTime: needs the date"),
        (
            lambda d: d.update(modifierExtension=[{"url": "http://example.org/x", "valueBoolean": True}]),
            "Consent.modifierExtension: not mapped",
        ),
        (lambda d: d.pop("provision"), "Consent.provision: missing"),
    ],
)
def test_r4_refusals(mutate: Any, fragment: str) -> None:
    data = load("fhir-r4-hmb-deny-org.json")
    mutate(data)
    with pytest.raises(FhirImportError) as info:
        from_fhir(data)
    assert fragment in str(info.value), info.value.reasons


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("decision"), "Consent.decision: missing"),
        (lambda d: d.update(grantee=[{"reference": "Organization/x"}]), "Consent.grantee: not mapped"),
        (
            lambda d: d["provision"][0].update(dataPeriod={"start": "2020-01-01"}),
            "Consent.provision[0].dataPeriod",
        ),
        (
            lambda d: d["provision"][0].update(
                data=[{"meaning": "instance", "reference": {"reference": "Observation/1"}}]
            ),
            "Consent.provision[0].data: not mapped",
        ),
        (lambda d: d["provision"][0]["code"][0]["coding"][0].update(code="C99.99"), "not an ICD-10"),
        (lambda d: d.update(subject={"reference": "Patient/psn-0002"}, date="2026-02"), "Consent.date"),
        (lambda d: d.update(bogus=1), "Consent.bogus: Extra inputs are not permitted (FHIR R5)"),
    ],
)
def test_r5_refusals(mutate: Any, fragment: str) -> None:
    data = load("fhir-r5-ds-breast-cancer.json")
    mutate(data)
    with pytest.raises(FhirImportError) as info:
        from_fhir(data)
    assert fragment in str(info.value), info.value.reasons


def test_hospital_and_previous_version() -> None:
    data = load("fhir-r5-ds-breast-cancer.json")
    v1 = from_fhir(data)
    newer = copy.deepcopy(data)
    newer["status"] = "inactive"
    v2 = from_fhir(newer, previous=v1)
    assert (v2.version, v2.supersedes) == (2, v1.content_hash)
    data.pop("controller")
    with pytest.raises(FhirImportError, match=r"Consent\.controller"):
        from_fhir(data)
    assert from_fhir(data, hospital="hospital-b").hospital == "hospital-b"


def test_a_consent_naming_another_hospital_is_refused() -> None:
    """The hospital passed in never overrides the consent's own custodian (issue 21, item 9)."""
    data = load("fhir-r5-ds-breast-cancer.json")
    custodian = data["controller"][0]["reference"].split("/", 1)[1]
    assert from_fhir(data, hospital=custodian).hospital == custodian
    with pytest.raises(FhirImportError, match=rf"Consent\.controller: names Organization/{custodian}"):
        from_fhir(data, hospital="hospital-x")


def test_not_a_consent() -> None:
    with pytest.raises(FhirImportError, match="resourceType"):
        from_fhir({"resourceType": "Patient"})
    with pytest.raises(FhirImportError, match="not JSON"):
        from_fhir("{")
