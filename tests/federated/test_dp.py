"""DP-SGD: the fast engine is Opacus's mechanism; no-record and tiny hospitals; utility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from federated.accounting import epsilon_spent, plan_study
from federated.data import load_federated, load_hospital, pooled
from federated.dp import (
    DPTrainingError,
    initial_state,
    train_nonprivate,
)
from federated.dp_round import train_round
from federated.templates import get_template
from federated.weights import WeightsError, fedavg, unpack
from tests.federated.torch_reference import clipped_grad_sum

DELTA = 1e-5




def _batch(n: int = 17, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (torch.rand(n, generator=g) < 0.5).float()
    return x, y


@pytest.mark.parametrize("name", ["logistic_regression", "mlp_classifier", "mlp_regressor", "gelu"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_clipped_sum_equals_opacus_per_sample_clipping(name: str, clip: float) -> None:
    """Both of our paths (closed-form backprop for tanh/relu templates, autograd for other
    element-wise activations such as GELU) against Opacus's per-sample gradients."""
    tpl = get_template("mlp_classifier" if name == "gelu" else name)
    x, y = _batch()
    model = tpl.build(6, seed=3)
    if name == "gelu":
        model[1] = torch.nn.GELU()
    if not tpl.hidden:  # a zero model has identical gradient directions; make it generic
        with torch.no_grad():
            model[0].weight.normal_(generator=torch.Generator().manual_seed(1))
    ours, norms = clipped_grad_sum(model, tpl, x, y, clip)

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=None, loss_reduction="sum")
    tpl.per_sample_loss(gsm(x), y).sum().backward()
    opacus_norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1)
                                for p in gsm.parameters()], dim=1).norm(dim=1)
    opt.pre_step()
    for mine, p in zip(ours, gsm.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norms, opacus_norms, rtol=1e-4, atol=1e-6)
    gsm._close()


@pytest.mark.parametrize("name", ["logistic_regression", "mlp_classifier"])
def test_fast_engine_equals_opacus_engine_step_for_step(name: str) -> None:
    """Same seed -> same Poisson batches and same noise draws -> same weights: the fast engine
    implements exactly the mechanism Opacus implements (and the accountant accounts for)."""
    tpl = get_template(name)
    part = load_hospital("breast_cancer", "hospital-b").train()
    state = initial_state(tpl, part.n_features, seed=4)
    kwargs = {"noise_multiplier": 1.3, "sample_rate": 0.2, "local_steps": 6, "clip": 0.7,
              "lr": 0.3, "delta": DELTA, "seed": 99}
    fast = train_round(tpl, state, part.x, part.y, engine="fast", **kwargs)
    slow = train_round(tpl, state, part.x, part.y, engine="opacus", **kwargs)
    assert fast.status == slow.status == "trained"
    assert not np.array_equal(fast.state, state)
    np.testing.assert_allclose(fast.state, slow.state, rtol=1e-4, atol=1e-5)
    assert fast.epsilon == slow.epsilon


def test_without_noise_or_clipping_full_batch_is_gradient_descent() -> None:
    tpl = get_template("logistic_regression")
    x, y = _batch(n=20, d=4)
    state = initial_state(tpl, 4)
    res = train_round(tpl, state, x.numpy(), y.numpy(), noise_multiplier=0.0, sample_rate=1.0,
                      local_steps=1, clip=1e6, lr=0.5, delta=DELTA, seed=0)
    model = tpl.build(4)
    tpl.loss(model(x), y).backward()
    expected = np.concatenate([(-0.5 * p.grad).reshape(-1).numpy() for p in model.parameters()])
    np.testing.assert_allclose(res.state, expected, rtol=1e-5, atol=1e-7)


def test_noise_has_the_calibrated_scale() -> None:
    """With no records' influence (clip tiny) the update is noise/expected batch: check its std."""
    tpl = get_template("logistic_regression")
    x = np.zeros((400, 300), dtype=np.float32)
    y = np.zeros(400, dtype=np.float32)
    res = train_round(tpl, initial_state(tpl, 300), x, y, noise_multiplier=2.0, sample_rate=0.25,
                      local_steps=1, clip=1e-9 + 0.5, lr=1.0, delta=DELTA, seed=3)
    # x = 0: only the bias gets data gradient; weights move by pure noise: std = 2*0.5/(0.25*400)
    assert np.std(res.state[:300]) == pytest.approx(2.0 * 0.5 / 100, rel=0.15)


def test_result_reports_cumulative_epsilon() -> None:
    tpl = get_template("logistic_regression")
    part = load_hospital("breast_cancer", "hospital-a").train()
    res = train_round(tpl, initial_state(tpl, 30), part.x, part.y, noise_multiplier=3.0,
                      sample_rate=0.3, local_steps=5, clip=1.0, lr=0.1, delta=DELTA,
                      prior_steps=10, seed=1)
    assert res.steps == 5 and res.num_examples == len(part)
    assert res.epsilon == epsilon_spent(3.0, 0.3, 15, DELTA)
    assert set(res.metrics) >= {"num_examples", "steps", "epsilon"}
    assert "loss" not in res.metrics  # no non-private statistic of the records leaves


def test_no_eligible_records_is_an_outcome_not_a_crash() -> None:
    tpl = get_template("mlp_classifier")
    state = initial_state(tpl, 30, seed=2)
    empty = np.zeros((0, 30), dtype=np.float32)
    res = train_round(tpl, state, empty, np.zeros(0), noise_multiplier=1.0, sample_rate=0.5,
                      local_steps=3, clip=1.0, lr=0.1, delta=DELTA, prior_steps=6, seed=0)
    assert res.status == "no_eligible_records" and not res.trained
    assert res.num_examples == 0 and res.steps == 0
    assert res.reason is not None and "no eligible records" in res.reason
    assert np.array_equal(res.state, state) and res.state is not state
    assert res.epsilon == epsilon_spent(1.0, 0.5, 6, DELTA)  # nothing spent this round


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_with_a_plan_size_the_update_scale_and_status_follow_the_plan_not_the_records(engine: str) -> None:
    """With `plan_patients` (the size a study's plan took from the noised decision count) the
    noised sum is divided by q x plan_patients whatever the real number of patients, and an
    empty hospital still takes its steps (noise alone): its update has the same law as any other
    hospital's with no signal, so neither its scale nor a "no data" status shows a count."""
    tpl = get_template("logistic_regression")
    state = initial_state(tpl, 30)
    empty = train_round(tpl, state, np.zeros((0, 30), np.float32), np.zeros(0), noise_multiplier=2.0,
                        sample_rate=0.25, local_steps=1, clip=0.5, lr=1.0, delta=DELTA, seed=3,
                        engine=engine, plan_patients=400)
    assert empty.status == "trained" and empty.num_examples == 0 and empty.steps == 1
    # one step of noise only: std = sigma * clip / (q * plan) = 2 * 0.5 / 100, as for 400 patients
    assert np.std(empty.state - state) == pytest.approx(2.0 * 0.5 / 100, rel=0.15)
    assert empty.epsilon == epsilon_spent(2.0, 0.25, 1, DELTA)
    with pytest.raises(DPTrainingError, match="plan_patients"):
        train_round(tpl, state, np.zeros((0, 30), np.float32), np.zeros(0), noise_multiplier=2.0,
                    sample_rate=0.25, local_steps=1, clip=0.5, lr=1.0, delta=DELTA, plan_patients=0)


@pytest.mark.parametrize("engine", ["fast", "opacus"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_datasets_and_empty_poisson_batches(engine: str, n: int) -> None:
    tpl = get_template("mlp_classifier")
    part = load_hospital("breast_cancer", "hospital-a").train()
    state = initial_state(tpl, 30)
    # sample rate 0.05 with 1-2 records: most batches are empty; each still takes a noisy step
    res = train_round(tpl, state, part.x[:n], part.y[:n], noise_multiplier=1.0, sample_rate=0.05,
                      local_steps=20, clip=1.0, lr=0.1, delta=DELTA, seed=0, engine=engine)
    assert res.status == "trained" and res.num_examples == n
    assert np.all(np.isfinite(res.state)) and not np.array_equal(res.state, state)
    # without noise, all-empty batches leave the model unchanged
    quiet = train_round(tpl, state, part.x[:1], part.y[:1], noise_multiplier=0.0,
                        sample_rate=1e-9, local_steps=5, clip=1.0, lr=0.1, delta=DELTA, seed=0,
                        engine=engine)
    assert np.array_equal(quiet.state, state)


def test_only_the_given_records_influence_training() -> None:
    """Gating happens before training: records outside the consented set cannot matter."""
    tpl = get_template("logistic_regression")
    part = load_hospital("breast_cancer", "hospital-a").train()
    consented = part.select_records(part.pseudonyms[::2])
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.3, "local_steps": 5, "clip": 1.0,
              "lr": 0.5, "delta": DELTA, "seed": 11}
    state = initial_state(tpl, 30)
    a = train_round(tpl, state, consented.x, consented.y, **kwargs)
    assert a.num_examples == len(consented) == (len(part) + 1) // 2
    # changing every non-consented record changes nothing
    tampered = part.x.copy()
    tampered[1::2] = -tampered[1::2]
    again = type(part)(**{**part.__dict__, "x": tampered}).select_records(consented.pseudonyms)
    b = train_round(tpl, state, again.x, again.y, **kwargs)
    assert np.array_equal(a.state, b.state)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"noise_multiplier": -1.0}, DPTrainingError, "noise_multiplier"),
    ({"sample_rate": 0.0}, DPTrainingError, "sample_rate"),
    ({"local_steps": 0}, DPTrainingError, "local_steps"),
    ({"clip": 0.0}, DPTrainingError, "clip"),
    ({"lr": -0.1}, DPTrainingError, "lr"),
    ({"engine": "jax"}, DPTrainingError, "engine"),
    ({"y": np.full(4, 2.0)}, DPTrainingError, "y: a binary template"),
    ({"x": np.full((4, 3), np.nan)}, DPTrainingError, "NaN"),
    ({"x": np.zeros(4)}, DPTrainingError, "x: must be 2-D"),
    ({"y": np.zeros(3)}, DPTrainingError, "y: 3 targets for 4 records"),
    ({"state": np.zeros(7, dtype=np.float32)}, WeightsError, "expected 4 values"),
])
def test_bad_training_input_names_the_field(kwargs: dict, exc: type, match: str) -> None:
    args = {"template": "logistic_regression", "state": np.zeros(4, dtype=np.float32),
            "x": np.zeros((4, 3), dtype=np.float32), "y": np.array([0, 1, 0, 1], dtype=np.float32),
            "noise_multiplier": 1.0, "sample_rate": 0.5, "local_steps": 2, "clip": 1.0,
            "lr": 0.1, "delta": DELTA, "seed": 0} | kwargs
    with pytest.raises(exc, match=match):
        train_round(**args)


def _federate(name: str, dataset: str, epsilon: float, rounds: int) -> tuple[dict, dict]:
    tpl = get_template(name)
    parts = load_federated(dataset)
    hospitals = [p.train() for p in parts]
    test = pooled([p.test() for p in parts])
    d = tpl.defaults
    plans = [plan_study(epsilon, DELTA, rounds=rounds, n_patients=len(h), batch_size=d.batch_size,
                        steps_per_round=d.local_steps) for h in hospitals]
    state = initial_state(tpl, test.n_features)
    for r in range(rounds):
        res = [train_round(tpl, state, h.x, h.y, noise_multiplier=p.noise_multiplier,
                           sample_rate=p.sample_rate, local_steps=p.steps_per_round, clip=d.clip,
                           lr=d.lr, momentum=d.momentum, delta=DELTA,
                           prior_steps=r * p.steps_per_round, seed=100 * r + i)
               for i, (h, p) in enumerate(zip(hospitals, plans, strict=True))]
        assert all(x.epsilon <= epsilon for x in res)
        state = fedavg([x.state for x in res], [x.num_examples for x in res])
    model = unpack(tpl.build(test.n_features), state)
    train_y = pooled(hospitals).y
    return (tpl.evaluate(model, test.x, test.y, test.target_scale),
            tpl.trivial_baseline(train_y, test.x, test.y, test.target_scale))


def test_dp_federated_classifier_beats_trivial_baseline() -> None:
    got, base = _federate("logistic_regression", "breast_cancer", 3.0, rounds=3)
    assert got["accuracy"] > base["accuracy"] + 0.15
    assert got["auroc"] > 0.9


def test_dp_federated_regressor_beats_trivial_baseline() -> None:
    got, base = _federate("linear_regression", "diabetes", 8.0, rounds=3)
    assert got["mae"] < base["mae"] * 0.9


def test_nonprivate_baseline_trains() -> None:
    tpl = get_template("mlp_classifier")
    parts = load_federated("breast_cancer")
    train, test = pooled([p.train() for p in parts]), pooled([p.test() for p in parts])
    state = train_nonprivate(tpl, initial_state(tpl, 30), train.x, train.y, batch_size=32,
                             steps=300, lr=0.1, momentum=0.9, seed=0)
    assert tpl.evaluate(unpack(tpl.build(30), state), test.x, test.y)["accuracy"] > 0.93
