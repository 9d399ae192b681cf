"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD (PATIENT level, add/remove adjacency).

The unit is the patient: `federated.dp` samples patients (rate = expected batch / eligible
patients) and lets a sampled patient contribute one clipped record per step, so adding or
removing a patient is exactly one subsampled Gaussian mechanism with sensitivity `clip` per step,
however many records the patient has. Every epsilon here is per patient.

Accountant: Opacus's PRV accountant (Gopi et al. 2021) by default, run from
`federated.dp_accountants` (Opacus's arithmetic, without importing Opacus). It returns an UPPER
bound on epsilon (estimate + its numerical error bound), within about 0.1-0.6 % of Google's PLD
accountant here and 7-10 % tighter than RDP; RDP stays available (`accountant="rdp"`). A PRV
evaluation is costly (docs/benchmarks/federated-dp.md), so results are cached on their exact arguments.

How a study's epsilon composes. DP-SGD at one hospital in one study is one long run of the same
mechanism (fixed noise multiplier, fixed sample rate): after the hospital has trained k rounds of
`steps_per_round` steps, its epsilon is the accountant's epsilon for k * steps_per_round steps
(tight composition), NOT k times the per-round epsilon. The sample rate is fixed for the whole
study when it is planned (batch size / records eligible then); if consent revocations later shrink
the record set, the hospital keeps the same sample rate (a smaller expected batch), so the
guarantee stays exactly the planned one. Across studies a hospital's total is the plain sum of
the studies' epsilons (basic composition), which is sound whatever the studies do and however
they were chosen; `compose_epsilon` gives the tight PRV composition of the same mechanisms, which
the privacy ledger reports beside the sum (docs/privacy.md says why the sum is what is enforced).

Evaluation on a hospital's hold-out patients is a separate mechanism on a DISJOINT set of
patients (a patient is either in training or in the hold-out): the Gaussian mechanism without
subsampling (sample rate 1), once per round, calibrated so that all of a study's evaluations
together stay within the study's (epsilon, delta) too (`DPPlan.eval_noise_multiplier`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
# Absolute error allowed in PRV's epsilon; the value returned is the upper bound, so a smaller
# error means a tighter (smaller) reported epsilon, at some cost in time.
PRV_EPS_ERROR = 0.005
MAX_NOISE_MULTIPLIER = 1e4


class AccountingError(ValueError):
    """Parameters an accountant cannot work with, or a privacy target that cannot be met."""


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
           accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant: must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool)) or steps < 0:
        raise AccountingError(f"steps: must be a non-negative integer, got {steps!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise AccountingError(f"sample_rate: must be in (0, 1], got {sample_rate}")
    if not 0.0 < delta < 1.0:
        raise AccountingError(f"delta: must be in (0, 1), got {delta}")
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise AccountingError(f"noise_multiplier: must be finite and >= 0, got {noise_multiplier}")


#: One mechanism as the accountants see it: (noise multiplier, sample rate, steps).
Mechanism = tuple[float, float, int]


@lru_cache(maxsize=4096)
def _composed_cached(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    # Imported here, not at module level: the node daemon imports this module (through the
    # privacy ledger) only for DPPlan, and the accountants import SciPy. Opacus's accountants,
    # without importing Opacus (`federated.dp_accountants` says why).
    from federated.dp_accountants import prv_epsilon, rdp_epsilon

    with warnings.catch_warnings():
        # PRV at sample_rate=1 logs a harmless log(0) warning; RDP warns about its alpha grid.
        warnings.simplefilter("ignore")
        if accountant == "prv":
            return float(prv_epsilon(history, delta, eps_error=PRV_EPS_ERROR))
        return float(rdp_epsilon(history, delta))


def _epsilon_cached(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str) -> float:
    return _composed_cached(((noise_multiplier, sample_rate, steps),), delta, accountant)


def compose_epsilon(mechanisms: Iterable[Mechanism], delta: float,
                    accountant: AccountantName = "prv") -> float:
    """Epsilon (upper bound) at `delta` of running all `mechanisms` (each a Poisson-subsampled
    Gaussian: noise multiplier, sample rate, steps) on the same patient: the tight composition
    (PRV by default) that the privacy ledger reports beside the plain sum of epsilons."""
    history: list[Mechanism] = []
    for sigma, q, steps in mechanisms:
        _check(sigma, q, steps, delta, accountant)
        if steps == 0:
            continue
        if sigma == 0.0:
            return math.inf
        history.append((float(sigma), float(q), int(steps)))
    if not history:
        return 0.0
    return _composed_cached(tuple(sorted(history)), float(delta), accountant)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: AccountantName = "prv") -> float:
    """Epsilon (upper bound) of `steps` steps of Poisson-subsampled Gaussian DP-SGD with this
    noise multiplier and sample rate, at `delta`. 0 steps cost 0; no noise costs infinity."""
    _check(noise_multiplier, sample_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    return _epsilon_cached(float(noise_multiplier), float(sample_rate), int(steps), float(delta),
                           accountant)


@lru_cache(maxsize=1024)
def _calibrate_cached(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                      accountant: str, *, rel_tolerance: float) -> float:
    def eps(sigma: float) -> float:
        return epsilon_spent(sigma, sample_rate, total_steps, delta, accountant)  # type: ignore[arg-type]

    # epsilon falls roughly like 1/sigma, so search on log sigma with regula falsi (Illinois
    # variant) on log epsilon: 3-6 accountant calls where bisection needs 10-20. Each PRV call
    # costs up to a second on a loaded machine.
    def f(log_sigma: float) -> float:
        return math.log(max(eps(math.exp(log_sigma)), 1e-300)) - math.log(target_epsilon)

    # start near the answer: the Gaussian mechanism's classic sigma scaled by the sample rate
    guess = sample_rate * math.sqrt(total_steps * 2 * math.log(1.25 / delta)) / target_epsilon
    x0 = math.log(max(guess, 0.3))
    f0 = f(x0)
    # bracket: step in the direction the 1/sigma rule suggests until the sign changes
    x1 = x0 + f0 + (0.05 if f0 > 0 else -0.05)
    f1 = f(x1)
    while (f0 > 0) == (f1 > 0):
        x0, f0 = x1, f1
        x1 = x1 + 2 * (f1 + (0.05 if f1 > 0 else -0.05))
        if x1 > math.log(MAX_NOISE_MULTIPLIER):
            raise AccountingError(
                f"target_epsilon: {target_epsilon} is not reachable for {total_steps} steps at "
                f"sample rate {sample_rate} (noise multiplier would exceed {MAX_NOISE_MULTIPLIER})")
        f1 = f(x1)
    # hi: eps <= target (f <= 0); lo: eps > target (f > 0)
    (x_hi, f_hi), (x_lo, f_lo) = ((x1, f1), (x0, f0)) if f1 <= 0 else ((x0, f0), (x1, f1))
    side = 0
    while -f_hi > math.log1p(rel_tolerance) and abs(x_hi - x_lo) > 1e-5:
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        fx = f(x)
        if fx <= 0:
            x_hi, f_hi = x, fx
            if side == -1:
                f_lo /= 2
            side = -1
        else:
            x_lo, f_lo = x, fx
            if side == 1:
                f_hi /= 2
            side = 1
    # f_hi may have been halved by the Illinois step; x_hi itself always satisfied eps <= target
    hi = math.exp(x_hi)
    return hi


def calibrate(target_epsilon: float, delta: float, sample_rate: float, total_steps: int, *,
              accountant: AccountantName = "prv", rel_tolerance: float = 0.005) -> float:
    """The noise multiplier that makes `total_steps` steps at `sample_rate` cost at most
    `target_epsilon` at `delta` (and at least (1 - rel_tolerance) * target_epsilon: no more noise
    than needed). Bisection on the same accountant that reports the spend, cached."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(f"target_epsilon: must be positive and finite, got {target_epsilon}")
    _check(1.0, sample_rate, total_steps, delta, accountant)
    if total_steps < 1:
        raise AccountingError(f"total_steps: must be at least 1, got {total_steps}")
    if not 0.0 < rel_tolerance < 0.5:
        raise AccountingError(f"rel_tolerance: must be in (0, 0.5), got {rel_tolerance}")
    return _calibrate_cached(float(target_epsilon), float(delta), float(sample_rate),
                             int(total_steps), accountant, rel_tolerance=float(rel_tolerance))


@dataclass(frozen=True)
class DPPlan:
    """A hospital's DP-SGD plan for one study, fixed before its first round.

    The sample rate (expected batch / `n_patients`, the eligible patients at planning) and noise
    multiplier never change during the study (see module docstring); `epsilon_after(k)` is the
    per-patient spend after the hospital trained k rounds. `eval_noise_multiplier` calibrates the
    hold-out evaluation (one Gaussian release per round, sensitivity `federated.evaluation`'s):
    `evaluation_epsilon_after(k)` is a hold-out patient's spend after k evaluations.
    """

    target_epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    sample_rate: float
    noise_multiplier: float
    batch_size: int
    n_patients: int
    accountant: AccountantName = "prv"
    eval_noise_multiplier: float | None = None

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def epsilon_after(self, rounds_trained: int) -> float:
        """Cumulative epsilon after `rounds_trained` rounds of this plan (0 for 0)."""
        if not 0 <= rounds_trained <= self.rounds:
            raise AccountingError(f"rounds_trained: must be in [0, {self.rounds}], got {rounds_trained}")
        return epsilon_spent(self.noise_multiplier, self.sample_rate,
                             rounds_trained * self.steps_per_round, self.delta, self.accountant)

    def epsilon_for_steps(self, steps: int) -> float:
        """A patient's epsilon after taking part in `steps` of this plan's DP-SGD steps."""
        if not 0 <= steps <= self.total_steps:
            raise AccountingError(f"steps: must be in [0, {self.total_steps}], got {steps}")
        return epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def evaluation_epsilon_after(self, evaluations: int) -> float:
        """A hold-out patient's epsilon after `evaluations` charged evaluations (0 for 0)."""
        if self.eval_noise_multiplier is None:
            raise AccountingError("eval_noise_multiplier: this plan has no evaluation calibration")
        if not 0 <= evaluations <= self.rounds:
            raise AccountingError(f"evaluations: must be in [0, {self.rounds}], got {evaluations}")
        return epsilon_spent(self.eval_noise_multiplier, 1.0, evaluations, self.delta, self.accountant)

    def mechanisms(self, steps: int = -1, evaluations: int = 0) -> list[Mechanism]:
        """The accountant's view of `steps` training steps (default: all planned) and
        `evaluations` evaluations of this plan, for `compose_epsilon`."""
        out: list[Mechanism] = [(self.noise_multiplier, self.sample_rate,
                                 self.total_steps if steps < 0 else steps)]
        if evaluations and self.eval_noise_multiplier is not None:
            out.append((self.eval_noise_multiplier, 1.0, evaluations))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPPlan:
        return cls(**data)


def max_delta(n_patients: int) -> float:
    """The largest delta a study over `n_patients` patients may have: 1/n. A larger delta allows
    a mechanism that publishes one patient's data outright with probability delta, and with
    n patients that is likely to expose someone."""
    return 1.0 / max(1, n_patients)


def plan_patients(noisy_count: int, *, holdout_fraction: float = 0.0,
                  capacity: int | None = None) -> int:
    """The patient count a study's DP plan is sized for (sample rate = batch / this), from the
    hospital's NOISED decision count only (`PrivacyLedger.decide`: already released, as the
    hospital's decision, and charged to every patient counted), never from an exact count: the
    sample rate, the noise multiplier calibrated from it and the update's scale reach the server,
    so they must be post-processing of a released value (docs/privacy.md, "Counts").

    The decision counts hold-out and training patients alike; `holdout_fraction` (the site's
    public `training.test_fraction`) takes the hold-out share off. Clamped to at least 1 (the
    noised count may be 0 or negative) and at most the site's public reward `capacity`. The
    count may be below or above the real number of training patients: DP-SGD still samples the
    real patients, each independently with this rate, and the accountant's guarantee holds for
    any sample rate fixed before the data is touched (the rate depends on the data only through
    the released count: adaptive composition), only the expected batch moves."""
    if isinstance(noisy_count, bool) or not isinstance(noisy_count, int):
        raise AccountingError(f"noisy_count: must be an integer, got {noisy_count!r}")
    if not (isinstance(holdout_fraction, int | float) and 0.0 <= holdout_fraction < 1.0):
        raise AccountingError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction!r}")
    n = max(1, round(noisy_count * (1.0 - holdout_fraction)))
    return n if capacity is None else max(1, min(n, int(capacity)))


def plan_study(target_epsilon: float, delta: float, *, rounds: int, n_patients: int,
               batch_size: int, steps_per_round: int,
               accountant: AccountantName = "prv", evaluation: bool = True) -> DPPlan:
    """Fix sample rate (= min(1, batch_size / n_patients)) and calibrate the noise multiplier so
    that ALL `rounds` planned rounds together stay within (target_epsilon, delta) per patient;
    with `evaluation`, also the noise of the hold-out evaluation (one per round). Refuses a
    delta above 1/n_patients (`max_delta`)."""
    for name, value in (("rounds", rounds), ("n_patients", n_patients), ("batch_size", batch_size),
                        ("steps_per_round", steps_per_round)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AccountingError(f"{name}: must be a positive integer, got {value!r}")
    if delta > max_delta(n_patients):
        # no n in the message: it can reach a refusal text, which leaves the hospital
        raise AccountingError(f"delta: {delta:g} is above 1/n for the n eligible patients")
    sample_rate = min(1.0, batch_size / n_patients)
    sigma = calibrate(target_epsilon, delta, sample_rate, rounds * steps_per_round,
                      accountant=accountant)
    eval_sigma = (calibrate(target_epsilon, delta, 1.0, rounds, accountant=accountant)
                  if evaluation else None)
    return DPPlan(target_epsilon=float(target_epsilon), delta=float(delta), rounds=rounds,
                  steps_per_round=steps_per_round, sample_rate=sample_rate,
                  noise_multiplier=sigma, batch_size=batch_size, n_patients=n_patients,
                  accountant=accountant, eval_noise_multiplier=eval_sigma)
