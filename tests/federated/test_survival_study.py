"""A survival study (cox_ph on flchain) through the real ClientApp and ServerApp logic, in process:
consent-gated sites on disk, the privacy ledger, receipts, each hospital's charged and noised
concordance and integrated Brier score (and pooled), and the exact public-reference ones per round;
the same for a multi-class study's accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from federated.client_app import evaluate_hospital, train_hospital_round
from federated.dp import initial_state
from federated.privacy_ledger import PrivacyLedger
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
from federated.runtime.inprocess import InProcessGrid
from federated.runtime.site import read_records, write_records
from federated.server_app import ServerOptions, run_study_rounds
from federated.study_spec import StudySpec, StudySpecError

NOW = datetime(2026, 6, 1, tzinfo=UTC)
CATEGORIES = ("demographics", "labs", "diagnoses")


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites", dataset="flchain", categories=CATEGORIES)


def _spec(study_id: str, **overrides: Any) -> StudySpec:
    return demo_spec(study_id, dataset="flchain", epsilon=3.0, rounds=2, accountant="rdp", **overrides)


class Observer:
    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, float], list[Any]]] = []
        self.completed: Any = None
        self.failed: list[str] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append((round, dict(metrics), list(receipts)))

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


@pytest.fixture
def run_study(sites: dict[str, DemoSite], tmp_path: Path) -> Callable[[StudySpec], Observer]:
    """Approve `spec` at every site and run it through the ServerApp loop over an in-process grid
    of the real ClientApp: the one set-up every study test here shares."""

    def run(spec: StudySpec) -> Observer:
        for demo in sites.values():
            approve(demo.site, spec.study_id)
        grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                             spec.to_run_config())
        observer = Observer()
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config=spec.to_run_config())
        run_study_rounds(grid, context, observer, ServerOptions(
            output_dir=tmp_path / "out" / spec.study_id, poll=0.01,
            hospital_keys={h: d.signer.public_key for h, d in sites.items()}))
        assert observer.failed == [] and observer.completed is not None
        return observer

    return run


def _ledger(demo: DemoSite) -> PrivacyLedger:
    return demo.site.ledger()


def test_survival_study_runs_end_to_end_in_process(sites: dict[str, DemoSite],
                                                   run_study: Callable[[StudySpec], Observer]) -> None:
    spec = _spec("s-cox")
    assert spec.template == "cox_ph" and spec.event == "event" and spec.label == "time"
    observer = run_study(spec)
    assert [r for r, _m, _rc in observer.rounds] == [1, 2]
    for round_, metrics, receipts in observer.rounds:
        assert len(receipts) == 3
        assert metrics["ref_concordance"] > 0.75 and 0.0 < metrics["ref_ibs"] < 0.2
        # each hospital's Harrell's concordance and integrated Brier score, noised and charged,
        # and the pooled ones from the hospitals' statistics added up
        for h in sites:
            assert 0.5 < metrics[f"eval_concordance@{h}"] <= 1.0
            assert 0.0 <= metrics[f"eval_ibs@{h}"] < 0.3
        assert 0.65 < metrics["eval_concordance"] < 0.95 and 0.0 < metrics["eval_ibs"] < 0.25
        assert 0.6 < metrics["eval_anchored_concordance"] < 0.95
        assert metrics["eval_epsilon"] <= 3.0 + 1e-9
        # what the server reports is what each ledger charged and stored for that round's model
        for demo in sites.values():
            stored = _ledger(demo).evaluation(spec.study_id, round_)
            assert stored is not None and len(stored.stats) == 31
            assert stored.epsilon == pytest.approx(_ledger(demo).plan(spec.study_id).evaluation_epsilon_after(
                round_))


def test_a_metric_release_is_charged_once_and_replayed(sites: dict[str, DemoSite],
                                                       run_study: Callable[[StudySpec], Observer]) -> None:
    """The concordance/Brier statistics leave only with a charge: the ledger holds one evaluation
    per round, each patient evaluated is advanced, and asking again (with other weights) returns
    the stored noised statistics, nothing more charged."""
    spec = _spec("s-charge")
    run_study(spec)
    demo = sites["hospital-a"]
    ledger = _ledger(demo)
    spent = ledger.evaluation_spent(spec.study_id)
    assert spent > 0 and len(ledger.evaluations(spec.study_id)) == 2
    first = ledger.evaluation(spec.study_id, 1)
    assert first is not None
    crafted = np.full_like(initial_state("cox_ph", len(spec.columns)), 7.0)
    again = evaluate_hospital(demo.site, spec, crafted, 1, NOW)
    assert again.status == "ok" and again.eval_stats == first.stats
    assert ledger.evaluation_spent(spec.study_id) == spent and len(ledger.evaluations(spec.study_id)) == 2
    # the released histogram is noised: not a vector of whole patient counts
    assert not all(float(v).is_integer() for v in first.stats[:-1])


def test_spec_requires_an_event_column_only_for_survival() -> None:
    spec = _spec("s-ev")
    with pytest.raises(StudySpecError, match="event: required for a survival study"):
        StudySpec.from_json({**spec.to_json(), "event": None})
    with pytest.raises(StudySpecError, match="event: must differ"):
        StudySpec.from_json({**spec.to_json(), "event": "time"})
    binary = demo_spec("s-bin")
    assert "event" not in binary.to_json() and "classes" not in binary.to_json()
    with pytest.raises(StudySpecError, match="classes: required for a multi-class study"):
        StudySpec.from_json({**binary.to_json(), "task": "multiclass", "template": "softmax_regression"})


def test_a_record_with_a_negative_time_is_left_out_not_refused_on(sites: dict[str, DemoSite]) -> None:
    """Before, one negative time made the hospital refuse the round with "time: 1 negative
    value(s)": one patient's value (and a count) in a reason the server sees. Now that record is
    not usable, like one missing a column: the round trains without it (docs/privacy.md, "Counts")."""
    demo = sites["hospital-a"]
    data, label = read_records(demo.site.records_path)
    y = np.asarray(data.y).copy()
    bad = int(np.flatnonzero(~data.is_test)[3])
    y[bad] = -5.0
    write_records(demo.site.records_path, replace(data, y=y), label)
    spec = _spec("s-neg")
    approve(demo.site, spec.study_id)
    out = train_hospital_round(demo.site, spec, 1, initial_state("cox_ph", len(spec.columns)), NOW)
    assert out.status == "ok" and out.reason == "", out.reason
    ledger = demo.site.ledger()
    patient = data.pseudonyms[bad]
    assert patient not in ledger.decision_patients(spec.study_id)
    assert patient not in ledger.patient_spend()


def test_hospital_without_the_event_column_refuses(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-b"]
    spec = _spec("s-noev", event="death")
    approve(demo.site, spec.study_id)
    out = train_hospital_round(demo.site, spec, 1, initial_state("cox_ph", len(spec.columns)), NOW)
    assert out.status == "refused" and "event: this hospital has no column 'death'" in out.reason


def test_multiclass_study_runs_in_process(sites: dict[str, DemoSite],
                                          run_study: Callable[[StudySpec], Observer]) -> None:
    """softmax_regression over the same consent-gated sites, the label rewritten to flchain's age
    band (0, 1, 2): trains, aggregates and releases the noised hold-out accuracy."""
    for demo in sites.values():
        data, _label = read_records(demo.site.records_path)
        age = data.select_columns(["age"]).x[:, 0]
        band = np.digitize(age, np.quantile(age, [1 / 3, 2 / 3])).astype(np.float32)
        write_records(demo.site.records_path, replace(data, y=band), "age_band")
    columns = ("sex", "kappa", "lambda", "creatinine", "mgus")
    base = _spec("s-multi")
    spec = StudySpec.from_json({**{k: v for k, v in base.to_json().items() if k != "event"},
                                "template": "softmax_regression", "task": "multiclass", "classes": 3,
                                "label": "age_band", "columns": list(columns),
                                "request": {**base.request.model_dump(mode="json"),
                                            "data_categories": ["diagnoses", "labs", "demographics"]}})
    observer = run_study(spec)
    _round, metrics, receipts = observer.rounds[-1]
    assert len(receipts) == 3 and 0.3 < metrics["eval_accuracy"] <= 1.0
    # each hospital's accuracy and macro-F1 from its noised confusion matrix, and the pooled macro-F1
    for h in sites:
        assert 0.2 < metrics[f"eval_accuracy@{h}"] <= 1.0 and 0.0 < metrics[f"eval_macro_f1@{h}"] <= 1.0
    assert 0.2 < metrics["eval_macro_f1"] <= 1.0
    stored = _ledger(sites["hospital-a"]).evaluation(spec.study_id, 1)
    assert stored is not None and len(stored.stats) == 9
