"""Survival studies at decision time: bad time/event columns and too few events are refused by the
node's policy with the reason (rule 9), so they never become failed runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audit.signing import Signer
from exchange.node.decisions import evaluate_study
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.outcomes import OutcomeSummary, min_events
from exchange.node.policy import Budget, Eligibility, StudyView, evaluate
from exchange.node.settings import NodeSettings, SitePolicy
from exchange.node.store import NodeStore
from tests.node.helpers import gru_contract, seed_consent

HELD = {"age": "demographics", "kappa": "labs", "time": "diagnoses", "event": "diagnoses"}
FULL = Budget(spent=0.0, reserved=0.0, total=20.0)
MANY = Eligibility(eligible=100)


def survival_study(**spec: Any) -> StudyView:
    base: dict[str, Any] = {"purpose": "DUO:0000042", "columns": {"demographics": ["age"], "labs": ["kappa"]},
                            "label": "time", "event": "event", "task": "survival", "template": "cox_ph",
                            "epsilon": 3.0, "delta": 1e-5, "rounds": 2}
    base.update(spec)
    return StudyView.from_json({"id": "st-surv", "organisation_id": "acme", "organisation_region": "DE",
                                "status": "submitted", "spec": base})


def test_outcome_faults_are_reasons_naming_column_and_fault_without_counts() -> None:
    policy = SitePolicy(mode="auto-approve")
    bad = OutcomeSummary(time_column="time", event_column="event", records=50, time_negative=2,
                         time_not_numeric=1, event_not_binary=3, events=30)
    refused = evaluate(policy, survival_study(), MANY, FULL, HELD, outcome=bad)
    assert refused.decision == "refuse"
    assert refused.reasons == [
        "survival outcome: time column 'time' is not numeric in eligible records",
        "survival outcome: time column 'time' is negative in eligible records",
        "survival outcome: event column 'event' is not 0 or 1 in eligible records"]
    few = OutcomeSummary(time_column="time", event_column="event", records=50, events=7,
                         needed_events=min_events(2))
    assert evaluate(policy, survival_study(), MANY, FULL, HELD, outcome=few).reasons == [
        "survival outcome: fewer events among the eligible records than the Cox template needs "
        "(20 for 2 coefficient(s))"]
    public = OutcomeSummary(time_column="time", event_column="event", records=50, events=25, subcohort=False)
    assert evaluate(policy, survival_study(), MANY, FULL, HELD, outcome=public).reasons == [
        "survival outcome: no public subcohort holds the study's feature columns, so the Cox template "
        "cannot form risk sets without private patients (docs/survival.md)"]
    good = OutcomeSummary(time_column="time", event_column="event", records=50, events=25)
    assert evaluate(policy, survival_study(), MANY, FULL, HELD, outcome=good).decision == "approve"


def test_missing_event_column_is_a_held_column_reason() -> None:
    refused = evaluate(SitePolicy(mode="auto-approve"), survival_study(event="death"), MANY, FULL, HELD)
    assert refused.reasons == ["column(s) not held at this hospital: death"]


def test_min_events_follows_ten_per_coefficient_with_a_floor() -> None:
    assert min_events(1) == 20 and min_events(6) == 60


def _seed(store: NodeStore, tmp_path: Path, rows: list[str], time_type: str = "number") -> list[str]:
    path = tmp_path / f"surv-{len(rows)}-{time_type}.csv"
    path.write_text("\n".join(["pid,age,kappa,time,event", *rows]) + "\n")
    mapping = parse_mapping({"pseudonym_column": "pid",
                             "columns": {"age": "demographics", "kappa": "labs",
                                         "time": {"category": "diagnoses", "type": time_type},
                                         "event": {"category": "diagnoses", "type": "number"}}})
    with store.transaction() as session:
        import_records(session, path, "csv", mapping)
    return [row.split(",")[0] for row in rows]


def _consent(store: NodeStore, tmp_path: Path, pseudonyms: list[str], hospital: str) -> None:
    seed_consent(store, tmp_path / "consent", [gru_contract(p, hospital) for p in pseudonyms], hospital,
                 Signer.generate())


@pytest.mark.parametrize(("rows", "time_type", "reason"), [
    ([f"p{i},{60 + i % 9},{1 + i % 3},{-3 if i == 4 else 100 + i},{i % 2}" for i in range(60)], "number",
     "time column 'time' is negative in eligible records"),
    ([f"p{i},{60 + i % 9},{1 + i % 3},{'soon' if i < 2 else 100 + i},{i % 2}" for i in range(60)], "string",
     "time column 'time' is not numeric in eligible records"),  # imported as text
    ([f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{2 if i == 7 else i % 2}" for i in range(60)], "number",
     "event column 'event' is not 0 or 1 in eligible records"),
    ([f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{int(i < 5)}" for i in range(60)], "number",
     "fewer events among the eligible records than the Cox template needs (20 for"),
])
def test_node_refuses_bad_survival_outcomes_at_decision_time(store: NodeStore, settings: NodeSettings,
                                                             tmp_path: Path, rows: list[str], time_type: str,
                                                             reason: str) -> None:
    pseudonyms = _seed(store, tmp_path, rows, time_type)
    _consent(store, tmp_path, pseudonyms, settings.hospital_id)
    evaluation = evaluate_study(store, settings, survival_study())
    assert evaluation.decision == "refuse"
    assert any(reason in r for r in evaluation.reasons), evaluation.reasons


def test_node_accepts_good_survival_outcomes(store: NodeStore, settings: NodeSettings,
                                            tmp_path: Path) -> None:
    rows = [f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{i % 2}" for i in range(60)]
    _consent(store, tmp_path, _seed(store, tmp_path, rows), settings.hospital_id)
    evaluation = evaluate_study(store, settings, survival_study())
    assert not any("survival outcome" in r for r in evaluation.reasons), evaluation.reasons
    assert evaluation.decision != "refuse", evaluation.reasons
