"""The "fast" DP-SGD engine in NumPy: what a hospital runs, without torch.

The mechanism is `federated.dp`'s, unchanged (its module docstring): patient-level Poisson
sampling and Gaussian noise from `federated.secure_random.SecureRandom`, consumed in the same
order (each step: the batch, then one noise draw for every parameter), per-record clipping to
`clip`, the noised sum divided by the expected batch, optional momentum, an SGD step. Only the
arithmetic moved from torch to NumPy: for a Linear layer the per-record gradient is the outer
product g_i a_i^T of the loss gradient at its output and its input, so its squared norm is
|g_i|^2 (|a_i|^2 + 1) and the clipped sum is (c * G)^T A ("ghost clipping"); for the Cox
template the per-patient gradient is the closed form of `federated.survival`. Tests check that
this engine and the torch one give the same weights step for step for every template
(tests/federated/test_numpy_dp.py); the accounting does not depend on the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from federated.clinical_data import SurvivalSet
from federated.numpy_mlp import NumpyMLP
from federated.secure_random import SecureRandom

if TYPE_CHECKING:
    from federated.dp_types import PatientIndex, StepTerms

#: as Opacus (and `federated.dp`): clip factor = clip / (norm + 1e-6), capped at 1
NORM_EPS = 1e-6


def step_noise(rng: SecureRandom, params: Sequence[np.ndarray], std: float) -> list[np.ndarray]:
    """One step's Gaussian noise for every parameter, in order, in ONE draw (as
    `federated.dp.step_noise`, so both engines consume the generator identically)."""
    sizes = [int(p.size) for p in params]
    flat = rng.gaussian(sum(sizes), std).astype(np.float32)
    out: list[np.ndarray] = []
    offset = 0
    for p, n in zip(params, sizes, strict=True):
        out.append(flat[offset:offset + n].reshape(p.shape))
        offset += n
    return out


def clipped_grad_sum(model: NumpyMLP, task: str, xb: np.ndarray, yb: np.ndarray,
                     clip: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Sum over the batch of per-record gradients each clipped to `clip` (one array per
    parameter, in `model.params()` order) and the per-record norms before clipping."""
    acts, grads = model.backprop(task, xb, yb)
    sq = np.zeros(xb.shape[0], dtype=np.float32)
    for a, g, b in zip(acts, grads, model.biases, strict=True):
        sq += (g * g).sum(1) * ((a * a).sum(1) + (1.0 if b is not None else 0.0))
    norms = np.sqrt(sq)
    factor = np.minimum(clip / (norms + NORM_EPS), 1.0).astype(np.float32)
    result: list[np.ndarray] = []
    for a, g, b in zip(acts, grads, model.biases, strict=True):
        gs = g * factor[:, None]
        result.append(gs.T @ a)
        if b is not None:
            result.append(gs.sum(0))
    return result, norms


def apply_step(params: Sequence[np.ndarray], summed: Sequence[np.ndarray],
               noise: Sequence[np.ndarray] | None, *, expected_batch: float, lr: float, momentum: float,
               bufs: list[np.ndarray | None]) -> None:
    """Noised sum / expected batch, optional momentum, SGD step, in place (`federated.dp._apply`)."""
    for i, (p, s) in enumerate(zip(params, summed, strict=True)):
        g = s if noise is None else s + noise[i]
        g = g / np.float32(expected_batch)
        if momentum > 0:
            buf = bufs[i]
            if buf is None:
                buf = g.copy()
            else:
                buf *= np.float32(momentum)
                buf += g
            bufs[i] = buf
            g = buf
        np.subtract(p, np.float32(lr) * g, out=p)


def run(model: NumpyMLP, task: str, x: np.ndarray, y: np.ndarray, *, subcohort: SurvivalSet | None,
        index: PatientIndex, rng: SecureRandom, terms: StepTerms) -> None:
    """`terms.steps` DP-SGD steps on `model` in place (the mechanism of its torch twins,
    `tests/federated/torch_reference.run_fast` and `federated.dp.run_cox`). Survival: `y` is
    [records, 2] (time, event) and `subcohort` the public subcohort."""
    params = model.params()
    bufs: list[np.ndarray | None] = [None] * len(params)
    cohort = None
    if task == "survival":
        if subcohort is None:
            raise ValueError("subcohort: a survival template needs the public subcohort")
        cohort = CoxSubcohort(subcohort)
    for _ in range(terms.steps):
        idx = index.sample(terms.q, rng)
        summed: list[np.ndarray]
        if idx.shape[0] == 0:
            summed = [np.zeros_like(p) for p in params]
        elif cohort is not None:
            cox, _ = cox_clipped_sum(params[0][0], cohort, x[idx], y[idx], clip=terms.clip)
            summed = [cox.reshape(params[0].shape)]
        else:
            summed, _ = clipped_grad_sum(model, task, x[idx], y[idx], terms.clip)
        noise = step_noise(rng, params, terms.sigma * terms.clip) if terms.sigma > 0 else None
        apply_step(params, summed, noise, expected_batch=terms.expected_batch, lr=terms.lr,
                   momentum=terms.momentum, bufs=bufs)


class CoxSubcohort:
    """The public subcohort sorted by time (x float32, time float64): every patient's risk-set
    reference (`federated.survival.Subcohort`'s NumPy twin)."""

    def __init__(self, ref: SurvivalSet) -> None:
        from federated.survival import SurvivalError

        if len(ref) == 0:
            raise SurvivalError("reference: the public subcohort is empty")
        order = np.argsort(ref.time, kind="stable")
        self.x = np.ascontiguousarray(ref.x[order], dtype=np.float32)
        self.time = np.ascontiguousarray(ref.time[order], dtype=np.float64)


def cox_per_patient_grads(beta: np.ndarray, sub: CoxSubcohort, x: np.ndarray, t: np.ndarray,
                          e: np.ndarray) -> np.ndarray:
    """Gradient of each patient's case-cohort loss, [batch, d] (`federated.survival`'s closed
    form: delta_i (pi_ii x_i + sum_j pi_ij x_j - x_i) over the at-risk subcohort)."""
    eta = x @ beta
    eta_s = sub.x @ beta
    c = max(eta_s.max(), eta.max())
    w = np.exp(eta_s - c)
    # suffix sums: index k holds the sum over subcohort members k.. (time ascending), then a 0
    sw = np.concatenate([np.cumsum(w[::-1])[::-1], np.zeros(1, w.dtype)])
    swx = np.concatenate([np.cumsum((w[:, None] * sub.x)[::-1], 0)[::-1],
                          np.zeros((1, sub.x.shape[1]), sub.x.dtype)])
    first = np.searchsorted(sub.time, np.asarray(t, dtype=np.float64), side="left")
    own = np.exp(eta - c)
    denom = own + sw[first]
    mean = (own[:, None] * x + swx[first]) / denom[:, None]
    grads: np.ndarray = e[:, None] * (mean - x)
    return grads


def cox_clipped_sum(beta: np.ndarray, sub: CoxSubcohort, x: np.ndarray, y: np.ndarray, *,
                    clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Sum of per-patient case-cohort gradients each clipped to `clip`, and their norms."""
    grads = cox_per_patient_grads(beta, sub, x, y[:, 0], y[:, 1].astype(x.dtype))
    norms = np.sqrt((grads * grads).sum(1))
    factor = np.minimum(clip / (norms + NORM_EPS), 1.0).astype(grads.dtype)
    return (grads * factor[:, None]).sum(0), norms
