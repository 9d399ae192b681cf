"""Survival studies at decision time: a study whose columns are missing or that has too few
events (a noised count) is refused by the node's policy with the reason (rule 9), so it never
becomes a failed run; a record with a bad time or event is left out, never refused on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audit.signing import Signer
from exchange.node import decisions
from exchange.node.decisions import evaluate_study
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.outcomes import OutcomeSummary, min_events
from exchange.node.policy import Budget, Eligibility, StudyView, evaluate
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings, SitePolicy
from exchange.node.store import NodeStore
from tests.node.helpers import ExactNoise, gru_contract, seed_consent

HELD = {"age": "demographics", "kappa": "labs", "time": "diagnoses", "event": "diagnoses"}
FULL = Budget(spent=0.0, reserved=0.0, total=20.0)
MANY = Eligibility(eligible=100)


def survival_study(id_: str = "st-surv", **spec: Any) -> StudyView:
    base: dict[str, Any] = {"purpose": "DUO:0000042", "columns": {"demographics": ["age"], "labs": ["kappa"]},
                            "label": "time", "event": "event", "task": "survival", "template": "cox_ph",
                            "epsilon": 3.0, "delta": 1e-5, "rounds": 2}
    base.update(spec)
    return StudyView.from_json({"id": id_, "organisation_id": "acme", "organisation_region": "DE",
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


class _Draws:
    """A decision-count noise source returning the given draws in order (and noting each epsilon)."""

    def __init__(self, *draws: int) -> None:
        self.draws, self.epsilons = list(draws), []  # type: list[int], list[float]

    def discrete_laplace(self, epsilon: float) -> int:
        self.epsilons.append(epsilon)
        return self.draws.pop(0)


@pytest.mark.parametrize(("rows", "time_type"), [
    ([f"p{i},{60 + i % 9},{1 + i % 3},{-3 if i == 4 else 100 + i},{i % 2}" for i in range(60)], "number"),
    ([f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{2 if i == 4 else i % 2}" for i in range(60)], "number"),
])
def test_one_bad_outcome_record_is_left_out_not_refused_on(
        store: NodeStore, settings: NodeSettings, tmp_path: Path, rows: list[str], time_type: str) -> None:
    """Before: one record with a negative time or an event of 2 made the node refuse
    with a public reason that one patient's value flipped. Now that record is not usable (as if
    missing): the decision is the same as without it, and it is not counted."""
    pseudonyms = _seed(store, tmp_path, rows, time_type)
    _consent(store, tmp_path, pseudonyms, settings.hospital_id)
    noise = _Draws(0, 0)
    evaluation = evaluate_study(store, settings, survival_study(), noise=noise)
    assert evaluation.decision != "refuse", evaluation.reasons
    assert not any("column" in r for r in evaluation.reasons), evaluation.reasons
    ledger = site_ledger(store.engine, settings.policy)
    assert "p4" not in ledger.decision_patients("st-surv")
    assert ledger.decision("st-surv").noisy_count == 59  # type: ignore[union-attr]


def test_the_events_rule_reads_a_noised_event_count(store: NodeStore, settings: NodeSettings,
                                                   tmp_path: Path) -> None:
    """The minimum-events rule reads the study's NOISED event count, drawn with its decision count
    at half the decision epsilon each (the pair's L1 sensitivity is 2: one charge), never the
    exact events: 5 events plus a draw of +15 pass a minimum of 20, plus 0 do not."""
    rows = [f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{int(i < 5)}" for i in range(60)]
    _consent(store, tmp_path, _seed(store, tmp_path, rows), settings.hospital_id)
    lucky = _Draws(0, 15)
    passed = evaluate_study(store, settings, survival_study(), noise=lucky)
    assert passed.decision != "refuse", passed.reasons
    eps = settings.policy.decision_epsilon
    assert lucky.epsilons == [pytest.approx(eps / 2), pytest.approx(eps / 2)]
    decision = site_ledger(store.engine, settings.policy).decision("st-surv")
    assert decision is not None and decision.noisy_events == 20 and decision.epsilon == pytest.approx(eps)
    unlucky = evaluate_study(store, settings, survival_study(id_="st-surv-2"), noise=_Draws(0, 0))
    assert unlucky.decision == "refuse"
    assert any("fewer eligible patients with an event (a noised count) than the Cox template needs (20 for"
               in r for r in unlucky.reasons), unlucky.reasons


def test_node_accepts_good_survival_outcomes(store: NodeStore, settings: NodeSettings,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 30 events against the 20 needed: exact counts here (the noised rule has its own test above)
    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)
    rows = [f"p{i},{60 + i % 9},{1 + i % 3},{100 + i},{i % 2}" for i in range(60)]
    _consent(store, tmp_path, _seed(store, tmp_path, rows), settings.hospital_id)
    evaluation = evaluate_study(store, settings, survival_study())
    assert not any("survival outcome" in r for r in evaluation.reasons), evaluation.reasons
    assert evaluation.decision != "refuse", evaluation.reasons
