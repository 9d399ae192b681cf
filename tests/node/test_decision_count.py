"""The decision count (docs/privacy.md, "Decision count"): one noised count of eligible patients
per study, charged to each patient counted, persisted, and the only count the decision reads."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from exchange.node.policy import Budget, Eligibility, StudyView, evaluate
from exchange.node.settings import SitePolicy
from federated.privacy_ledger import PrivacyLedger, metadata
from federated.secure_random import SecureRandom

EPSILON = 0.5


def _study() -> StudyView:
    return StudyView.from_json({"id": "s", "organisation_id": "acme", "organisation_region": "DE",
                                "status": "submitted", "spec": {
                                    "purpose": "DUO:0000042", "columns": {"labs": ["x"]},
                                    "label": "label", "epsilon": 1.0, "delta": 1e-5, "rounds": 1}})


def _decision(policy: SitePolicy, noisy: int) -> str | None:
    eligibility = Eligibility(eligible=noisy, patients=None, noisy_patients=noisy)
    held = {"x": "labs", "label": ""}
    return evaluate(policy, _study(), eligibility, Budget(0.0, 0.0, 20.0), held).decision


def _ledger(url: str) -> PrivacyLedger:
    engine = create_engine(url)
    metadata.create_all(engine)
    return PrivacyLedger(engine, 20.0)


def test_the_discrete_laplace_has_the_mechanisms_law() -> None:
    """P(k) = (1 - a) / (1 + a) a^|k|, a = exp(-epsilon): empirical frequencies of the secure
    sampler (seeded) match it, so adding it to a count of sensitivity 1 is epsilon-DP."""
    rng = SecureRandom(7)
    draws = Counter(rng.discrete_laplace(EPSILON) for _ in range(40_000))
    a = math.exp(-EPSILON)
    for k in range(-3, 4):
        expected = (1 - a) / (1 + a) * a ** abs(k)
        assert draws[k] / 40_000 == pytest.approx(expected, abs=0.01)
    with pytest.raises(ValueError, match="epsilon"):
        rng.discrete_laplace(0.0)


def test_one_patient_more_or_less_moves_the_decision_by_at_most_e_to_the_epsilon() -> None:
    """The attack on the threshold: cohorts of n and n + 1 patients at the site minimum. Without
    noise the decision flips with certainty; with the decision count, its probability changes by
    at most e^epsilon, analytically and in many draws of the real sampler (fixed seed)."""
    minimum = 20
    policy = SitePolicy(mode="auto-approve", min_eligible_records=minimum)
    a = math.exp(-EPSILON)

    def p_approve(n: int) -> float:  # P(n + L >= minimum), L discrete Laplace
        gap = minimum - n  # L >= gap
        return a ** gap / (1 + a) if gap > 0 else 1 - a ** (1 - gap) / (1 + a)

    for n in range(minimum - 10, minimum + 10):
        for p, q in ((p_approve(n), p_approve(n + 1)), (1 - p_approve(n), 1 - p_approve(n + 1))):
            assert max(p / q, q / p) <= math.exp(EPSILON) * (1 + 1e-12)
    draws = 40_000
    rng = SecureRandom(11)
    approvals = {n: sum(_decision(policy, n + rng.discrete_laplace(EPSILON)) == "approve"
                        for _ in range(draws)) / draws for n in (minimum - 1, minimum)}
    for n, share in approvals.items():
        assert share == pytest.approx(p_approve(n), abs=0.012)
    ratio = approvals[minimum] / approvals[minimum - 1]
    assert 1.0 < ratio <= math.exp(EPSILON) * 1.05
    # the exact count would flip: 19 refused, 20 approved, every time
    assert (_decision(policy, minimum - 1), _decision(policy, minimum)) == ("refuse", "approve")


def test_the_count_charges_each_patient_counted_once_and_survives_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    ledger = _ledger(url)
    caps = {"a": None, "b": 5.0, "c": 1.05}  # c's cap cannot take the study (1) and the count (0.1)
    first = ledger.decide("s", 0.1, 1.0, caps, 20.0, noise=SecureRandom(3))
    assert first.patients == 2 and ledger.decision_patients("s") == frozenset({"a", "b"})
    spend = ledger.patient_spend()
    assert set(spend) == {"a", "b"} and spend["a"].epsilon == pytest.approx(0.1)
    assert ledger.composition().epsilon_sum == pytest.approx(0.1)
    # a restarted hospital (new engine, new noise source) reads the same count and charges nothing
    again = _ledger(url).decide("s", 0.1, 1.0, {**caps, "d": None}, 20.0, noise=SecureRandom(99))
    assert (again.noisy_count, again.patients) == (first.noisy_count, 2)
    assert _ledger(url).patient_spend()["a"].epsilon == pytest.approx(0.1)
    # the charge counts against the lifetime cap: b (cap 5) has 4.9 left, not 5
    assert ledger.admissible("t", 4.95, {"b": 5.0}, 20.0).over_cap == 1
    assert ledger.admissible("t", 4.9, {"b": 5.0}, 20.0).admitted == frozenset({"b"})


def test_the_counts_epsilon_is_part_of_the_studys_spend(tmp_path: Path) -> None:
    """The decision count's epsilon is inside the study's accounting: the study's spend (what its
    receipts' epsilon_total says) and the hospital's total include it, and a patient counted in
    a study of epsilon 1 whose training may spend 0.9 holds 1.0 of their lifetime cap, not 1.1."""
    from federated.accounting import DPPlan

    url = f"sqlite:///{tmp_path / 'node.db'}"
    ledger = _ledger(url)
    ledger.decide("s", 0.1, 0.9, {"a": 1.0, "b": None}, 20.0, noise=SecureRandom(3))
    assert ledger.spent("s") == pytest.approx(0.1) and ledger.total_spent() == pytest.approx(0.1)
    plan = DPPlan(target_epsilon=0.9, delta=1e-5, rounds=1, steps_per_round=2, sample_rate=0.5,
                  noise_multiplier=2.0, batch_size=1, n_patients=2)
    ledger.register_study("s", plan)
    admitted = ledger.admit("s", "train", {"a": 1.0, "b": None}, 20.0)
    assert admitted.admitted == frozenset({"a", "b"})  # 0.1 + 0.9 <= 1.0
    ledger.charge("s", 1, 0.8, patients={"a", "b"})
    assert ledger.training_spent("s") == pytest.approx(0.8)
    assert ledger.spent("s") == pytest.approx(0.9) and ledger.study_spent("s") == pytest.approx(0.9)
    assert ledger.total_spent() == pytest.approx(0.9)
    assert ledger.patient_spend()["a"].epsilon == pytest.approx(1.0)  # open: the count + the target
