"""Per-hospital sufficient statistics of the study metrics, for the charged evaluation release.

Harrell's concordance, the integrated Brier score and macro-F1 are not means of a per-patient
score in [0, 1], so the (count, score) release of `federated.evaluation` cannot carry them. What a
hospital releases instead, beside (count, score), is a vector of SUMS over its hold-out patients
made of BLOCKS, each block a per-patient vector of L2 norm at most 1 (a patient's records are
averaged first, so the number of records does not matter):

- survival (`cox_ph`):
  - a histogram of the patients over (risk bin, time bin, event): RISK_BINS x TIME_BINS x 2 cells.
    The bins are PUBLIC: risk cut points are quantiles of the model's risk score on the public
    reference's "eval" half (a function of the weights the server sent and of public data), time
    cut points quantiles of the public reference's event times. A patient adds 1 to one cell;
  - the patient's integrated Brier contribution divided by its public bound (`SurvivalSetup`): the
    integrated Brier score (inverse probability of censoring weights, as scikit-survival) is a mean
    over patients of b_i = trapezoid over the grid of
    [t_i <= t, event] S_i(t)^2 / G(t_i) + [t_i > t] (1 - S_i(t))^2 / G(t), divided by the grid's
    span. G (censoring survival) and the baseline survival come from the public subcohort and the
    grid from the public reference, so b_i depends on patient i and public data only, and
    0 <= b_i <= 1 / G(grid end) =: W because G never increases. The block is b_i / W in [0, 1].
- multi-class (`softmax_regression`): the confusion matrix, classes x classes cells: a record adds
  1 to (true class, predicted class), and the patient's records are averaged (L1 = 1, so L2 <= 1).

Sensitivity. With B blocks beside count and score (each also bounded by 1 per patient), adding or
removing one patient moves the whole released vector by at most sqrt(2 + B) in L2 norm
(`sensitivity`). The Gaussian mechanism with standard deviation sigma x sqrt(2 + B) on every
coordinate is then exactly as private as the (count, score) release with sigma x sqrt(2): the
privacy of a Gaussian mechanism depends only on the ratio of noise to L2 sensitivity, so the
study's evaluation plan (`federated.accounting`, `eval_noise_multiplier`) and the ledger's charge
are unchanged; only the noise per coordinate grows.

From the noised sums the server computes (`metrics_from_stats`), per hospital and for all of them
added up: Harrell's concordance on binned data (a pair is comparable when the earlier patient's
time bin is strictly earlier and it is an event; concordant when its risk bin is higher, half
when equal), the integrated Brier score (b sum x W / count), accuracy and macro-F1 from the
confusion matrix. Binning costs some exactness (pairs within a time bin are dropped, pairs within a
risk bin count half); docs/survival.md gives the measured gap and noise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from federated.survival_estimators import CensoringDistribution

#: Risk-score bins (quantiles of the model's risk on the public reference).
RISK_BINS = 5
#: Time bins (quantiles of the public reference's event times).
TIME_BINS = 3
#: Points of the integrated Brier score's time grid.
GRID_POINTS = 20


def blocks(task: str) -> int:
    """How many per-patient-bounded blocks a `task`'s statistics hold (beside count and score)."""
    return {"survival": 2, "multiclass": 1}.get(task, 0)


def size(task: str, classes: int | None = None) -> int:
    """Length of a `task`'s statistics vector."""
    if task == "survival":
        return RISK_BINS * TIME_BINS * 2 + 1
    if task == "multiclass":
        return int(classes or 0) ** 2
    return 0


@dataclass(frozen=True)
class SurvivalSetup:
    """The public pieces of a survival release: time cut points, the Brier grid, the censoring
    survival G on the grid and the Brier bound W, for the study's columns."""

    columns: tuple[str, ...]
    time_cuts: np.ndarray
    grid: np.ndarray
    censoring_on_grid: np.ndarray
    brier_bound: float

    def censoring(self, t: np.ndarray) -> np.ndarray:
        """G(t) from the public subcohort (Kaplan-Meier of the censoring times)."""
        return _censoring_at(self.columns, np.asarray(t, dtype=np.float64))


@functools.lru_cache(maxsize=16)
def _censoring_model(columns: tuple[str, ...]) -> CensoringDistribution:
    """Kaplan-Meier of the public subcohort's censoring times (numpy, not scikit-survival: this
    runs in every hospital's Flower process, `federated.survival_estimators`)."""
    sub = _reference(columns, "pretrain")
    return CensoringDistribution.fit(sub.event.astype(bool), sub.time)


def _censoring_at(columns: tuple[str, ...], t: np.ndarray) -> np.ndarray:
    return np.asarray(_censoring_model(columns).predict(t), dtype=np.float64)


def _reference(columns: tuple[str, ...], part: str):  # type: ignore[no-untyped-def]
    from federated.clinical_data import public_survival_reference

    ref = public_survival_reference(columns, part)  # type: ignore[arg-type]
    if ref is None:
        raise ValueError(f"columns: no public survival reference holds {list(columns)}")
    return ref


@functools.lru_cache(maxsize=16)
def survival_setup(columns: tuple[str, ...]) -> SurvivalSetup:
    """The public set-up for `columns` (module docstring); the same at every hospital and at the
    server, since it reads public data only."""
    ref, sub = _reference(columns, "eval"), _reference(columns, "pretrain")
    events = ref.time[ref.event > 0]
    time_cuts = np.quantile(events, np.linspace(0, 1, TIME_BINS + 1)[1:-1])
    lo, hi = np.percentile(events, [10, 80])
    sub_events = sub.time[sub.event > 0]
    grid = np.unique(np.clip(np.linspace(lo, hi, GRID_POINTS), sub_events.min(), sub_events.max()))
    g = _censoring_at(columns, grid)
    if grid.shape[0] < 2 or not np.all(g > 0):
        raise ValueError("columns: the public subcohort cannot weight a Brier score on its grid")
    return SurvivalSetup(columns=columns, time_cuts=time_cuts, grid=grid, censoring_on_grid=g,
                         brier_bound=float(1.0 / g.min()))


def patient_brier(eta: np.ndarray, time: np.ndarray, event: np.ndarray, setup: SurvivalSetup,
                  baseline: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Each record's integrated Brier contribution b_i (module docstring), in [0, W]; their mean
    is scikit-survival's `integrated_brier_score` on the same grid and censoring model."""
    grid, g = setup.grid, setup.censoring_on_grid
    times_s0, s0 = baseline
    base = np.interp(grid, times_s0, s0)
    surv = base[None, :] ** np.exp(np.asarray(eta, dtype=np.float64))[:, None]  # [n, grid]
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64) > 0
    case = (t[:, None] <= grid[None, :]) & e[:, None]
    control = t[:, None] > grid[None, :]
    inv_g_case = np.zeros_like(t)
    early = e & (t <= grid[-1])
    if early.any():
        inv_g_case[early] = 1.0 / setup.censoring(t[early])
    per_time = surv ** 2 * case * inv_g_case[:, None] + (1.0 - surv) ** 2 * control / g[None, :]
    return np.trapezoid(per_time, grid, axis=1) / (grid[-1] - grid[0])


def risk_cuts(eta_reference: np.ndarray) -> np.ndarray:
    """Risk-bin cut points: quantiles of the model's risk on the public reference."""
    return np.quantile(np.asarray(eta_reference, dtype=np.float64), np.linspace(0, 1, RISK_BINS + 1)[1:-1])


def survival_rows(eta: np.ndarray, time: np.ndarray, event: np.ndarray, *, eta_reference: np.ndarray,
                  setup: SurvivalSetup, baseline: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One row per RECORD: the one-hot (risk bin, time bin, event) cell, then b / W."""
    r = np.digitize(np.asarray(eta, dtype=np.float64), risk_cuts(eta_reference))
    tb = np.digitize(np.asarray(time, dtype=np.float64), setup.time_cuts)
    ev = (np.asarray(event, dtype=np.float64) > 0).astype(np.int64)
    rows = np.zeros((r.shape[0], size("survival")))
    rows[np.arange(r.shape[0]), (r * TIME_BINS + tb) * 2 + ev] = 1.0
    rows[:, -1] = np.clip(patient_brier(eta, time, event, setup, baseline) / setup.brier_bound, 0.0, 1.0)
    return rows


def multiclass_rows(pred: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    """One row per record: the one-hot (true class, predicted class) cell."""
    truth = np.asarray(y, dtype=np.int64).reshape(-1)
    guess = np.asarray(pred, dtype=np.int64).reshape(-1)
    if np.any((truth < 0) | (truth >= classes)):
        raise ValueError(f"label: classes must be 0..{classes - 1}")
    rows = np.zeros((truth.shape[0], classes * classes))
    rows[np.arange(truth.shape[0]), truth * classes + np.clip(guess, 0, classes - 1)] = 1.0
    return rows


def per_patient(rows: np.ndarray, patients: Sequence[str]) -> np.ndarray:
    """Average each patient's record rows: one row per distinct patient, each block still of L2
    norm at most 1 (a mean of vectors of norm at most 1)."""
    _keys, inverse, counts = np.unique(np.asarray(patients), return_inverse=True, return_counts=True)
    out = np.zeros((counts.shape[0], rows.shape[1]))
    np.add.at(out, inverse, rows)
    return out / counts[:, None]


def binned_concordance(histogram: np.ndarray) -> float | None:
    """Harrell's concordance from a [risk bin, time bin, event] histogram (module docstring);
    None when no pair is comparable (or noise made the denominator non-positive)."""
    h = np.asarray(histogram, dtype=np.float64).reshape(RISK_BINS, TIME_BINS, 2)
    events, everyone = h[:, :, 1], h.sum(2)
    later = np.flip(np.cumsum(np.flip(everyone, 1), 1), 1)  # same or later time bin
    later = np.concatenate([later[:, 1:], np.zeros((RISK_BINS, 1))], 1)  # strictly later
    lower = np.cumsum(later, 0) - later  # lower risk bins
    numerator = float((events * (lower + 0.5 * later)).sum())
    denominator = float((events * later.sum(0)[None, :]).sum())
    if not denominator > 0:
        return None
    return min(1.0, max(0.0, numerator / denominator))


def confusion_metrics(confusion: np.ndarray, classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in the truth or the predictions, as
    scikit-learn) from a noised confusion matrix; negative cells (noise) count as 0."""
    m = np.clip(np.asarray(confusion, dtype=np.float64).reshape(classes, classes), 0.0, None)
    total = m.sum()
    if not total > 0:
        return {}
    tp, truth, guessed = np.diag(m), m.sum(1), m.sum(0)
    present = (truth + guessed) > 0
    f1 = np.where(present, 2 * tp / np.maximum(truth + guessed, 1e-12), 0.0)
    return {"accuracy": float(tp.sum() / total), "macro_f1": float(f1[present].mean())}


def metrics_from_stats(task: str, stats: Sequence[float], count: float, *, classes: int | None = None,
                       brier_bound: float | None = None) -> dict[str, float]:
    """The metrics a statistics vector (one hospital's, or several added up) gives: survival
    `concordance` and `ibs` (needs the public `brier_bound`), multi-class `accuracy` and
    `macro_f1`. A metric whose noised denominator is not positive is left out."""
    v = np.asarray(stats, dtype=np.float64)
    out: dict[str, float] = {}
    if task == "survival" and v.shape[0] == size("survival"):
        c = binned_concordance(v[:-1])
        if c is not None:
            out["concordance"] = c
        if brier_bound is not None and count > 0:
            out["ibs"] = float(min(brier_bound, max(0.0, v[-1] * brier_bound / count)))
    elif task == "multiclass" and classes and v.shape[0] == size("multiclass", classes):
        out.update(confusion_metrics(v, classes))
    return out
