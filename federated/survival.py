"""Cox proportional hazards under DP-SGD: the case-cohort partial likelihood with a PUBLIC subcohort.

Why not the ordinary partial likelihood, nor risk sets within a sampled batch. Patient i's term of
the Cox partial likelihood, delta_i * (eta_i - log sum_{j in R(t_i)} exp(eta_j)), depends on every
patient j still at risk at t_i. DP-SGD's guarantee needs each patient's influence on a step's
gradient sum bounded by the clip norm C: adding or removing one patient may change the sum by at
most C. With risk sets drawn from the private patients (all of them, or those in the Poisson
batch), adding patient k changes k's own clipped term AND the weighted risk-set mean inside the
term of every sampled event i with t_i <= t_k; each of those shifts is up to 2C after clipping
and there can be as many as there are events in the batch, so the sensitivity is not C (it is
unbounded as the batch grows). Accounting for such a step with noise sized for C, as Opacus
would, reports an epsilon the mechanism does not meet.

What is done instead (Prentice's case-cohort design, Prentice 1986, Biometrika 73:1-11). The
risk set of patient i is the members of a fixed PUBLIC subcohort still at risk at t_i, plus i:

    l_i(beta) = delta_i * ( log( exp(eta_i) + sum_{j in S, t_j >= t_i} exp(eta_j) ) - eta_i ),
    eta = x beta,  S = the public reference sample's "pretrain" half (federated.clinical_data).

l_i depends on patient i and public data only, so it is an ordinary per-patient loss: one patient
changes the clipped gradient sum of a step by at most C, and patient-level Poisson sampling,
clipping and Gaussian noise (federated.dp) give exactly the subsampled Gaussian mechanism the
accountant assumes. Censored patients (delta_i = 0) have a zero gradient; they still count in the
sample rate (the accountant's unit is every patient). The case-cohort estimating equation
sum_i delta_i (x_i - m_S(t_i)) with m_S the exp(eta)-weighted mean of the at-risk subcohort is
unbiased for the full-cohort score when the subcohort is a random sample of the same population,
so the estimator is consistent for the Cox coefficients (Prentice 1986; Self & Prentice 1988).

Gradient, in closed form (the "fast" engine; the "opacus" engine computes the same per-patient
gradients with Opacus hooks, and a test checks they agree):
    grad l_i = delta_i * ( pi_ii x_i + sum_j pi_ij x_j - x_i ),  pi_ij = exp(eta_j) / denominator_i.

Metrics. A hospital's charged and noised release (`federated.evaluation`) holds a per-patient score
in [0, 1], the patient's PUBLIC-ANCHORED concordance (the share of comparable pairs (i, j in the
public "eval" half) that the model orders correctly, ties 1/2, 0.5 when a patient has no comparable
pair), and the sufficient statistics of Harrell's concordance and the integrated Brier score on the
hospital's hold-out patients (`federated.eval_stats`). The server scores each round's model exactly
on the public "eval" half: Harrell's concordance and the integrated Brier score (scikit-survival),
with the baseline survival from Breslow's estimator on the subcohort.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from federated.clinical_data import SurvivalSet

if TYPE_CHECKING:  # the torch twins below import it; a hospital's process trains and scores with
    # NumPy (`federated.numpy_dp`, `anchored_concordance`) and never loads it
    import torch


class SurvivalError(ValueError):
    """Survival inputs are not acceptable (time, event, reference)."""


def check_outcome(time: np.ndarray, event: np.ndarray) -> None:
    """Times finite and non-negative, events 0 or 1, same length; names the fault."""
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event, dtype=np.float64).reshape(-1)
    if t.shape != e.shape:
        raise SurvivalError(f"event: {e.shape[0]} events for {t.shape[0]} times")
    if not np.all(np.isfinite(t)):
        raise SurvivalError("time: holds NaN or infinite values")
    if np.any(t < 0):
        raise SurvivalError(f"time: {int(np.sum(t < 0))} negative value(s)")
    if not np.all((e == 0) | (e == 1)):
        raise SurvivalError("event: must be 0 (censored) or 1 (event)")


@dataclass(frozen=True)
class Subcohort:
    """The public subcohort sorted by time, as tensors: the risk-set reference of every patient."""

    x: torch.Tensor  # [m, d], ascending time
    time: torch.Tensor  # [m]

    @classmethod
    def from_set(cls, ref: SurvivalSet) -> Subcohort:
        import torch

        if len(ref) == 0:
            raise SurvivalError("reference: the public subcohort is empty")
        order = np.argsort(ref.time, kind="stable")
        return cls(torch.from_numpy(np.ascontiguousarray(ref.x[order], dtype=np.float32)),
                   torch.from_numpy(np.ascontiguousarray(ref.time[order], dtype=np.float64)))


def _risk_terms(beta: torch.Tensor, sub: Subcohort, x: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each patient: log-denominator, weighted risk-set mean (incl. the patient), eta."""
    import torch

    eta = x @ beta
    eta_s = sub.x @ beta
    c = torch.maximum(eta_s.max(), eta.max()).detach()
    w = torch.exp(eta_s - c)  # [m]
    # suffix sums: index k holds the sum over subcohort members k.. (time ascending)
    sw = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0])
    swx = torch.flip(torch.cumsum(torch.flip(w[:, None] * sub.x, [0]), 0), [0])
    sw = torch.cat([sw, sw.new_zeros(1)])
    swx = torch.cat([swx, swx.new_zeros(1, swx.shape[1])])
    # first subcohort member with t_j >= t
    first = torch.searchsorted(sub.time, t.to(torch.float64).contiguous(), side="left")
    own = torch.exp(eta - c)
    denom = own + sw[first]
    mean = (own[:, None] * x + swx[first]) / denom[:, None]
    return torch.log(denom) + c, mean, eta


def per_patient_grads(beta: torch.Tensor, sub: Subcohort, x: torch.Tensor, t: torch.Tensor,
                      e: torch.Tensor) -> torch.Tensor:
    """Gradient of each patient's case-cohort loss l_i (module docstring), shape [batch, d]."""
    _logden, mean, _eta = _risk_terms(beta, sub, x, t)
    return e[:, None] * (mean - x)


def per_patient_loss(beta: torch.Tensor, sub: Subcohort, x: torch.Tensor, t: torch.Tensor,
                     e: torch.Tensor) -> torch.Tensor:
    """Each patient's case-cohort loss l_i, shape [batch]."""
    logden, _mean, eta = _risk_terms(beta, sub, x, t)
    return e * (logden - eta)


def loss_from_outputs(eta: torch.Tensor, eta_sub: torch.Tensor, t: torch.Tensor, e: torch.Tensor,
                      sub_time: torch.Tensor) -> torch.Tensor:
    """l_i from model outputs for patient i (`eta`, [batch]) and for every subcohort member as
    seen by that patient (`eta_sub`, [batch, m]): lets Opacus's hooks compute per-patient
    gradients of the same loss (the model sees input [batch, 1 + m, d])."""
    import torch

    at_risk = sub_time[None, :] >= t[:, None].to(sub_time.dtype)
    masked = torch.where(at_risk, eta_sub, torch.full_like(eta_sub, -torch.inf))
    logden = torch.logsumexp(torch.cat([eta[:, None], masked], 1), 1)
    return e * (logden - eta)


# -- metrics ------------------------------------------------------------------------------------

def anchored_concordance(eta: np.ndarray, time: np.ndarray, event: np.ndarray,
                         ref_eta: np.ndarray, ref: SurvivalSet) -> np.ndarray:
    """Each patient's concordance against the public reference (module docstring), in [0, 1].

    Pair (i, j) is comparable when the earlier time is an event: i's event before j's time, or
    j's event before i's time. Concordant when the earlier one has the higher risk score."""
    t = np.asarray(time, dtype=np.float64)[:, None]
    e = np.asarray(event, dtype=np.float64)[:, None] > 0
    tj, ej = ref.time[None, :], ref.event[None, :] > 0
    eta_i, eta_j = np.asarray(eta, dtype=np.float64)[:, None], np.asarray(ref_eta, dtype=np.float64)[None, :]
    i_first = e & (t < tj)
    j_first = ej & (tj < t)
    win = np.where(eta_i > eta_j, 1.0, np.where(eta_i == eta_j, 0.5, 0.0))
    score = (i_first * win + j_first * (1.0 - win)).sum(1)
    pairs = (i_first | j_first).sum(1)
    return np.where(pairs > 0, score / np.maximum(pairs, 1), 0.5)


def baseline_survival(eta_sub: np.ndarray, sub: SurvivalSet) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's baseline survival S0 on the subcohort: (event times, S0 at them)."""
    from federated.survival_estimators import breslow_baseline_survival

    times, s0 = breslow_baseline_survival(eta_sub, sub.event.astype(bool), sub.time)
    return np.asarray(times, dtype=np.float64), np.asarray(s0, dtype=np.float64)


def exact_metrics(eta: np.ndarray, test: SurvivalSet, eta_sub: np.ndarray, sub: SurvivalSet
                  ) -> dict[str, float]:
    """Harrell's concordance and the integrated Brier score (IPCW; times between the 10th and
    80th percentile of the test set's event times) of risk scores `eta` on `test`, with the
    baseline survival from `sub`. For PUBLIC data, or a pooled centralized baseline only."""
    from sksurv.metrics import concordance_index_censored, integrated_brier_score
    from sksurv.util import Surv

    out: dict[str, float] = {"num_examples": float(len(test))}
    ev = test.event.astype(bool)
    if ev.sum() == 0 or len(test) < 2:
        return out
    out["concordance"] = float(concordance_index_censored(ev, test.time, np.asarray(eta, np.float64))[0])
    times_s0, s0 = baseline_survival(eta_sub, sub)
    lo, hi = np.percentile(test.time[ev], [10, 80])
    grid = np.unique(np.clip(np.linspace(lo, hi, 20), times_s0.min(), times_s0.max()))
    if grid.shape[0] >= 2:
        base = np.interp(grid, times_s0, s0)
        surv = base[None, :] ** np.exp(np.asarray(eta, np.float64))[:, None]
        y_train = Surv.from_arrays(sub.event.astype(bool), sub.time)
        y_test = Surv.from_arrays(ev, test.time)
        # a grid outside the censoring distribution's support gives no IBS
        with contextlib.suppress(ValueError):
            out["ibs"] = float(integrated_brier_score(y_train, y_test, surv, grid))
    return out
