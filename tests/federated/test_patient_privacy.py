"""Issue 14's attacks on patient privacy, each of which must fail here:

- a patient with several records (record-level DP gave such a patient a multiple of the reported
  epsilon): sampling is per patient, a step's sensitivity to a patient is the clip, and the
  epsilon reported is the accountant's for that patient (checked against dp-accounting);
- a patient in study after study (a per-study cap is no lifetime cap): each patient's spend is
  kept across studies, restarts included, and a patient whose next study would pass their
  contract's cap is left out before training;
- an unbounded delta: refused above the site maximum and above 1/n, budgeted;
- the evaluation oracle (crafted weights, many evaluate messages): at most one charged, noised
  release per round, none for a refused, unknown or finished study.
Real sites on disk (records, signed contracts, SQLite ledger, Ed25519 key), real DP training.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from sqlalchemy import create_engine

from federated.accounting import epsilon_spent, plan_patients
from federated.client_app import draw_decision, evaluate_hospital, train_hospital_round
from federated.dp import PatientIndex, initial_state
from federated.privacy_ledger import BudgetExceededError, PrivacyLedger
from federated.runtime import site as site_module
from federated.runtime.demo_sites import (
    DemoSite,
    approve,
    cap_patients,
    demo_spec,
    merge_patients,
    provision_sites,
)
from federated.runtime.inprocess import InProcessGrid
from federated.secure_random import SecureRandom
from federated.server_app import EVAL_PREFIX, GLOBAL_KEY, REPLY_KEY, WEIGHTS_KEY
from federated.study_spec import StudySpec
from federated.templates import get_template
from tests.dp_reference import independent_epsilon
from tests.federated.torch_reference import clipped_grad_sum

PRIVACY: dict[str, Any] = {"epsilon": 3.0, "rounds": 3, "accountant": "rdp"}
NOW = datetime(2026, 6, 1, tzinfo=UTC)
DELTA = 1e-5




@pytest.fixture
def sites(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites", hospitals=("hospital-a", "hospital-b"))


def _spec(study_id: str, **overrides: Any) -> StudySpec:
    return demo_spec(study_id, **{**PRIVACY, **overrides})


def _ledger(demo: DemoSite) -> PrivacyLedger:
    return PrivacyLedger(create_engine(demo.site.ledger_url))


def _weights(spec: StudySpec) -> np.ndarray:
    return initial_state(spec.template, len(spec.columns))


class _Exact:
    """A decision-count noise source that adds nothing (the mechanism is tested in
    tests/node/test_decision_count.py): these tests check what the count counts."""

    def discrete_laplace(self, epsilon: float) -> int:
        return 0


def _decide_exactly(demo: DemoSite, spec: StudySpec) -> None:
    """Draw the study's decision count without noise, as the node daemon would have."""
    drawn = draw_decision(demo.site, spec, NOW, noise=_Exact())
    assert not hasattr(drawn, "status"), drawn


def _trained(demo: DemoSite, study_id: str) -> set[str]:
    """The patients admitted to train in `study_id` (hospital-local)."""
    with _ledger(demo).engine.connect() as conn:
        return {p for (p,) in conn.exec_driver_sql(
            "SELECT pseudonym FROM privacy_patient_spend WHERE study_id = ? AND role = 'train'",
            (study_id,)).all()}


# -- a patient with several records -----------------------------------------------------------------


def test_a_patient_joins_a_step_at_the_sample_rate_with_one_record() -> None:
    """Patient p0 has three records: per step it is in the batch with probability q (not 3q, as
    record-level sampling would give), with exactly one of its records, each equally likely."""
    patients = ["p0"] * 3 + [f"q{i}" for i in range(20)]
    index = PatientIndex.build(len(patients), patients)
    assert index.n_patients == 21 and not index.singletons
    rng = SecureRandom(5)
    steps, q = 4000, 0.3
    present = 0
    picks: Counter[int] = Counter()
    for _ in range(steps):
        batch = index.sample(q, rng).tolist()
        mine = [i for i in batch if i < 3]
        assert len(mine) <= 1
        others = [i for i in batch if i >= 3]
        assert len(others) == len(set(others))
        present += len(mine)
        picks.update(mine)
    assert present / steps == pytest.approx(q, abs=5 * np.sqrt(q * (1 - q) / steps))
    for record in range(3):
        assert picks[record] / present == pytest.approx(1 / 3, abs=0.05)
    # full batch: every patient, still one record each
    full = index.sample(1.0, rng)
    assert len(full) == 21 and sum(1 for i in full if i < 3) == 1


def test_a_steps_sensitivity_to_a_patient_is_the_clip() -> None:
    """Removing patient P changes a step's clipped sum by at most `clip`, however many records P
    has (record-level DP: up to records x clip)."""
    tpl = get_template("logistic_regression")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=gen) * 4
    y = (torch.rand(23, generator=gen) < 0.5).float()
    model = tpl.build(5, 0)
    with torch.no_grad():
        model[0].weight.normal_(generator=gen)
        # P's three records are one misclassified record three times: each has a large gradient
        x[1], x[2] = x[0], x[0]
        y[:3] = float(model(x[:1]).item() < 0)
    patients = ["P"] * 3 + [f"q{i}" for i in range(20)]
    index = PatientIndex.build(23, patients)
    clip = 0.7
    rng = SecureRandom(9)
    worst = 0.0
    for _ in range(200):
        batch = index.sample(0.5, rng)
        without = np.array([i for i in batch if i >= 3], dtype=np.int64)
        a, _ = clipped_grad_sum(model, tpl, x[batch], y[batch], clip)
        b, _ = clipped_grad_sum(model, tpl, x[without], y[without], clip) if len(without) else (
            [torch.zeros_like(t) for t in a], None)
        diff = torch.sqrt(sum(((u - v) ** 2).sum() for u, v in zip(a, b, strict=True)))
        worst = max(worst, float(diff))
    assert worst <= clip * (1 + 1e-5)
    assert worst > 0.5 * clip  # P was sampled and clipped to the bound
    # what record-level sampling would have let P add: all three records at once
    everything = torch.arange(23)
    rest = torch.arange(3, 23)
    a, _ = clipped_grad_sum(model, tpl, x[everything], y[everything], clip)
    b, _ = clipped_grad_sum(model, tpl, x[rest], y[rest], clip)
    assert float(torch.sqrt(sum(((u - v) ** 2).sum() for u, v in zip(a, b, strict=True)))) \
        == pytest.approx(3 * clip, rel=1e-4)


def test_the_epsilon_reported_is_each_patients_even_with_several_records(sites: dict[str, DemoSite]) -> None:
    """A patient owns 3 and another 5 training records: the plan counts patients, the sample
    rate is batch / patients, and the epsilon in the receipt is what an independent accountant
    (dp-accounting's PLD) gives ONE patient for the steps taken, within 1 %."""
    demo = sites["hospital-a"]
    data, _ = demo.site.records()
    train = list(data.train().pseudonyms)
    merge_patients(demo, train[0], train[1:3])
    merge_patients(demo, train[3], train[4:8])
    spec = _spec("s-multi", accountant="prv", batch_size=64)
    approve(demo.site, spec.study_id)
    _decide_exactly(demo, spec)
    out = train_hospital_round(demo.site, spec, 1, _weights(spec), NOW)
    assert out.status == "ok", out.reason
    plan, decision = _ledger(demo).plan(spec.study_id), _ledger(demo).decision(spec.study_id)
    assert plan is not None and decision is not None
    # the decision counts patients (training and hold-out), not records: 6 records fewer patients
    assert decision.noisy_count == decision.patients == len(set(demo.site.records()[0].pseudonyms))
    assert plan.n_patients == plan_patients(decision.noisy_count, holdout_fraction=demo.site.holdout_fraction)
    assert plan.sample_rate == pytest.approx(64 / plan.n_patients)
    assert out.receipt is not None
    # what leaves is the public weight, not the patient or record count (docs/privacy.md, "Counts")
    assert "num_patients" not in out.metrics
    assert out.metrics["num_examples"] == out.receipt.records_used
    # the receipt's total is the decision count's epsilon plus the patient-level DP-SGD epsilon
    reported = out.receipt.epsilon_total
    training = epsilon_spent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, DELTA)
    assert reported == pytest.approx(decision.epsilon + training)
    assert out.receipt.accounting is not None and out.receipt.accounting["training_epsilon"] == training
    assert training == pytest.approx(independent_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], DELTA), rel=0.01)
    # the patient with 5 records was charged exactly the patient-level steps, like everyone else
    spend = _ledger(demo).patient_spend()
    assert spend[train[3]].epsilon == spend[train[10]].epsilon == pytest.approx(spec.epsilon)  # open: target


# -- lifetime caps ------------------------------------------------------------------------------------


def test_a_contracts_cap_is_a_lifetime_cap_across_studies(sites: dict[str, DemoSite]) -> None:
    """Patients capped at 3 take part in one epsilon-3 study, not a second; patients capped at 8
    take part in two, not a third; uncapped patients (hospital budget 100) in all three."""
    demo = sites["hospital-b"]
    train = list(demo.site.records()[0].train().pseudonyms)
    capped3, capped8 = train[:10], train[10:20]
    cap_patients(demo, capped3, 3.0, NOW - timedelta(days=1))
    cap_patients(demo, capped8, 8.0, NOW - timedelta(days=1))
    used: dict[str, int] = {}
    for study in ("life-1", "life-2", "life-3"):
        spec = _spec(study)
        approve(demo.site, study)
        out = train_hospital_round(demo.site, spec, 1, _weights(spec), NOW)
        assert out.status == "ok", out.reason
        assert out.receipt is not None
        used[study] = len(_trained(demo, study))  # the hospital's own count (receipts carry none)
    assert used == {"life-1": len(train), "life-2": len(train) - 10, "life-3": len(train) - 20}
    spend = _ledger(demo).patient_spend()
    assert {spend[p].studies for p in capped3} == {1}
    assert {spend[p].studies for p in capped8} == {2}
    assert {spend[p].studies for p in train[20:]} == {3}
    assert max(spend[p].epsilon for p in capped3) <= 3.0 + 1e-9
    assert max(spend[p].epsilon for p in capped8) <= 8.0 + 1e-9


def test_a_patient_over_the_cap_is_excluded_before_training_and_nothing_is_spent(
        sites: dict[str, DemoSite]) -> None:
    """Every patient capped below the study's epsilon: nobody is counted, admitted or charged,
    and the round still answers ``ok`` with a noise-only update (a "no data" status would show
    that the last patient left: docs/privacy.md, "Counts")."""
    demo = sites["hospital-a"]
    train = list(demo.site.records()[0].train().pseudonyms)
    # consent evaluation refuses a study above the cap; a cap of exactly 3 admits one study
    cap_patients(demo, train, 3.0, NOW - timedelta(days=1))
    first = _spec("cap-1")
    approve(demo.site, "cap-1", "cap-2")
    assert train_hospital_round(demo.site, first, 1, _weights(first), NOW).status == "ok"
    before = _ledger(demo).patient_spend()
    second = _spec("cap-2")
    out = train_hospital_round(demo.site, second, 1, _weights(second), NOW)
    assert out.status == "ok", out.reason
    ledger = _ledger(demo)
    # (the hold-out patients are not capped here: they are counted)
    assert not ledger.decision_patients("cap-2") & set(train) and _trained(demo, "cap-2") == set()
    assert {p: ledger.patient_spend()[p] for p in train} == {p: before[p] for p in train}
    assert all(s.studies == 1 for p, s in ledger.patient_spend().items() if p in train)


def test_a_closed_study_counts_what_it_really_spent(sites: dict[str, DemoSite]) -> None:
    """While a study runs its patients hold its whole target in reserve; once it is closed after
    one of three rounds, they count the epsilon of the steps they took (and can join more)."""
    demo = sites["hospital-a"]
    train = list(demo.site.records()[0].train().pseudonyms)
    cap_patients(demo, train[:5], 4.0, NOW - timedelta(days=1))
    spec = _spec("close-1")
    approve(demo.site, "close-1", "close-2")
    assert train_hospital_round(demo.site, spec, 1, _weights(spec), NOW).status == "ok"
    ledger = _ledger(demo)
    plan = ledger.plan("close-1")
    assert plan is not None
    assert ledger.patient_spend()[train[0]].epsilon == pytest.approx(3.0)  # count 0.1 + training 2.9
    second = _spec("close-2", epsilon=2.0)
    out = train_hospital_round(demo.site, second, 1, _weights(second), NOW)
    assert out.receipt is not None and ledger.plan("close-2") is not None
    assert _trained(demo, "close-2") == set(train[5:])  # 3 + 2 > 4
    ledger.close_study("close-1")
    counted = ledger.decision("close-1")
    assert counted is not None
    assert ledger.patient_spend()[train[0]].epsilon == pytest.approx(counted.epsilon + plan.epsilon_after(1))
    assert ledger.patient_spend()[train[0]].epsilon < 3.0


def test_a_hospital_restarted_mid_study_keeps_every_patients_spend(sites: dict[str, DemoSite]) -> None:
    """Round 1, then the node restarts (engines and file caches gone, as in a new process):
    every patient's spend is as before, round 2 advances it from there by one round's steps,
    and a repeated round advances nobody."""
    demo = sites["hospital-a"]
    train = list(demo.site.records()[0].train().pseudonyms)
    spec = _spec("restart")
    approve(demo.site, "restart")
    w = _weights(spec)
    assert train_hospital_round(demo.site, spec, 1, w, NOW).status == "ok"
    before = PrivacyLedger(create_engine(demo.site.ledger_url)).patient_spend()
    with PrivacyLedger(create_engine(demo.site.ledger_url)).engine.connect() as conn:
        units_before = dict(conn.exec_driver_sql(
            "SELECT pseudonym, units FROM privacy_patient_spend WHERE study_id = 'restart'").all())
    # restart: every cached engine and file is dropped
    for engine in site_module._engines.values():
        engine.dispose()
    site_module._engines.clear()
    site_module._file_cache.clear()
    fresh = PrivacyLedger(create_engine(demo.site.ledger_url))
    assert fresh.patient_spend() == before
    assert train_hospital_round(demo.site, spec, 2, w, NOW + timedelta(hours=1)).status == "ok"
    with fresh.engine.connect() as conn:
        units_after = dict(conn.exec_driver_sql(
            "SELECT pseudonym, units FROM privacy_patient_spend WHERE study_id = 'restart'").all())
    plan = fresh.plan("restart")
    assert plan is not None
    assert set(units_before) == set(train)
    assert all(units_after[p] == units_before[p] + plan.steps_per_round for p in train)
    assert fresh.rounds_charged("restart") == 2
    # a repeated round changes nobody's spend
    assert train_hospital_round(demo.site, spec, 2, w, NOW + timedelta(hours=1)).status == "refused"
    with fresh.engine.connect() as conn:
        again: dict[str, int] = dict(conn.exec_driver_sql(
            "SELECT pseudonym, units FROM privacy_patient_spend WHERE study_id = 'restart'").all())
    assert again == units_after


def test_no_patient_figure_leaves_the_hospital(sites: dict[str, DemoSite]) -> None:
    """The receipt and the reply carry study-level figures: no pseudonym, no per-patient spend."""
    demo = sites["hospital-a"]
    spec = _spec("leak")
    approve(demo.site, "leak")
    out = train_hospital_round(demo.site, spec, 1, _weights(spec), NOW)
    assert out.receipt is not None
    text = out.receipt.to_bytes().decode() + json.dumps(out.metrics)
    pseudonyms = demo.site.records()[0].pseudonyms
    assert not any(p in text for p in pseudonyms)
    # no patient or record count, nor the sample rate or noise multiplier (functions of it)
    assert set(out.metrics) == {"num_examples", "steps", "epsilon"}


# -- delta ------------------------------------------------------------------------------------------


def test_delta_above_the_site_maximum_or_one_over_n_is_refused(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    approve(demo.site, "d-big", "d-n", "d-ok")
    big = _spec("d-big", delta=1e-4)
    out = train_hospital_round(demo.site, big, 1, _weights(big), NOW)
    assert out.status == "refused"
    assert "delta: study 'd-big' asks 0.0001, above the site maximum 1e-05" in out.reason
    ledger = _ledger(demo)
    assert ledger.plan("d-big") is None and ledger.patient_spend() == {}
    # a site that allows larger deltas still never goes above 1/n
    ledger.set_delta_limits(max_delta=0.5, total_delta=0.9)
    n = len(demo.site.records()[0].train())
    too_big = _spec("d-n", delta=2.0 / n)
    _decide_exactly(demo, too_big)  # 1/n reads the plan's size, from the noised count
    out = train_hospital_round(demo.site, too_big, 1, _weights(too_big), NOW)
    assert out.status == "refused" and "above 1/n" in out.reason, out.reason
    assert ledger.plan("d-n") is None
    ok = _spec("d-ok", delta=1e-5)
    assert train_hospital_round(demo.site, ok, 1, _weights(ok), NOW).status == "ok"
    assert ledger.delta_spent() == pytest.approx(1e-5)


def test_deltas_are_budgeted_beside_epsilon(tmp_path: Path) -> None:
    from federated.accounting import DPPlan

    engine = create_engine(f"sqlite:///{tmp_path / 'l.db'}")
    from federated.privacy_ledger import metadata

    metadata.create_all(engine)
    ledger = PrivacyLedger(engine, total_budget=100.0, max_delta=1e-5, total_delta=2.5e-5)

    def plan(delta: float) -> DPPlan:
        return DPPlan(target_epsilon=1.0, delta=delta, rounds=1, steps_per_round=1, sample_rate=0.1,
                      noise_multiplier=1.0, batch_size=10, n_patients=100)

    ledger.register_study("a", plan(1e-5))
    ledger.register_study("b", plan(1e-5))
    with pytest.raises(BudgetExceededError, match=r"only 5e-06 of the hospital's delta budget 2\.5e-05"):
        ledger.register_study("c", plan(1e-5))
    assert ledger.plan("c") is None
    assert ledger.delta_spent() == pytest.approx(2e-5)
    assert ledger.delta_limits() == (1e-5, 2.5e-5)


def test_composition_reports_the_sum_and_the_tighter_prv_figure(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-b"]
    for study in ("comp-1", "comp-2"):
        spec = _spec(study, accountant="prv")
        approve(demo.site, study)
        for r in (1, 2, 3):
            assert train_hospital_round(demo.site, spec, r, _weights(spec), NOW).status == "ok"
    ledger = _ledger(demo)
    for study in ("comp-1", "comp-2"):
        ledger.close_study(study)
    comp = ledger.composition()
    spent = ledger.spent("comp-1") + ledger.spent("comp-2")
    assert comp.epsilon_sum == pytest.approx(spent)
    assert comp.epsilon_composed < 0.9 * comp.epsilon_sum
    assert comp.delta == pytest.approx(2e-5)
    # every patient counted by a decision has a spend (hold-out ones: the counts' epsilon)
    assert comp.patients == len(demo.site.records()[0])


# -- the evaluation oracle --------------------------------------------------------------------------


def _crafted(spec: StudySpec) -> np.ndarray:
    """Weights that predict "malignant" for everyone: the count of correct answers would be the
    exact number of malignant hold-out patients."""
    w = np.zeros(len(spec.columns) + 1, dtype=np.float32)
    w[-1] = 50.0
    return w


def test_many_evaluations_with_crafted_weights_get_one_charged_release_per_round(
        sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    spec = _spec("oracle")
    approve(demo.site, "oracle")
    assert train_hospital_round(demo.site, spec, 1, _weights(spec), NOW).status == "ok"
    ledger = _ledger(demo)
    plan = ledger.plan("oracle")
    assert plan is not None
    releases = [evaluate_hospital(demo.site, spec, _crafted(spec) * (1 + i), 1, NOW) for i in range(51)]
    assert all(r.status == "ok" for r in releases)
    assert len({json.dumps(r.metrics, sort_keys=True) for r in releases}) == 1  # one release, replayed
    assert len(ledger.evaluations("oracle")) == 1
    assert ledger.evaluation_spent("oracle") == pytest.approx(plan.evaluation_epsilon_after(1))
    # the other rounds' slots: one release each, then nothing more
    for slot in range(2, plan.rounds + 1):
        for _ in range(5):
            assert evaluate_hospital(demo.site, spec, _crafted(spec), slot, NOW).status == "ok"
    assert len(ledger.evaluations("oracle")) == plan.rounds
    out = evaluate_hospital(demo.site, spec, _crafted(spec), plan.rounds + 1, NOW)
    assert out.status == "refused" and "not one of the study's" in out.reason
    assert ledger.evaluation_spent("oracle") <= spec.epsilon
    # what the attack wanted: the exact number of malignant hold-out patients. It gets noised sums.
    test = demo.site.records()[0].test()
    malignant = int(test.y.sum())
    correct = [e.score for e in ledger.evaluations("oracle")]
    assert all(c != malignant for c in correct)
    assert all(not float(e.count).is_integer() for e in ledger.evaluations("oracle"))


def test_no_evaluation_for_an_unknown_refused_or_finished_study(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    spec = _spec("eval-life")
    # unknown here (not approved): refused, nothing registered
    out = evaluate_hospital(demo.site, spec, _crafted(spec), 1, NOW)
    assert out.status == "refused" and "not approved" in out.reason
    approve(demo.site, "eval-life")
    # approved, but this hospital never trained: no evaluation plan, refused
    out = evaluate_hospital(demo.site, spec, _crafted(spec), 1, NOW)
    assert out.status == "refused" and "has not trained" in out.reason
    assert train_hospital_round(demo.site, spec, 1, _weights(spec), NOW).status == "ok"
    ledger = _ledger(demo)
    ledger.close_study("eval-life")  # finished
    out = evaluate_hospital(demo.site, spec, _crafted(spec), 1, NOW)
    assert out.status == "refused" and "finished" in out.reason
    assert ledger.evaluations("eval-life") == []


def _message(spec: StudySpec, kind: str, round_: int, weights: np.ndarray) -> Message:
    content = RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(weights))})})
    return Message(content, dst_node_id=1, message_type=kind, group_id=str(round_), ttl=60)


def _ask(grid: InProcessGrid, message: Message) -> dict[str, Any]:
    ids = list(grid.push_messages([message]))
    (reply,) = grid.pull_messages(ids)
    return dict(reply.content.config_records[REPLY_KEY])


def test_through_the_clientapp_a_refused_train_message_does_not_evaluate(
        sites: dict[str, DemoSite]) -> None:
    """The real ClientApp, message by message: a train message for a study that is not approved,
    and one for a round already trained (refused), carry no evaluation; an accepted round-2 train
    message evaluates round 1's model once; evaluate messages replay that release."""
    demo = sites["hospital-a"]
    spec = _spec("app-eval")
    grid = InProcessGrid({1: demo.site.node_config()}, spec.to_run_config())
    refused = _ask(grid, _message(spec, MessageType.TRAIN, 2, _crafted(spec)))
    assert refused["status"] == "refused"
    assert not any(k.startswith(EVAL_PREFIX) for k in refused)
    approve(demo.site, "app-eval")
    first = _ask(grid, _message(spec, MessageType.TRAIN, 1, _weights(spec)))
    assert first["status"] == "ok" and not any(k.startswith(EVAL_PREFIX) for k in first)  # round 1: none
    again = _ask(grid, _message(spec, MessageType.TRAIN, 1, _crafted(spec)))
    assert again["status"] == "refused" and not any(k.startswith(EVAL_PREFIX) for k in again)
    assert _ledger(demo).evaluations("app-eval") == []
    second = _ask(grid, _message(spec, MessageType.TRAIN, 2, _weights(spec)))
    assert second["status"] == "ok"
    released = {k: v for k, v in second.items() if k.startswith(EVAL_PREFIX)}
    assert set(released) == {EVAL_PREFIX + k for k in ("count", "correct", "epsilon")}
    for _ in range(10):
        replay = _ask(grid, _message(spec, MessageType.EVALUATE, 1, _crafted(spec)))
        assert {k: v for k, v in replay.items() if k.startswith(EVAL_PREFIX)} == released
    assert len(_ledger(demo).evaluations("app-eval")) == 1
