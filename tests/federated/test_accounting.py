"""Privacy accounting: our epsilon against Google's dp-accounting, calibration, plans."""

from __future__ import annotations

import itertools
import math

import pytest

from federated.accounting import (
    AccountingError,
    calibrate,
    compose_epsilon,
    epsilon_spent,
    max_delta,
    plan_study,
)
from tests.dp_reference import independent_epsilon

DELTA = 1e-5


def google_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    return independent_epsilon([(sigma, q, steps)], delta, kind)


# (noise multiplier, sample rate, steps): the range studies use (low and high epsilon, full batch).
CASES = [(1.0, 0.2, 100), (2.0, 1.0, 10), (5.0, 0.05, 2000), (8.0, 0.43, 100), (3.0, 0.35, 60)]


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_prv_epsilon_matches_google_pld_within_one_percent(sigma: float, q: float, steps: int) -> None:
    ours = epsilon_spent(sigma, q, steps, DELTA)
    theirs = google_epsilon(sigma, q, steps, DELTA, "pld")
    assert ours == pytest.approx(theirs, rel=0.01)
    # PRV reports an upper bound: never meaningfully below the PLD estimate.
    assert ours >= theirs * 0.999


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES[:3])
def test_rdp_epsilon_matches_google_rdp_within_one_percent(sigma: float, q: float, steps: int) -> None:
    ours = epsilon_spent(sigma, q, steps, DELTA, accountant="rdp")
    theirs = google_epsilon(sigma, q, steps, DELTA, "rdp")
    assert ours == pytest.approx(theirs, rel=0.01)
    # and PRV is the tighter of the two
    assert epsilon_spent(sigma, q, steps, DELTA) < ours


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_hits_target_from_below(target: float) -> None:
    q, steps = 0.45, 100
    sigma = calibrate(target, DELTA, q, steps)
    eps = epsilon_spent(sigma, q, steps, DELTA)
    assert eps <= target
    assert eps >= 0.99 * target
    # and an independent accountant agrees the target holds (within its 1 % agreement)
    assert google_epsilon(sigma, q, steps, DELTA, "pld") <= target * 1.001


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_more_steps_or_higher_rate_need_more_noise(accountant: str) -> None:
    base = calibrate(2.0, DELTA, 0.3, 50, accountant=accountant)
    assert calibrate(2.0, DELTA, 0.3, 100, accountant=accountant) > base
    assert calibrate(2.0, DELTA, 0.6, 50, accountant=accountant) > base
    assert calibrate(4.0, DELTA, 0.3, 50, accountant=accountant) < base
    assert epsilon_spent(base, 0.3, 50, DELTA, accountant=accountant) <= 2.0


def test_zero_steps_cost_nothing_and_no_noise_costs_infinity() -> None:
    assert epsilon_spent(1.0, 0.5, 0, DELTA) == 0.0
    assert math.isinf(epsilon_spent(0.0, 0.5, 10, DELTA))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"steps": -1}, "steps"),
    ({"delta": 0.0}, "delta"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_bad_accounting_input_names_the_field(kwargs: dict, field: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 10, "delta": DELTA} | kwargs
    with pytest.raises(AccountingError, match=field):
        epsilon_spent(**args)


def test_unreachable_or_bad_target_is_refused() -> None:
    with pytest.raises(AccountingError, match="target_epsilon"):
        calibrate(0.0, DELTA, 0.5, 10)
    with pytest.raises(AccountingError, match="total_steps"):
        calibrate(1.0, DELTA, 0.5, 0)


def test_plan_composes_tightly_over_rounds() -> None:
    plan = plan_study(1.0, DELTA, rounds=5, n_patients=150, batch_size=64, steps_per_round=10)
    assert plan.sample_rate == pytest.approx(64 / 150)
    assert plan.total_steps == 50
    per_round = [plan.epsilon_after(k) for k in range(6)]
    assert per_round[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(per_round))
    assert per_round[-1] <= 1.0
    assert per_round[-1] >= 0.99
    # tight composition: far below the naive sum of per-round epsilons
    assert per_round[-1] < 5 * per_round[1] * 0.8
    with pytest.raises(AccountingError, match="rounds_trained"):
        plan.epsilon_after(6)


def test_plan_with_fewer_records_than_batch_uses_full_batch() -> None:
    plan = plan_study(3.0, DELTA, rounds=2, n_patients=10, batch_size=64, steps_per_round=5)
    assert plan.sample_rate == 1.0
    assert plan.epsilon_after(2) <= 3.0


def test_plan_round_trips_through_dict() -> None:
    plan = plan_study(3.0, DELTA, rounds=2, n_patients=100, batch_size=20, steps_per_round=5)
    assert type(plan).from_dict(plan.to_dict()) == plan


def test_privacy_ledger_import_does_not_load_torch() -> None:
    """The node daemon imports the ledger for DPPlan only: torch/opacus must stay unloaded
    (they cost seconds of start-up per daemon)."""
    import subprocess
    import sys

    code = ("import sys, federated.privacy_ledger; "
            "print(any(m == 'torch' or m.startswith(('torch.', 'opacus')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_composition_of_different_studies_matches_google_pld_and_beats_the_sum() -> None:
    """Three studies with different noise, rates and lengths (and one evaluation mechanism,
    sample rate 1) on the same patient: the PRV composition the ledger reports agrees with an
    independent PLD accountant within 1 % and is well below the sum of the studies' epsilons."""
    mechanisms = [(1.2, 0.3, 100), (2.5, 0.9, 50), (4.0, 1.0, 5)]
    composed = compose_epsilon(mechanisms, 3 * DELTA)
    theirs = independent_epsilon(mechanisms, 3 * DELTA)
    assert composed == pytest.approx(theirs, rel=0.01)
    assert composed >= theirs * 0.999
    summed = sum(epsilon_spent(*m, DELTA) for m in mechanisms)
    assert composed < 0.9 * summed
    # order does not matter; nothing composes to 0; no noise is infinite
    assert compose_epsilon(list(reversed(mechanisms)), 3 * DELTA) == composed
    assert compose_epsilon([], DELTA) == 0.0
    assert math.isinf(compose_epsilon([(0.0, 0.5, 3)], DELTA))


def test_delta_above_one_over_n_patients_is_refused() -> None:
    with pytest.raises(AccountingError, match=r"delta: 0\.02 is above 1/n for the n eligible"):
        plan_study(3.0, 0.02, rounds=2, n_patients=100, batch_size=20, steps_per_round=5)
    assert max_delta(100) == 0.01
    plan_study(3.0, 0.01, rounds=2, n_patients=100, batch_size=20, steps_per_round=5)  # 1/n is allowed


def test_evaluation_noise_is_calibrated_to_the_study_target() -> None:
    plan = plan_study(3.0, DELTA, rounds=4, n_patients=100, batch_size=20, steps_per_round=5)
    assert plan.eval_noise_multiplier is not None
    full = plan.evaluation_epsilon_after(4)
    assert 0.99 * 3.0 <= full <= 3.0
    assert plan.evaluation_epsilon_after(1) < plan.evaluation_epsilon_after(2) < full
    # the Gaussian mechanism without subsampling, as the independent accountant sees it
    assert full == pytest.approx(google_epsilon(plan.eval_noise_multiplier, 1.0, 4, DELTA, "pld"), rel=0.01)
    with pytest.raises(AccountingError, match="evaluations"):
        plan.evaluation_epsilon_after(5)
