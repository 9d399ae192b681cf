"""Distributed Skellam noise (`federated.distributed_noise`): the accounting against independent
computations, the noise's statistics, the exactness of the integer path through SecAgg+, and a
study end to end (the real ClientApp with Flower's secaggplus_mod and the real ServerApp, in
process)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

import federated.client_app as client_app_module
from federated import distributed_noise as dn
from federated.accounting import calibrate, epsilon_spent
from federated.runtime.demo_sites import DemoSite, demo_spec, provision_sites
from federated.runtime.site import DEFAULT_DECISION_EPSILON
from federated.secure_random import SecureRandom
from federated.study_spec import StudySpec, StudySpecError
from tests.federated.test_secagg import RecordingGrid, _globals, _has, _masked, _run

# -- accounting --------------------------------------------------------------------------------


def _exact_renyi(alpha: float, mu: float, shift: int) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)), summed over the support numerically (scipy's pmf)."""
    lam = mu / 2
    reach = int(abs(shift) + 30 * math.sqrt(mu) + 50)
    k = np.arange(-reach, reach + 1)
    log_p = stats.skellam.logpmf(k - shift, lam, lam)
    log_q = stats.skellam.logpmf(k, lam, lam)
    both = np.isfinite(log_p) & np.isfinite(log_q)  # the far tails underflow: nothing to add
    terms = alpha * log_p[both] + (1 - alpha) * log_q[both]
    top = terms.max()
    return float((top + math.log(np.exp(terms - top).sum())) / (alpha - 1))


@pytest.mark.parametrize("mu", [40.0, 400.0, 4000.0])
@pytest.mark.parametrize("alpha", [2, 8, 32])
def test_skellam_rdp_bound_holds_against_the_exact_divergence(mu: float, alpha: int) -> None:
    """The bound (Agarwal, Kairouz, Liu 2021) is above the exact Renyi divergence of the shifted
    Skellam, computed independently from its pmf, and close to it (the leading term is exact
    for the Gaussian limit). A vector shift: the divergences of the coordinates add up."""
    for shift in (1, 3, 7):
        exact = _exact_renyi(alpha, mu, shift)
        bound = dn.skellam_rdp(alpha, shift, shift, mu)
        assert exact <= bound
        if mu >= 400:  # near the Gaussian regime (a study's mu is far larger) the bound is tight
            assert bound <= exact * 1.6 + 1e-9
    shifts = [3, -2, 1, 5]
    exact = sum(_exact_renyi(alpha, mu, s) for s in shifts)
    l1, l2 = float(sum(abs(s) for s in shifts)), math.sqrt(sum(s * s for s in shifts))
    assert exact <= dn.skellam_rdp(alpha, l1, l2, mu)


def test_epsilon_conversion_is_the_published_rdp_conversion() -> None:
    """skellam_epsilon = min over orders of RDP + log((a-1)/a) - (log delta + log a)/(a-1)
    (Balle et al. 2020, Theorem 21, as Opacus converts), written out here independently."""
    l1, l2, mu, rounds, delta = 40.0, 7.0, 900.0, 5, 1e-5
    mine = min(rounds * dn.skellam_rdp(a, l1, l2, mu) + math.log((a - 1) / a)
               - (math.log(delta) + math.log(a)) / (a - 1) for a in dn.ORDERS)
    assert dn.skellam_epsilon(l1, l2, mu, rounds, delta) == pytest.approx(mine, rel=1e-9)


def test_the_ledgers_gaussian_dominates_the_skellam_bound_at_every_order() -> None:
    """The ledger accounts a distributed study as the Gaussian at `sigma` (sample rate 1, RDP):
    its RDP is above the Skellam RDP of the calibrated noise at every order (so its epsilon is an
    upper bound), the Skellam epsilon is within 1 % of it (nothing is wasted), and after all
    rounds both are at most the study's epsilon."""
    noise = dn.plan_noise(epsilon=1.0, delta=1e-5, rounds=5, clip=1.0, n_weights=31, honest=3)
    for alpha in (1.01, 1.5, *range(2, 200), 512.0, 4096.0):
        assert dn.skellam_rdp(alpha, noise.l1, noise.l2, noise.mu) <= alpha / (2 * noise.sigma**2)
    ledger = epsilon_spent(noise.sigma, 1.0, 5, 1e-5, "rdp")
    assert noise.central_epsilon(5) <= ledger <= 1.0
    assert noise.central_epsilon(5) == pytest.approx(ledger, rel=0.01)
    assert noise.sigma == calibrate(1.0, 1e-5, 1.0, 5, accountant="rdp")
    # each hospital's share is mu / t; alone it gives the (weaker) local guarantee
    assert noise.share_variance == pytest.approx(noise.mu / 3)
    alone = dn.skellam_epsilon(noise.l1, noise.l2, noise.mu / 3, 5, 1e-5)
    assert noise.local_epsilon(5) == pytest.approx(alone)
    assert noise.local_epsilon(5) > 1.4 * noise.central_epsilon(5)


def test_rounding_bound_is_taken_from_the_paper_and_enforced() -> None:
    """rounded_l2_bound matches the formula of Kairouz, Liu, Steinke 2021 (hand-computed here), and
    conditional rounding never returns a vector above it, while plain rounding can."""
    l2, dim = 1024.0 * math.sqrt(1.25), 31
    by_hand = math.sqrt(l2**2 + dim / 4 + math.sqrt(2 * 0.5) * (l2 + math.sqrt(dim) / 2))
    assert dn.rounded_l2_bound(l2, dim) == pytest.approx(min(l2 + math.sqrt(dim), by_hand))
    assert dn.rounded_l1_bound(3.0, 100) == 9.0 and dn.rounded_l1_bound(30.0, 100) == 300.0
    rng = SecureRandom(7)
    rows = np.random.default_rng(1).normal(size=(2000, 8))
    rows *= (4.0 / np.linalg.norm(rows, axis=1))[:, None]  # norm exactly 4: the clip norm
    tight = 4.3  # below the paper's bound: conditional rounding has to redraw some rows
    rounded = dn.conditional_round(rows, tight, rng)
    assert np.all(np.linalg.norm(rounded, axis=1) <= tight)
    assert np.all(np.abs(rounded - rows) < 1)
    plain = np.floor(rows) + (np.random.default_rng(2).random(rows.shape) < rows - np.floor(rows))
    assert np.any(np.linalg.norm(plain, axis=1) > tight)


# -- the noise -----------------------------------------------------------------------------------------


def test_poisson_sampler_has_the_poisson_distribution() -> None:
    """PTRS on ChaCha20 uniforms against scipy's Poisson pmf (chi-square over bins)."""
    lam, n = 30.0, 60_000
    draws = dn.poisson(SecureRandom(3), n, lam)
    values, counts = np.unique(np.clip(draws, 15, 46), return_counts=True)
    probs = np.array([stats.poisson.cdf(15, lam)] + [stats.poisson.pmf(v, lam) for v in range(16, 46)]
                     + [stats.poisson.sf(45, lam)])
    observed = np.zeros(32)
    observed[values - 15] = counts
    chi2 = stats.chisquare(observed, probs * n)
    assert chi2.pvalue > 1e-4
    with pytest.raises(dn.DistributedNoiseError, match="below"):
        dn.poisson(SecureRandom(3), 3, 2.0)


def test_the_members_shares_sum_to_the_calibrated_aggregate_noise() -> None:
    """Three hospitals each add Sk(mu / 3): their sum has mean 0 and variance mu (within 5
    standard errors over 200k coordinates), the variance of Sk(mu) itself."""
    mu, n = 3.0e6, 200_000
    total = sum(dn.skellam(SecureRandom(), n, mu / 3) for _ in range(3))
    var = float(np.var(total, ddof=1))
    assert abs(float(total.mean())) < 5 * math.sqrt(mu / n)
    assert abs(var - mu) < 5 * mu * math.sqrt(2 / (n - 1))
    one = dn.skellam(SecureRandom(), n, mu / 3)
    assert abs(float(np.var(one, ddof=1)) - mu / 3) < 5 * (mu / 3) * math.sqrt(2 / (n - 1))


def test_integer_vectors_pass_secaggplus_quantization_exactly() -> None:
    """An encoded integer vector, multiplied by the weight ratio 1 and quantized by Flower's own
    quantizer (clip 8, 2**22 levels), gives back exactly the integers; the server's centring
    undoes the modulus."""
    from flwr.common.secure_aggregation.quantization import quantize

    ints = np.array([0, 1, 2**21, dn.MODULUS - 1, 12345, 2**22 - 2**10], dtype=np.int64)
    encoded = dn.encode(ints).astype(np.float32)  # the reply carries float32
    (quantized,) = quantize([encoded.astype(np.float64) * 1.0], 8.0, 2**22)
    assert np.array_equal(quantized.astype(np.int64), ints)
    assert np.array_equal(dn.decode(encoded), ints)
    assert list(dn.centred(np.array([dn.MODULUS - 5, 7, 3 * dn.MODULUS + 2]))) == [-5, 7, 2]
    with pytest.raises(dn.DistributedNoiseError):
        dn.encode(np.array([-1]))


# -- a study ---------------------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites")


def test_a_study_with_distributed_noise_end_to_end(
    three: dict[str, DemoSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three hospitals, SecAgg+ and distributed noise: every round's new global model is exactly
    the server's step from the sum of the hospitals' integer vectors (seen here inside the
    hospitals, before masking); the coordinator never receives one of them in clear; each round
    reports both guarantees; the receipts' epsilon never exceeds the study's."""
    vectors: dict[int, list[np.ndarray]] = {}
    real = client_app_module.train_hospital_round

    def spy(site: Any, spec: StudySpec, round_: int, weights: np.ndarray, at: Any = None) -> Any:
        out = real(site, spec, round_, weights, at)
        if out.weights is not None:
            vectors.setdefault(round_, []).append(dn.decode(out.weights))
        return out

    monkeypatch.setattr(client_app_module, "train_hospital_round", spy)
    spec = demo_spec("dn-e2e", min_hospitals=3, rounds=3, epsilon=1.0, accountant="rdp",
                     secure_aggregation=True, noise="distributed")
    observer, grid = _run(three, spec, tmp_path, grid_class=RecordingGrid)
    assert observer.failed == [] and observer.completed is not None
    globals_ = _globals(grid)
    step = dn.server_step(spec, globals_[1])
    noise = dn.for_study(spec, globals_[1].shape[0])
    for round_, metrics, receipts in observer.rounds:
        assert metrics["aggregate_members"] == 3 and metrics["noise_distributed"] == 1
        assert len(vectors[round_]) == 3
        assert all(v.shape == (noise.dim,) and v.min() >= 0 and v.max() < dn.MODULUS for v in vectors[round_])
        summed = sum(vectors[round_])
        expected = step(globals_[round_], summed)
        following = globals_.get(round_ + 1)
        if following is not None:
            np.testing.assert_array_equal(following, expected)
        # the aggregate's noise is calibrated from the study's epsilon 1; each hospital's decision
        # count (epsilon 0.1) comes on top (federated.client_app.training_epsilon): 1.1 per patient
        assert metrics["epsilon_central_skellam"] <= 1.0 + 1e-9
        assert metrics["epsilon_max"] <= 1.0 + DEFAULT_DECISION_EPSILON + 1e-9
        assert metrics["epsilon_local"] > metrics["epsilon_central_skellam"]
        assert all(r.epsilon_total <= 1.0 + DEFAULT_DECISION_EPSILON + 1e-9 for r in receipts)
        # the noisy patient count the server divides by is close to the hospitals' patients
        count = dn.centred(summed)[-1] / noise.scale / (dn.COUNT_SHARE * noise.clip)
        assert 200 < count < 700
    # what the server pulled: no float array, and masked vectors unlike any hospital's own
    for reply in grid.pulled:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    masked = [_masked(r) for r in grid.pulled if _has(r, "masked_params")]
    assert len(masked) == 9 and all(m.shape == (noise.dim,) for m in masked)
    clear = [v for vs in vectors.values() for v in vs]
    assert not any(np.array_equal(m % dn.MODULUS, v) for m in masked for v in clear)


def test_distributed_noise_needs_secure_aggregation_in_the_spec() -> None:
    with pytest.raises(StudySpecError, match=r"noise: .*needs secure aggregation"):
        StudySpec.from_json({**demo_spec("x", min_hospitals=3).to_json(), "noise": "distributed",
                             "secure_aggregation": False})
    with pytest.raises(StudySpecError, match="secure_aggregation: needs min_hospitals >= 3"):
        StudySpec.from_json({**demo_spec("x", min_hospitals=2).to_json(), "noise": "distributed",
                             "secure_aggregation": True})
    with pytest.raises(dn.DistributedNoiseError, match="at least 2 honest"):
        dn.plan_noise(epsilon=1.0, delta=1e-5, rounds=3, clip=1.0, n_weights=10, honest=1)
