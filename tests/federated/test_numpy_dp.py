"""The NumPy "fast" engine (`federated.numpy_dp`, what a hospital runs) against the torch one
(`tests.federated.torch_reference`, and `federated.dp.run_cox` for survival): from the same
weights, with the same seed (so the same batches and the same noise), every template ends with
the same weights after several steps, and the round's privacy accounting is the same (the
mechanism did not change, only the arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated import numpy_dp
from federated.accounting import epsilon_spent
from federated.clinical_data import SurvivalSet
from federated.dp import run_cox
from federated.dp_round import DPTrainingError, PatientIndex, train_round
from federated.evaluation import patient_scores, patient_statistics
from federated.numpy_mlp import NumpyMLP
from federated.secure_random import SecureRandom
from federated.survival import Subcohort
from federated.templates import get_template, list_templates
from federated.weights import WeightsError, pack, unpack
from tests.federated.torch_reference import clipped_grad_sum, run_fast

N_FEATURES = 6
N_CLASSES = 3
TERMS = {"noise_multiplier": 0.8, "sample_rate": 0.2, "local_steps": 12, "clip": 0.7, "lr": 0.3,
         "delta": 1e-5}


def _data(task: str, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(n, N_FEATURES)).astype(np.float32)
    score = x @ gen.normal(size=N_FEATURES)
    if task == "binary":
        return x, (score + gen.normal(size=n) > 0).astype(np.float32)
    if task == "regression":
        return x, (score + 0.3 * gen.normal(size=n)).astype(np.float32)
    if task == "multiclass":
        return x, np.digitize(score, [-0.5, 0.5]).astype(np.float32)
    time = gen.exponential(np.exp(-0.5 * score)) + 0.01
    return x, np.column_stack([time, (gen.uniform(size=n) < 0.7).astype(np.float64)])


def _subcohort(seed: int = 1) -> SurvivalSet:
    x, y = _data("survival", 120, seed)
    return SurvivalSet(x=x, time=y[:, 0], event=y[:, 1])


def _start(name: str) -> tuple[np.ndarray, int | None]:
    """Non-zero starting weights (a zero start would hide a wrong layout)."""
    tpl = get_template(name)
    n_classes = N_CLASSES if tpl.task == "multiclass" else None
    size = pack(tpl.build(N_FEATURES, 0, n_classes)).shape[0]
    return (np.random.default_rng(3).normal(size=size) * 0.4).astype(np.float32), n_classes


def _torch_round(name: str, state: np.ndarray, x: np.ndarray, y: np.ndarray, *, momentum: float,
                 patients: np.ndarray | None, seed: int, n_classes: int | None) -> np.ndarray:
    """The same round through the torch twin (`torch_reference.run_fast`, `federated.dp.run_cox`)."""
    tpl = get_template(name)
    model = unpack(tpl.build(N_FEATURES, 0, n_classes), state)
    assert isinstance(model, torch.nn.Sequential)
    index = PatientIndex.build(len(x), patients)
    q = TERMS["sample_rate"]
    common = {"index": index, "rng": SecureRandom(seed), "sigma": TERMS["noise_multiplier"], "q": q,
              "steps": TERMS["local_steps"], "clip": TERMS["clip"], "lr": TERMS["lr"], "momentum": momentum,
              "expected_batch": q * index.n_patients}
    if tpl.task == "survival":
        run_cox(model, torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.float64)),
                Subcohort.from_set(_subcohort()), engine="fast", **common)  # type: ignore[arg-type]
    else:
        run_fast(model, tpl, torch.from_numpy(x), torch.from_numpy(y), **common)  # type: ignore[arg-type]
    return pack(model)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", sorted(list_templates()))
def test_numpy_and_torch_engines_take_the_same_steps(name: str, momentum: float) -> None:
    tpl = get_template(name)
    x, y = _data(tpl.task)
    state, n_classes = _start(name)
    # several records for some patients: patient-level sampling draws from the generator too
    patients = np.array([f"p{i // 2 if i < 60 else i}" for i in range(len(x))])
    ours = train_round(name, state, x, y, momentum=momentum, seed=11, engine="fast", patients=patients,
                       n_classes=n_classes, subcohort=_subcohort() if tpl.task == "survival" else None,
                       **TERMS)  # type: ignore[arg-type]
    theirs = _torch_round(name, state, x, y, momentum=momentum, patients=patients, seed=11,
                          n_classes=n_classes)
    assert ours.trained and ours.state.dtype == np.float32
    moved = np.abs(theirs - state).max()
    assert moved > 1e-2  # the steps did something, so agreeing is not trivial
    np.testing.assert_allclose(ours.state, theirs, rtol=1e-4, atol=1e-5 * max(1.0, float(moved)))
    # a different seed gives other batches and noise: the comparison above can tell them apart
    other = _torch_round(name, state, x, y, momentum=momentum, patients=patients, seed=12,
                         n_classes=n_classes)
    assert np.abs(other - ours.state).max() > 1e-3
    # the accounting is the mechanism's, whichever engine computed the steps
    steps = TERMS["local_steps"]
    assert ours.epsilon == epsilon_spent(TERMS["noise_multiplier"], TERMS["sample_rate"], steps,
                                         TERMS["delta"], "prv")
    assert ours.steps == steps and ours.num_patients == len(set(patients))


@pytest.mark.parametrize("name", sorted(list_templates()))
def test_the_opacus_engine_spends_the_same_epsilon(name: str) -> None:
    """Through `train_round`, "opacus" (torch, imported for it only) and "fast" (NumPy) report
    the same epsilon and end close (Opacus's per-sample gradients are the same algebra)."""
    tpl = get_template(name)
    x, y = _data(tpl.task)
    state, n_classes = _start(name)
    extra = {"n_classes": n_classes, "subcohort": _subcohort() if tpl.task == "survival" else None,
             "prior_steps": 24, "seed": 5}
    fast = train_round(name, state, x, y, engine="fast", **extra, **TERMS)  # type: ignore[arg-type]
    opacus = train_round(name, state, x, y, engine="opacus", **extra, **TERMS)  # type: ignore[arg-type]
    assert fast.epsilon == opacus.epsilon
    np.testing.assert_allclose(fast.state, opacus.state, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n, t in list_templates().items() if t.task != "survival"))
def test_clipped_sums_and_norms_match_torch(name: str) -> None:
    tpl = get_template(name)
    x, y = _data(tpl.task, 64)
    state, n_classes = _start(name)
    model = unpack(tpl.build(N_FEATURES, 0, n_classes), state)
    assert isinstance(model, torch.nn.Sequential)
    theirs, their_norms = clipped_grad_sum(model, tpl, torch.from_numpy(x), torch.from_numpy(y), 0.5)
    ours, our_norms = numpy_dp.clipped_grad_sum(NumpyMLP.from_flat(tpl, N_FEATURES, state, n_classes),
                                                tpl.task, x, y, 0.5)
    np.testing.assert_allclose(our_norms, their_norms.numpy(), rtol=1e-5)
    assert our_norms.max() > 0.5  # some records are clipped
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(list_templates()))
def test_predictions_and_hospital_scores_match_torch(name: str) -> None:
    tpl = get_template(name)
    x, y = _data(tpl.task, 80)
    state, n_classes = _start(name)
    torch_model = unpack(tpl.build(N_FEATURES, 0, n_classes), state)
    ours = NumpyMLP.from_flat(tpl, N_FEATURES, state, n_classes)
    np.testing.assert_allclose(tpl.predict(ours, x), tpl.predict(torch_model, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.flat(), state)
    if tpl.task != "survival":
        patients = [f"p{i % 30}" for i in range(len(x))]
        for fn in (patient_scores, patient_statistics):
            kw = {"classes": n_classes} if fn is patient_statistics else {}
            np.testing.assert_allclose(fn(tpl, ours, x, y, patients, **kw),  # type: ignore[operator]
                                       fn(tpl, torch_model, x, y, patients, **kw),  # type: ignore[operator]
                                       rtol=1e-5, atol=1e-6)


def test_a_state_that_does_not_fit_is_refused_by_name() -> None:
    state, _ = _start("mlp_classifier")
    x, y = _data("binary", 20)
    for bad, reason in ((state[:-1], "expected"), (state.reshape(1, -1), "1-D"),
                        (np.where(np.arange(state.size) == 0, np.nan, state), "NaN")):
        with pytest.raises(WeightsError, match=reason):
            train_round("mlp_classifier", bad, x, y, **TERMS)  # type: ignore[arg-type]
    with pytest.raises(DPTrainingError, match="engine"):
        train_round("mlp_classifier", state, x, y, engine="jax", **TERMS)  # type: ignore[arg-type]
    state_in = state.copy()
    train_round("mlp_classifier", state, x, y, **TERMS)  # type: ignore[arg-type]
    np.testing.assert_array_equal(state, state_in)  # the caller's array is not written
