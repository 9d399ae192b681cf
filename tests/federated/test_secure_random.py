"""Secure noise: the distribution is the intended Gaussian, it comes from ChaCha20 (never torch's
generators), and DP training draws nothing from torch's random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from federated.data import load_hospital
from federated.dp import initial_state
from federated.dp_round import train_round
from federated.secure_random import SecureRandom

DELTA = 1e-5




@pytest.mark.parametrize("std", [0.3, 1.0, 7.5])
def test_noise_is_the_intended_gaussian(std: float) -> None:
    """KS test against N(0, std^2), the variance within its sampling error, mean 0, and a
    chi-square bound on the tails (the four-term sum must not thin or fatten them)."""
    x = SecureRandom(11).gaussian(200_000, std)
    assert stats.kstest(x / std, "norm").pvalue > 1e-3
    # variance: the sample variance of n normals has relative sd sqrt(2/n) ~ 0.0032
    assert np.var(x) / std**2 == pytest.approx(1.0, abs=5 * np.sqrt(2 / x.size))
    assert abs(np.mean(x)) / std < 5 / np.sqrt(x.size)
    beyond = np.mean(np.abs(x) > 3 * std)
    assert beyond == pytest.approx(2 * stats.norm.sf(3), rel=0.2)


def test_the_four_terms_are_independent_pairs() -> None:
    """With few coordinates too (one, two) the draws are N(0, std^2): the construction never
    sums the two normals of one Box-Muller pair."""
    rng = SecureRandom(3)
    ones = np.concatenate([rng.gaussian(1, 2.0) for _ in range(20_000)])
    twos = np.concatenate([rng.gaussian(2, 2.0) for _ in range(10_000)])
    for sample in (ones, twos):
        assert stats.kstest(sample / 2.0, "norm").pvalue > 1e-3


def test_uniforms_are_uniform_on_the_53_bit_grid() -> None:
    u = SecureRandom(5).uniform(100_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert np.all(u * 2.0**53 == np.floor(u * 2.0**53))  # exact multiples of 2**-53


def test_seeded_streams_repeat_and_unseeded_ones_do_not() -> None:
    a, b = SecureRandom(7), SecureRandom(7)
    assert np.array_equal(a.gaussian(100, 1.0), b.gaussian(100, 1.0))
    assert np.array_equal(a.uniform(10), b.uniform(10))
    assert not np.array_equal(SecureRandom(8).gaussian(100, 1.0), SecureRandom(7).gaussian(100, 1.0))
    assert not np.array_equal(SecureRandom().gaussian(100, 1.0), SecureRandom().gaussian(100, 1.0))
    # sampling draws never shift the noise (separate streams)
    c = SecureRandom(7)
    c.uniform(12345)
    assert np.array_equal(c.gaussian(100, 1.0), SecureRandom(7).gaussian(100, 1.0))
    with pytest.raises(TypeError, match="seed"):
        SecureRandom("7")  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_dp_training_uses_no_torch_generator(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training draws its sampling and noise from SecureRandom only: torch's global generator is
    left exactly as it was, torch's sampling functions are never called, and two runs after the
    same torch.manual_seed still differ (the key comes from os.urandom)."""
    part = load_hospital("breast_cancer", "hospital-a").train()
    state = initial_state("logistic_regression", 30)
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.3, "local_steps": 3, "clip": 1.0, "lr": 0.5,
              "delta": DELTA, "engine": engine}
    torch.manual_seed(0)
    before = torch.get_rng_state()

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("DP training called one of torch's random generators")

    for name in ("normal", "rand", "randn", "randint", "randperm", "bernoulli"):
        monkeypatch.setattr(torch, name, forbidden)
    first = train_round("logistic_regression", state, part.x, part.y, **kwargs)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(0)
    second = train_round("logistic_regression", state, part.x, part.y, **kwargs)  # type: ignore[arg-type]
    assert not np.array_equal(first.state, second.state)


def test_update_noise_has_the_calibrated_scale() -> None:
    """The noise that reaches the weights: with x = 0 the weight update is pure noise,
    std = sigma * clip / expected batch, and Gaussian (KS)."""
    x = np.zeros((400, 300), dtype=np.float32)
    y = np.zeros(400, dtype=np.float32)
    res = train_round("logistic_regression", initial_state("logistic_regression", 300), x, y,
                      noise_multiplier=2.0, sample_rate=0.25, local_steps=1, clip=0.5, lr=1.0,
                      delta=DELTA, seed=3)
    std = 2.0 * 0.5 / 100
    assert np.std(res.state[:300]) == pytest.approx(std, rel=0.15)
    assert stats.kstest(res.state[:300] / std, "norm").pvalue > 1e-3
