"""What both DP-SGD engines share, without torch: the round's result, the patient sampler, the
step terms and the input checks (`federated.dp_round.train_round` runs a round; the mechanism is
described in `federated.dp`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from federated.secure_random import SecureRandom
from federated.templates import Template

Engine = Literal["fast", "opacus"]
Status = Literal["trained", "no_eligible_records"]


class DPTrainingError(ValueError):
    """Training inputs are not acceptable (shapes, values, hyper-parameters)."""


@dataclass(frozen=True)
class RoundResult:
    """What a hospital's round produced.

    status "trained": `state` is the new flat weight array. `num_examples` counts the records
    the round could draw from, `num_patients` the patients they belong to (the accounting unit).
    status "no_eligible_records": no record
    was eligible; `state` is the incoming state unchanged, `steps` is 0, no privacy was spent
    (`epsilon` is the study's spend so far, from `prior_steps`) and `reason` says why. The
    ClientApp reports that status rather than weights, and the server aggregates without it.

    `metrics` holds only values that are not computed from the records beyond what the receipt
    already discloses (counts, steps, privacy parameters): a training loss on private data would be
    a release outside the DP guarantee.
    """

    status: Status
    state: np.ndarray
    num_examples: int
    steps: int
    epsilon: float
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    num_patients: int = 0

    @property
    def trained(self) -> bool:
        return self.status == "trained"



@dataclass(frozen=True)
class PatientIndex:
    """Records grouped by patient, for patient-level Poisson sampling.

    `order` lists record indices patient by patient; patient j's records are
    `order[offsets[j]:offsets[j] + counts[j]]`. Built once per round (np.unique on the keys)."""

    order: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    singletons: bool

    @property
    def n_patients(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def build(cls, n_records: int, patients: Sequence[str] | np.ndarray | None) -> PatientIndex:
        """`patients[i]` is the patient (pseudonym) of record i; None: one patient per record."""
        if patients is None:
            idx = np.arange(n_records, dtype=np.int64)
            return cls(idx, idx, np.ones(n_records, dtype=np.int64), True)
        keys = np.asarray(patients)
        if keys.shape != (n_records,):
            raise DPTrainingError(f"patients: {keys.shape[0] if keys.ndim else 0} patient keys for "
                                  f"{n_records} records")
        _uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable").astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(order, offsets, counts.astype(np.int64), bool(np.all(counts == 1)))

    def sample(self, sample_rate: float, rng: SecureRandom) -> np.ndarray:
        """Record indices of one step's batch: each patient with probability `sample_rate`
        (every patient when it is 1), then one of the sampled patient's records, uniformly."""
        n = self.n_patients
        chosen = (np.arange(n) if sample_rate >= 1.0
                  else np.flatnonzero(rng.uniform(n) < sample_rate))
        if self.singletons or chosen.shape[0] == 0:
            return self.order[self.offsets[chosen]]
        pick = np.minimum((rng.uniform(chosen.shape[0]) * self.counts[chosen]).astype(np.int64),
                          self.counts[chosen] - 1)
        return self.order[self.offsets[chosen] + pick]



@dataclass(frozen=True)
class StepTerms:
    """A round's DP-SGD terms, as both engines take them: noise multiplier `sigma`, sample rate
    `q`, `steps`, `clip`, `lr`, `momentum` and the divisor of each step's noised sum."""

    sigma: float
    q: float
    steps: int
    clip: float
    lr: float
    momentum: float
    expected_batch: float


def check_inputs(template: Template, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked contiguous arrays: `x` float32 [records, features]; survival: `y` [records, 2]
    (time, event) float64 (times must order exactly); otherwise `y` float32 [records],
    class indices for multi-class. A fault raises `DPTrainingError` naming the argument."""
    xa = np.asarray(x, dtype=np.float32)
    if template.task == "survival":
        ys = np.asarray(y, dtype=np.float64)
        if ys.ndim != 2 or ys.shape[1] != 2:
            raise DPTrainingError(f"y: a survival template needs [records, 2] (time, event), got {ys.shape}")
        from federated.survival import SurvivalError, check_outcome

        try:
            check_outcome(ys[:, 0], ys[:, 1])
        except SurvivalError as exc:
            raise DPTrainingError(f"y: {exc}") from None
        if xa.ndim != 2 or xa.shape[0] != ys.shape[0] or not np.all(np.isfinite(xa)):
            raise DPTrainingError(f"x: must be finite, [records, features] for {ys.shape[0]} records")
        return np.ascontiguousarray(xa), np.ascontiguousarray(ys)
    ya = np.asarray(y, dtype=np.float32).reshape(-1)
    if xa.ndim != 2:
        raise DPTrainingError(f"x: must be 2-D (records x features), got shape {xa.shape}")
    if xa.shape[1] < 1:
        raise DPTrainingError("x: has no feature columns")
    if xa.shape[0] != ya.shape[0]:
        raise DPTrainingError(f"y: {ya.shape[0]} targets for {xa.shape[0]} records")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise DPTrainingError("x, y: hold NaN or infinite values")
    if template.task == "binary" and not np.all((ya == 0) | (ya == 1)):
        raise DPTrainingError("y: a binary template needs targets 0 or 1")
    if template.task == "multiclass" and not np.all((ya >= 0) & (ya == np.floor(ya))):
        raise DPTrainingError("y: a multi-class template needs class indices 0, 1, 2, ...")
    return np.ascontiguousarray(xa), np.ascontiguousarray(ya)



def check_hparams(noise_multiplier: float, sample_rate: float, local_steps: int, *, clip: float,
                   lr: float, momentum: float, prior_steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise DPTrainingError(f"noise_multiplier: must be finite and >= 0, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise DPTrainingError(f"sample_rate: must be in (0, 1], got {sample_rate}")
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 1:
        raise DPTrainingError(f"local_steps: must be a positive integer, got {local_steps!r}")
    if not (math.isfinite(clip) and clip > 0):
        raise DPTrainingError(f"clip: must be positive, got {clip}")
    if not (math.isfinite(lr) and lr > 0):
        raise DPTrainingError(f"lr: must be positive, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise DPTrainingError(f"momentum: must be in [0, 1), got {momentum}")
    if not isinstance(prior_steps, int) or prior_steps < 0:
        raise DPTrainingError(f"prior_steps: must be a non-negative integer, got {prior_steps!r}")
