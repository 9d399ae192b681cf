"""One hospital's DP-SGD round, without torch (`train_round`).

The mechanism is described in `federated.dp` (patient-level Poisson sampling, clipping, secure
noise, the expected batch). The "fast" engine is NumPy's (`federated.numpy_dp`), so a hospital's
Flower process trains without importing torch (issue "Scale", memory per hospital); torch is
imported only when a round asks for the "opacus" engine (`federated.dp.run_opacus`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from federated import numpy_dp
from federated.accounting import AccountantName, epsilon_spent
from federated.clinical_data import SurvivalSet
from federated.dp_types import (
    DPTrainingError,
    Engine,
    PatientIndex,
    RoundResult,
    StepTerms,
    check_hparams,
    check_inputs,
)
from federated.numpy_mlp import NumpyMLP
from federated.secure_random import SecureRandom
from federated.templates import Template, get_template

__all__ = ["DPTrainingError", "Engine", "PatientIndex", "RoundResult", "StepTerms", "train_round"]


def train_round(template: Template | str, state: np.ndarray, x: np.ndarray, y: np.ndarray, *,
                noise_multiplier: float, sample_rate: float, local_steps: int, clip: float,
                lr: float, delta: float, prior_steps: int = 0, momentum: float = 0.0,
                seed: int | None = None, engine: Engine = "fast",
                accountant: AccountantName = "prv",
                patients: Sequence[str] | np.ndarray | None = None, n_classes: int | None = None,
                subcohort: SurvivalSet | None = None, plan_patients: int | None = None) -> RoundResult:
    """One round of DP-SGD at one hospital, from the global `state` on records (x, y).

    `patients[i]` names the patient of record i (None: every record is its own patient); the
    sampling, the sample rate and the guarantee are per patient (module docstring).
    `prior_steps` is the number of DP-SGD steps this hospital already took in this study (with
    the same noise multiplier and sample rate), so `epsilon` in the result is the study's
    cumulative spend here after this round, per patient: the accountant's epsilon for
    prior_steps + local_steps steps. x and y must already be the consent-gated records and
    consented columns. Multi-class: `n_classes`, `y` class indices. Survival: `y` is [records, 2]
    (time, event) and `subcohort` the PUBLIC subcohort whose at-risk members form each patient's
    risk set (`federated.survival`).

    `plan_patients`: the patient count the study's plan was sized for (from the hospital's
    noised decision count, `federated.accounting.plan_patients`). The noised gradient sum is
    then divided by q x plan_patients (the plan's expected batch, a released value) instead of
    q x the real patients, so the update's scale reveals no exact count, and a round with no
    patient left still takes its steps (noise alone) instead of reporting "no data", so a
    revocation of the last patient is not visible either (docs/privacy.md, "Counts").
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.task == "survival" and subcohort is None:
        raise DPTrainingError("subcohort: a survival template needs the public subcohort")
    if engine not in ("fast", "opacus"):
        raise DPTrainingError(f"engine: must be 'fast' or 'opacus', got {engine!r}")
    check_hparams(noise_multiplier, sample_rate, local_steps, clip=clip, lr=lr, momentum=momentum,
                  prior_steps=prior_steps)
    xa, ya = check_inputs(tpl, x, y)
    n, d = xa.shape
    index = PatientIndex.build(n, patients)
    model = NumpyMLP.from_flat(tpl, d, state, n_classes)  # checks the state as `weights.unpack`
    if tpl.task == "multiclass" and n and int(ya.max()) >= (n_classes or 0):
        raise DPTrainingError(f"y: class index {int(ya.max())} is not below n_classes={n_classes}")
    if plan_patients is not None and (isinstance(plan_patients, bool) or not isinstance(plan_patients, int)
                                      or plan_patients < 1):
        raise DPTrainingError(f"plan_patients: must be a positive integer, got {plan_patients!r}")
    expected_batch = sample_rate * (index.n_patients if plan_patients is None else plan_patients)
    if n == 0 and plan_patients is None:
        eps = epsilon_spent(noise_multiplier, sample_rate, prior_steps, delta, accountant)
        return RoundResult(status="no_eligible_records", state=np.asarray(state, dtype=np.float32).copy(),
                           num_examples=0, steps=0, epsilon=eps,
                           metrics={"num_examples": 0.0, "steps": 0.0, "epsilon": eps},
                           reason="no eligible records: no record at this hospital is consented "
                                  "for this study")
    rng = SecureRandom(seed)
    hyper = StepTerms(sigma=noise_multiplier, q=sample_rate, steps=local_steps, clip=clip, lr=lr,
                      momentum=momentum, expected_batch=expected_batch)
    if engine == "opacus":  # the one path that needs torch (and Opacus): imported here only
        from federated.dp import run_opacus

        new_state = run_opacus(tpl, state, xa, ya, n_classes=n_classes, subcohort=subcohort, index=index,
                               rng=rng, terms=hyper)
    else:
        numpy_dp.run(model, tpl.task, xa, ya, subcohort=subcohort, index=index, rng=rng, terms=hyper)
        new_state = model.flat()
    eps = epsilon_spent(noise_multiplier, sample_rate, prior_steps + local_steps, delta, accountant)
    return RoundResult(
        status="trained", state=new_state, num_examples=int(n), steps=local_steps, epsilon=eps,
        num_patients=index.n_patients,
        metrics={"num_examples": float(n), "num_patients": float(index.n_patients),
                 "steps": float(local_steps), "epsilon": eps,
                 "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate)})
