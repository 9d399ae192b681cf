"""Hold-out evaluation that leaves a hospital only through the accountant.

An exact metric computed on a hospital's hold-out patients is a release outside DP: a server that
sends crafted weights (one unit per feature, a huge bias, ...) and asks many times reads the
hold-out labels back (this was done: 51 evaluations recovered the exact label counts). So a
hospital releases, per evaluation, two NOISED SUMS over its hold-out patients:

- `count`: the number of patients evaluated, plus noise;
- `score`: the sum over patients of a per-patient score in [0, 1], plus noise: for a binary
  template the patient's share of correctly classified records (threshold 0.5; multi-class: the
  arg-max class), for a regression template their mean absolute error clipped to `ERROR_CLIP`
  (in the scaled target units) divided by `ERROR_CLIP`, for a survival template the patient's
  concordance against the PUBLIC reference sample (`federated.survival.anchored_concordance`:
  it depends on the patient and public data only, so the sensitivity below holds).

Adding or removing one patient changes the vector (count, score) by at most sqrt(2) in L2 norm
(`SENSITIVITY`), whatever number of records they have (their records are averaged first). Noise
is Gaussian with standard deviation `eval_noise_multiplier * SENSITIVITY` per coordinate, from
the secure generator (`federated.secure_random`). The study's plan calibrates
`eval_noise_multiplier` so that all of its evaluations (at most one per round) compose to the
study's (epsilon, delta) for a hold-out patient (`federated.accounting`). Hold-out patients never
train in the study (and vice versa), so a patient's spend in a study is the larger of the two,
never the sum. The ledger charges every release and keeps it, so asking again for the same round
returns the same numbers (`federated.privacy_ledger.PrivacyLedger.charge_evaluation`).

Beside (count, score), a survival or multi-class hospital releases the sufficient statistics of its
study metrics (`federated.eval_stats`: a binned survival histogram and integrated Brier sum, or a
confusion matrix), in the SAME Gaussian release: the vector's L2 sensitivity grows to
sqrt(2 + blocks) and the noise with it (`sensitivity`), so the charge is the same. The server
computes Harrell's concordance, the integrated Brier score, accuracy and macro-F1 from them, for
each hospital and for all hospitals' sums together (`aggregate_statistics`).

The server adds the hospitals' noised sums and divides (`aggregate`): accuracy (or MAE) over all
hold-out patients, noisy at small sizes. A noiseless learning curve comes from the PUBLIC
reference sample, which the server scores itself (`reference_metrics`), at no privacy cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from federated import eval_stats
from federated.secure_random import SecureRandom
from federated.templates import Template

if TYPE_CHECKING:  # a hospital scores a `federated.numpy_mlp.NumpyMLP`, without torch
    from torch import nn

#: L2 sensitivity of (count, score) to one patient.
SENSITIVITY = math.sqrt(2.0)
#: Clip of a regression patient's mean absolute error, in scaled target units (diabetes: 150).
ERROR_CLIP = 2.0


@dataclass(frozen=True)
class Release:
    """One hospital's noised evaluation sums (what leaves the hospital)."""

    count: float
    score: float
    #: the noised sufficient statistics (`federated.eval_stats`), empty for binary and regression
    stats: tuple[float, ...] = ()

    def metrics(self, template: Template, target_scale: float, epsilon: float) -> dict[str, float]:
        """The sums as reply metrics: `count`, `correct` (binary) or `abs_error` (regression, in
        original units), and the cumulative evaluation `epsilon` they cost."""
        out = {"count": self.count, "epsilon": epsilon}
        if template.task in ("binary", "multiclass"):
            out["correct"] = self.score
        elif template.task == "survival":
            out["concordant"] = self.score
        else:
            out["abs_error"] = self.score * ERROR_CLIP * target_scale
        return out


def patient_scores(template: Template, model: nn.Module | Any, x: np.ndarray, y: np.ndarray,
                   patients: Sequence[str], *, columns: Sequence[str] = ()) -> np.ndarray:
    """Each patient's score in [0, 1] (module docstring), one per distinct patient. Survival:
    `y` is [records, 2] (time, event) and `columns` name the model inputs (they select the
    public reference sample)."""
    if len(patients) == 0:
        return np.zeros(0)
    pred = template.predict(model, x)
    if template.task == "survival":
        from federated.clinical_data import public_survival_reference
        from federated.survival import anchored_concordance

        ref = public_survival_reference(columns, "eval")
        if ref is None:
            raise ValueError(f"columns: no public survival reference holds {list(columns)}")
        ys = np.asarray(y, dtype=np.float64)
        per_record = anchored_concordance(pred, ys[:, 0], ys[:, 1], template.predict(model, ref.x), ref)
        _keys, inverse, counts = np.unique(np.asarray(patients), return_inverse=True, return_counts=True)
        return np.bincount(inverse, weights=per_record) / counts
    yv = np.asarray(y, dtype=np.float64).reshape(-1)
    if template.task == "multiclass":
        per_record = (pred == yv).astype(np.float64)
    elif template.task == "binary":
        per_record = ((pred >= 0.5) == (yv >= 0.5)).astype(np.float64)
    else:
        per_record = np.minimum(np.abs(pred - yv), ERROR_CLIP) / ERROR_CLIP
    _keys, inverse, counts = np.unique(np.asarray(patients), return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=per_record) / counts


def sensitivity(blocks: int) -> float:
    """L2 sensitivity of (count, score, statistics) to one patient, with `blocks` statistics
    blocks each of per-patient L2 norm at most 1 (`federated.eval_stats`)."""
    return math.sqrt(2.0 + blocks)


def patient_statistics(template: Template, model: nn.Module | Any, x: np.ndarray, y: np.ndarray,
                       patients: Sequence[str], *, columns: Sequence[str] = (),
                       classes: int | None = None) -> np.ndarray:
    """Each patient's statistics row (`federated.eval_stats`), one per distinct patient in the
    order of `patient_scores`; [patients, 0] for binary and regression templates."""
    n = len(np.unique(np.asarray(patients))) if len(patients) else 0
    if template.task == "survival":
        from federated.clinical_data import public_survival_reference
        from federated.survival import baseline_survival

        cols = tuple(columns)
        ref, sub = public_survival_reference(cols, "eval"), public_survival_reference(cols, "pretrain")
        if ref is None or sub is None:
            raise ValueError(f"columns: no public survival reference holds {list(cols)}")
        if n == 0:
            return np.zeros((0, eval_stats.size("survival")))
        ys = np.asarray(y, dtype=np.float64)
        rows = eval_stats.survival_rows(
            template.predict(model, x), ys[:, 0], ys[:, 1], eta_reference=template.predict(model, ref.x),
            setup=eval_stats.survival_setup(cols),
            baseline=baseline_survival(template.predict(model, sub.x), sub))
        return eval_stats.per_patient(rows, patients)
    if template.task == "multiclass":
        if not classes:
            raise ValueError("classes: required for a multi-class evaluation")
        if n == 0:
            return np.zeros((0, eval_stats.size("multiclass", classes)))
        rows = eval_stats.multiclass_rows(template.predict(model, x), np.asarray(y), classes)
        return eval_stats.per_patient(rows, patients)
    return np.zeros((n, 0))


def noised_release(scores: np.ndarray, noise_multiplier: float, rng: SecureRandom,
                   stats: np.ndarray | None = None, blocks: int = 0) -> Release:
    """The Gaussian mechanism on (number of patients, sum of their scores, sums of their
    statistics rows), noise sigma x `sensitivity(blocks)` on every coordinate."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier: must be positive and finite, got {noise_multiplier}")
    sums = np.zeros(0) if stats is None or stats.size == 0 else np.asarray(stats, np.float64).sum(0)
    if sums.size and not blocks:
        raise ValueError("blocks: statistics need their number of blocks for the sensitivity")
    noise = rng.gaussian(2 + sums.shape[0], noise_multiplier * sensitivity(blocks))
    return Release(count=float(scores.shape[0] + noise[0]), score=float(scores.sum() + noise[1]),
                   stats=tuple(float(v) for v in sums + noise[2:]))


def aggregate_statistics(per_hospital: Mapping[str, tuple[float, Sequence[float]]], task: str, *,
                         columns: Sequence[str] = (), classes: int | None = None) -> dict[str, float]:
    """The study metrics from the hospitals' noised statistics: `eval_{metric}@{hospital}` for
    each hospital, and `eval_{metric}` from all hospitals' sums added up (survival: concordance,
    ibs; multi-class: accuracy, macro_f1). `per_hospital`: hospital -> (noised count, noised
    statistics). Rows of the wrong length are ignored."""
    width = eval_stats.size(task, classes)
    rows = {h: (c, list(v)) for h, (c, v) in per_hospital.items() if width and len(v) == width}
    if not rows:
        return {}
    bound = eval_stats.survival_setup(tuple(columns)).brier_bound if task == "survival" else None
    out: dict[str, float] = {}
    for hospital, (count, values) in sorted(rows.items()):
        metrics = eval_stats.metrics_from_stats(task, values, count, classes=classes, brier_bound=bound)
        out.update({f"eval_{k}@{hospital}": v for k, v in metrics.items()})
    total = sum(c for c, _v in rows.values())
    summed = np.sum([v for _c, v in rows.values()], axis=0)
    pooled = eval_stats.metrics_from_stats(task, summed, total, classes=classes, brier_bound=bound)
    out.update({f"eval_{k}": v for k, v in pooled.items() if k != "accuracy"})
    return out


def aggregate(rows: Sequence[Mapping[str, float]], task: str) -> dict[str, float]:
    """Sum the hospitals' noised sums and divide: `eval_accuracy` (binary, multi-class),
    `eval_mae` (regression) or `eval_anchored_concordance` (survival: concordance against the
    public reference, `federated.survival.anchored_concordance`) over every hold-out patient,
    `eval_examples` the noised patient count, `eval_epsilon` the largest evaluation spend. A
    ratio whose noised count is not positive is left out (noise dominates)."""
    rows = [r for r in rows if "count" in r]
    if not rows:
        return {}
    count = sum(r["count"] for r in rows)
    out = {"eval_hospitals": float(len(rows)), "eval_examples": count,
           "eval_epsilon": max(r.get("epsilon", 0.0) for r in rows)}
    keys = {"binary": "correct", "multiclass": "correct", "survival": "concordant"}
    key = keys.get(task, "abs_error")
    if count > 0 and all(key in r for r in rows):
        total = sum(r[key] for r in rows)
        if task in ("binary", "multiclass"):
            out["eval_accuracy"] = min(1.0, max(0.0, total / count))
        elif task == "survival":
            out["eval_anchored_concordance"] = min(1.0, max(0.0, total / count))
        else:
            out["eval_mae"] = max(0.0, total / count)
    return out


def reference_metrics(template: Template, model: nn.Module, reference: tuple[np.ndarray, np.ndarray, float]
                      ) -> dict[str, float]:
    """Exact metrics of `model` on a PUBLIC reference sample (x, y, target scale), prefixed
    `ref_`: no hospital record is involved, so no privacy is spent."""
    x, y, scale = reference
    return {f"ref_{k}": v for k, v in template.evaluate(model, x, y, target_scale=scale).items()}


def survival_reference_metrics(template: Template, model: nn.Module, columns: Sequence[str]
                               ) -> dict[str, float]:
    """Exact Harrell's concordance and integrated Brier score of a survival `model` on the PUBLIC
    reference sample's "eval" half (baseline survival from the "pretrain" subcohort), prefixed
    `ref_`; empty when no public survival reference holds `columns`. No privacy is spent."""
    from federated.clinical_data import public_survival_reference
    from federated.survival import exact_metrics

    ref, sub = public_survival_reference(columns, "eval"), public_survival_reference(columns, "pretrain")
    if ref is None or sub is None:
        return {}
    metrics = exact_metrics(template.predict(model, ref.x), ref, template.predict(model, sub.x), sub)
    return {f"ref_{k}": v for k, v in metrics.items()}
