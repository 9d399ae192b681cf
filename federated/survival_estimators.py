"""Breslow's baseline survival and the Kaplan-Meier censoring distribution, in numpy.

Why not scikit-survival here (issue "Scale", memory per hospital; docs/benchmarks/scale.md): a
hospital's ClientApp needs both for every survival evaluation (`federated.evaluation`,
`federated.eval_stats`), and importing any part of scikit-survival imports scikit-learn and pandas
with it, which the hospital's Flower process would then hold for its whole life. Both estimators
are a few lines; these follow scikit-survival's (`sksurv.linear_model.coxph.BreslowEstimator`,
`sksurv.nonparametric.CensoringDistributionEstimator`) step by step, in the same order of
floating-point operations, and tests/federated/test_survival_estimators.py checks them against
scikit-survival on the shipped datasets and on ties. The server's exact metrics on public data
(`federated.survival.exact_metrics`) still use scikit-survival.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Counts:
    times: np.ndarray  # the distinct times, ascending
    events: np.ndarray  # events at each
    at_risk: np.ndarray  # patients with time >= it
    censored: np.ndarray  # censored at each


def _counts(event: np.ndarray, time: np.ndarray, order: np.ndarray) -> _Counts:
    """Events, censorings and patients at risk at each distinct time (`order` sorts `time`)."""
    sorted_time = time[order]
    sorted_event = event[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, sorted_time[1:] != sorted_time[:-1]])
    total = np.diff(np.r_[starts, sorted_time.shape[0]])
    events = np.add.reduceat(sorted_event.astype(np.int64), starts) if starts.size else np.zeros(0, np.int64)
    at_risk = sorted_time.shape[0] - np.cumsum(np.r_[0, total])[:-1]
    return _Counts(times=sorted_time[starts], events=events, at_risk=at_risk, censored=total - events)


def _survival_arrays(event: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    event = np.asarray(event)
    time = np.asarray(time, dtype=np.float64)
    if event.ndim != 1 or event.shape != time.shape or event.shape[0] == 0:
        raise ValueError(f"event, time: need two 1-d arrays of the same non-zero length, got "
                         f"{event.shape} and {time.shape}")
    if not np.all(np.isfinite(time)):
        raise ValueError("time: must be finite")
    return event.astype(bool), time


def breslow_baseline_survival(linear_predictor: np.ndarray, event: np.ndarray, time: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's estimate of the baseline survival S0 from risk scores `linear_predictor` (x beta):
    (the distinct times, S0 at each), a right-continuous step function."""
    event, time = _survival_arrays(event, time)
    eta = np.asarray(linear_predictor, dtype=np.float64)
    if eta.shape != time.shape:
        raise ValueError(f"linear_predictor: need one per patient ({time.shape[0]}), got {eta.shape}")
    risk = np.exp(eta)
    order = np.argsort(time, kind="mergesort")
    risk = risk[order]
    counts = _counts(event, time, order)
    # the risk set's summed score at each distinct time: the previous one less the patients whose
    # time was the previous time (subtracted group by group, as scikit-survival does)
    divisor = np.empty(counts.at_risk.shape, dtype=float)
    value = np.sum(risk)
    divisor[0] = value
    k = 0
    for i in range(1, len(counts.at_risk)):
        d = int(counts.at_risk[i - 1] - counts.at_risk[i])
        value -= risk[k:k + d].sum()
        k += d
        divisor[i] = value
    cumulative_hazard = np.cumsum(counts.events / divisor)
    return counts.times, np.exp(-cumulative_hazard)


@dataclass(frozen=True)
class CensoringDistribution:
    """The Kaplan-Meier estimate of the censoring survival G(t) = P(C > t) (censorings are the
    "events"; a time with both counts its events as still at risk), as the inverse probability of
    censoring weights of the integrated Brier score use it."""

    times: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def fit(cls, event: np.ndarray, time: np.ndarray) -> CensoringDistribution:
        event, time = _survival_arrays(event, time)
        if event.all():  # never censored: G is 1 everywhere observed
            unique = np.unique(time)
            return cls(times=unique, probabilities=np.ones(unique.shape[0]))
        counts = _counts(event, time, np.argsort(time, kind="mergesort"))
        at_risk = counts.at_risk - counts.events
        ratio = np.divide(counts.censored, at_risk, out=np.zeros(counts.times.shape[0], dtype=float),
                          where=counts.censored != 0)
        return cls(times=np.r_[-np.inf, counts.times], probabilities=np.r_[1.0, np.cumprod(1.0 - ratio)])

    def predict(self, time: np.ndarray) -> np.ndarray:
        """G at each of `time`: the step at or before it; 0 past the last time when G reached 0
        there. Raises ValueError for a time past the last observed one while G is still above 0
        (Kaplan-Meier says nothing there)."""
        time = np.asarray(time, dtype=np.float64)
        extends = time > self.times[-1]
        if self.probabilities[-1] > 0 and extends.any():
            raise ValueError(f"time: must not exceed the last observed time {self.times[-1]}")
        out = np.empty(time.shape, dtype=float)
        out[extends] = 0.0
        valid = ~extends
        inside = time[valid]
        idx = np.searchsorted(self.times, inside)
        nearest = self.times[np.minimum(idx, self.times.shape[0] - 1)]
        exact = np.absolute(nearest - inside) < np.finfo(float).eps
        idx[~exact] -= 1
        out[valid] = self.probabilities[idx]
        return out
