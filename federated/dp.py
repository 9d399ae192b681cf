"""DP-SGD for one hospital's round of a study: patient-level Poisson sampling, clipping, secure noise.

The unit of privacy is the PATIENT, not the record: a patient may have several records, and
record-level DP-SGD would give such a patient k times the influence (at the demo's noise, 2
records meant epsilon 6.7 and 3 records 11.0 against a reported 3.0). The mechanism (identical for
both engines below, and exactly what `federated.accounting` accounts for): for each of
`local_steps` steps, every PATIENT joins the batch independently with probability `sample_rate`
(Poisson sampling over patients, drawn here from `federated.secure_random`, never by a
DataLoader, so the sample rate the accountant uses is the one really applied); each sampled
patient contributes ONE of their records, drawn uniformly; that record's gradient is clipped to
L2 norm `clip`; the clipped gradients are summed, Gaussian noise of standard deviation
`noise_multiplier * clip` is added to every coordinate, and the result is divided by the
EXPECTED batch size `sample_rate * n_patients` (not the realised one, which would leak it). So
adding or removing one patient changes each step's sum by at most `clip` and changes whether it
is sampled with probability `sample_rate`: the Poisson-subsampled Gaussian mechanism with
sensitivity `clip`, whatever the number of records the patient has. An empty batch still takes a
step: zero sum plus noise. Then an SGD step (optional momentum: post-processing). With one record
per patient (the demo data) this is record-level DP-SGD exactly.

Engines (`federated.dp_round.train_round` picks one):
- "fast" (default): what a hospital runs, `federated.numpy_dp` (NumPy, closed-form per-record
  gradient norms: "ghost clipping"), so its Flower process never imports torch. Its torch twin,
  the reference the tests and benchmarks compare it with, is test support code
  (`tests/federated/torch_reference.py`): nothing in production runs it. Survival's torch twin
  (`run_cox(engine="fast")`, closed-form per-patient gradients) stays here: `run_cox` is also
  the "opacus" engine's survival loop.
- "opacus" (`run_opacus`): Opacus 1.6's GradSampleModule (hooks) and DPOptimizer with the same
  sampling and the same noise. Any nn.Module works; slower. The tests check both engines give the
  same clipped sum.

This module also holds what the coordinator computes with torch (a study's initial model:
`initial_state`, `public_initial_state`) and the non-private baselines of the benchmarks.

Randomness: sampling and noise come from `federated.secure_random.SecureRandom` (ChaCha20
keystreams; Gaussian noise as Opacus's secure-mode sum of four draws, which defeats the
floating-point attack on the Gaussian mechanism). With `seed=None` its key comes from
os.urandom (what a hospital uses); a seed makes runs reproducible (benchmarks, tests). torch's
own generators are never used for sampling or noise.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import torch
from torch import nn

from federated.clinical_data import SurvivalSet
from federated.dp_types import (
    DPTrainingError,
    Engine,
    PatientIndex,
    RoundResult,
    Status,
    StepTerms,
    check_hparams,
    check_inputs,
)
from federated.secure_random import SecureRandom
from federated.survival import Subcohort
from federated.templates import Template, get_template
from federated.weights import pack, unpack

#: the torch-free parts live in `federated.dp_types` (and the round, `train_round`, in
#: `federated.dp_round`: what a hospital's process imports); these stay importable from here
__all__ = ["DPTrainingError", "Engine", "PatientIndex", "RoundResult", "Status", "StepTerms", "check_hparams",
           "check_inputs"]

_NORM_EPS = 1e-6  # as Opacus: clip factor = clip / (norm + 1e-6), capped at 1


def initial_state(template: Template | str, n_features: int, seed: int = 0,
                  n_classes: int | None = None) -> np.ndarray:
    """The flat starting weights of a study (the server sends these in round 1)."""
    tpl = get_template(template) if isinstance(template, str) else template
    return pack(tpl.build(n_features, seed, n_classes))


#: Public pre-training (`public_initial_state`): steps, batch, learning rate, momentum.
PRETRAIN = {"steps": 300, "batch_size": 16, "lr": 0.1, "momentum": 0.9}


def public_initial_state(template: Template | str, columns: Sequence[str], task: str,
                         seed: int = 0, n_classes: int | None = None) -> np.ndarray:
    """A study's initial global model: `initial_state`, then trained without noise on the
    PUBLIC reference sample's pre-training half when the study's columns have one
    (`federated.data.public_reference`). Public data costs no privacy, and starting DP-SGD from
    a model that is already good means the noisy steps refine rather than search
    (docs/benchmarks/federated-dp.md: it is what carries the utility targets on every split).

    Deterministic in its arguments and public, so kept (a copy is returned): a study computed
    ahead (`warm_public_state`, while the hospitals decide) starts without it."""
    tpl = get_template(template) if isinstance(template, str) else template
    key = (tpl, tuple(columns), task, int(seed), n_classes)
    with _initial_lock:
        future = _initial_states.get(key)
        mine = future is None
        if future is None:  # computed once: a second caller meanwhile waits for this one
            future = _initial_states[key] = Future()
            while len(_initial_states) > 32:
                _initial_states.pop(next(iter(_initial_states)))
    if mine:
        try:
            state = _public_initial_state(tpl, columns, task, seed, n_classes)
            state.setflags(write=False)
            future.set_result(state)
        except BaseException as exc:
            with _initial_lock:
                _initial_states.pop(key, None)
            future.set_exception(exc)
            raise
    result: np.ndarray = future.result()
    return result.copy()


_initial_lock = threading.Lock()
_initial_states: dict[tuple[object, ...], Future[np.ndarray]] = {}


def warm_public_state() -> None:
    """Import what a study's ServerApp set-up needs (torch, scikit-survival, the public
    reference samples of the shipped data sets) so the first study's first round does not wait
    for it; meant for a background thread of a long-lived process (the coordinator's runner).
    Also one step of the public pre-training on two made-up rows: a process's first
    `torch.optim` step imports torch's compiler stack (`torch._dynamo`, SymPy, about 800
    modules), seconds of CPU that the first study's `public_initial_state` would otherwise pay
    (docs/benchmarks/scale.md, "First round")."""
    from federated.clinical_data import SURVIVAL_DATASETS, public_survival_reference, survival_feature_specs
    from federated.data import DATASETS, feature_specs, public_reference

    fit_cox_nonprivate(np.zeros(1, np.float32), np.zeros((2, 1)), np.array([1.0, 2.0]), np.array([1.0, 0.0]),
                       steps=1)

    for dataset in SURVIVAL_DATASETS:
        public_survival_reference([s.name for s in survival_feature_specs(dataset)], "pretrain")
    tasks = {"breast_cancer": "binary", "diabetes": "regression"}
    for dataset in DATASETS:
        public_reference([s.name for s in feature_specs(dataset)], tasks.get(dataset, "binary"), "pretrain")


def _public_initial_state(tpl: Template, columns: Sequence[str], task: str, seed: int,
                          n_classes: int | None) -> np.ndarray:
    from federated.data import public_reference

    if tpl.task == "survival":
        from federated.clinical_data import public_survival_reference

        state = initial_state(tpl, len(columns), seed)
        sub = public_survival_reference(columns, "pretrain")
        if sub is None:
            return state
        return fit_cox_nonprivate(state, sub.x, sub.time, sub.event)
    if tpl.task == "multiclass":  # no public multi-class reference ships: start from zero
        return initial_state(tpl, len(columns), seed, n_classes)
    state = initial_state(tpl, len(columns), seed)
    public = public_reference(columns, task, "pretrain")
    if public is None:
        return state
    x, y, _scale = public
    return train_nonprivate(tpl, state, x, y, batch_size=int(PRETRAIN["batch_size"]),
                            steps=int(PRETRAIN["steps"]), lr=float(PRETRAIN["lr"]),
                            momentum=float(PRETRAIN["momentum"]), seed=seed)


def make_generator(seed: int | None) -> torch.Generator:
    """A torch generator seeded from `seed`, or from the OS entropy pool when None. Only for the
    non-private baseline's shuffling (`train_nonprivate`); DP training uses `SecureRandom`."""
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else int(seed))
    return gen


def _as_arrays(template: Template, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """`federated.dp_round.check_inputs`, as tensors."""
    xa, ya = check_inputs(template, x, y)
    return torch.from_numpy(xa), torch.from_numpy(ya)


def run_opacus(tpl: Template, state: np.ndarray, x: np.ndarray, y: np.ndarray, *, n_classes: int | None,
               subcohort: SurvivalSet | None, index: PatientIndex, rng: SecureRandom,
               terms: StepTerms) -> np.ndarray:
    """`train_round`'s "opacus" engine: the round's steps with Opacus's per-sample gradients on a
    torch model holding `state` (checked arrays from `check_inputs`); the new flat state."""
    model = unpack(tpl.build(x.shape[1], 0, n_classes), state)
    assert isinstance(model, nn.Sequential)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if tpl.task == "survival":
        assert subcohort is not None
        run_cox(model, xt, yt, Subcohort.from_set(subcohort), index=index, rng=rng, sigma=terms.sigma,
                q=terms.q, steps=terms.steps, clip=terms.clip, lr=terms.lr, momentum=terms.momentum,
                engine="opacus", expected_batch=terms.expected_batch)
    else:
        _run_opacus(model, tpl, xt, yt, index=index, rng=rng, sigma=terms.sigma, q=terms.q,
                    steps=terms.steps, clip=terms.clip, lr=terms.lr, momentum=terms.momentum,
                    expected_batch=terms.expected_batch)
    return pack(model)


def step_noise(rng: SecureRandom, params: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
    """One step's Gaussian noise for every parameter (in order), drawn in one call so that both
    engines consume the generator identically."""
    sizes = [p.numel() for p in params]
    flat = torch.from_numpy(rng.gaussian(sum(sizes), std).astype(np.float32))
    return [chunk.view_as(p) for chunk, p in zip(flat.split(sizes), params, strict=True)]


def _run_opacus(model: nn.Module, tpl: Template, x: torch.Tensor, y: torch.Tensor, *,
                index: PatientIndex, rng: SecureRandom, sigma: float, q: float, steps: int,
                clip: float, lr: float, momentum: float,
              expected_batch: float | None = None) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    base = torch.optim.SGD(gsm.parameters(), lr=lr, momentum=momentum)
    # loss_reduction="mean" makes DPOptimizer divide by expected_batch_size; we pass the exact
    # float q*n through a sum-reduced loss instead, to match the fast engine bit for bit in law.
    # DPOptimizer clips only (noise_multiplier 0: its noise would come from torch's generator);
    # the noise is ours, from the secure generator, added before dividing.
    opt = DPOptimizer(base, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=None,
                      loss_reduction="sum")
    params = list(gsm.parameters())
    expected_batch = q * index.n_patients if expected_batch is None else expected_batch
    for _ in range(steps):
        idx = torch.from_numpy(index.sample(q, rng))
        opt.zero_grad(set_to_none=True)
        if idx.numel() == 0:
            for p in gsm.parameters():
                p.grad_sample = torch.zeros((0, *p.shape))
        else:
            with warnings.catch_warnings():
                # Opacus's hooks warn when no input requires grad (ours never do): harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                out = gsm(x[idx])
                tpl.per_sample_loss(out, y[idx]).sum().backward()
        stepped = opt.pre_step()
        noise = step_noise(rng, params, sigma * clip) if sigma > 0 else None
        if not stepped:
            continue
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is not None:
                    if noise is not None:
                        p.grad += noise[i]
                    p.grad /= expected_batch
        base.step()
    gsm._close()


def _apply(params: Sequence[torch.Tensor], summed: Sequence[torch.Tensor],
           noise: Sequence[torch.Tensor] | None, *, expected_batch: float, lr: float, momentum: float,
           bufs: list[torch.Tensor | None]) -> None:
    """Noised sum / expected batch, optional momentum, SGD step (`federated.numpy_dp`'s update)."""
    for i, (p, summed_grad) in enumerate(zip(params, summed, strict=True)):
        g = summed_grad if noise is None else summed_grad + noise[i]
        g = g / expected_batch
        if momentum > 0:
            buf = bufs[i]
            buf = g if buf is None else buf.mul_(momentum).add_(g)
            bufs[i] = buf
            g = buf
        p.sub_(lr * g)


def cox_clipped_sum(model: nn.Sequential, sub: Subcohort, x: torch.Tensor, y: torch.Tensor, *,
                    clip: float, engine: Engine = "fast") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-patient case-cohort gradients each clipped to `clip`, and the norms before
    clipping. "fast": closed form (`federated.survival.per_patient_grads`); "opacus": Opacus's
    GradSampleModule on input [batch, 1 + m, d] (the patient, then the subcohort as that patient
    sees it), the same loss through `loss_from_outputs`."""
    from federated.survival import loss_from_outputs, per_patient_grads

    layer = model[0]
    assert isinstance(layer, nn.Linear)
    t, e = y[:, 0], y[:, 1].to(x.dtype)
    if engine == "fast":
        grads = per_patient_grads(layer.weight.detach()[0], sub, x, t, e)
    else:
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            inp = torch.cat([x[:, None, :], sub.x[None, :, :].expand(x.shape[0], -1, -1)], 1)
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                out = gsm(inp)[..., 0]
                loss_from_outputs(out[:, 0], out[:, 1:], t, e, sub.time).sum().backward()
            grads = layer.weight.grad_sample[:, 0, :].detach().clone()  # type: ignore[attr-defined]
        finally:
            gsm._close()
            layer.weight.grad = None
            if hasattr(layer.weight, "grad_sample"):
                del layer.weight.grad_sample
    norms = grads.norm(dim=1)
    factor = (clip / (norms + _NORM_EPS)).clamp(max=1.0)
    return (grads * factor[:, None]).sum(0), norms


def run_cox(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, sub: Subcohort, *, index: PatientIndex,
            rng: SecureRandom, sigma: float, q: float, steps: int, clip: float, lr: float, momentum: float,
            engine: Engine = "fast", expected_batch: float | None = None) -> None:
    """DP-SGD on the case-cohort Cox loss: the same patient-level Poisson sampling, clipping,
    secure noise and step as `federated.numpy_dp.run` (module docstring), per-patient gradients
    from `cox_clipped_sum`. `run_opacus` runs it with engine="opacus"; engine="fast" is the
    torch twin of `federated.numpy_dp`'s survival steps (the tests compare them)."""
    params = list(model.parameters())
    expected_batch = q * index.n_patients if expected_batch is None else expected_batch
    bufs: list[torch.Tensor | None] = [None] * len(params)
    sub32 = Subcohort(sub.x.to(x.dtype), sub.time)
    for _ in range(steps):
        idx = torch.from_numpy(index.sample(q, rng))
        if idx.numel() > 0:
            summed, _ = cox_clipped_sum(model, sub32, x[idx], y[idx], clip=clip, engine=engine)
            summed_list = [summed.reshape(params[0].shape)]
        else:
            summed_list = [torch.zeros_like(params[0])]
        noise = step_noise(rng, params, sigma * clip) if sigma > 0 else None
        with torch.no_grad():
            _apply(params, summed_list, noise, expected_batch=expected_batch, lr=lr, momentum=momentum,
                   bufs=bufs)


def fit_cox_nonprivate(state: np.ndarray, x: np.ndarray, time: np.ndarray, event: np.ndarray, *,
                       steps: int = 300, lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """Full-batch gradient descent on the ordinary Cox partial likelihood (Breslow ties, every
    patient's risk set over all of `x`), mean over events, small ridge: the public
    pre-training and the non-private baselines. Never for a hospital's records in a study."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    t = np.asarray(time, dtype=np.float64)
    e = torch.from_numpy(np.asarray(event, dtype=np.float64))
    order = np.argsort(-t, kind="stable")  # descending time: cumulative sums give risk sets
    xs, es = xt[order], e[order]
    ts = t[order]
    # Breslow ties: every tied patient's risk set ends at the last of its tie group
    last = np.searchsorted(-ts, -ts, side="right") - 1
    beta = torch.from_numpy(np.asarray(state, dtype=np.float64).copy()).requires_grad_(True)
    n_events = max(float(es.sum()), 1.0)
    opt = torch.optim.SGD([beta], lr=lr, momentum=0.9)
    last_t = torch.from_numpy(last)
    for _ in range(steps):
        opt.zero_grad()
        eta = xs @ beta
        logcum = torch.logcumsumexp(eta, 0)[last_t]
        loss = (es * (logcum - eta)).sum() / n_events + l2 * (beta * beta).sum()
        loss.backward()
        opt.step()
    return beta.detach().numpy().astype(np.float32)


def train_nonprivate(template: Template | str, state: np.ndarray, x: np.ndarray, y: np.ndarray, *,
                     batch_size: int, steps: int, lr: float, momentum: float = 0.0,
                     seed: int | None = 0, n_classes: int | None = None) -> np.ndarray:
    """Ordinary mini-batch SGD (shuffled batches, mean loss, no clipping, no noise): the
    non-private baseline of the benchmarks. Never use it on a hospital's records in a study."""
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.task == "survival":
        raise DPTrainingError("template: a survival template trains with fit_cox_nonprivate")
    xt, yt = _as_arrays(tpl, x, y)
    n, d = xt.shape
    model = tpl.build(d, 0, n_classes)
    unpack(model, state)
    if n == 0:
        return pack(model)
    gen = make_generator(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        tpl.loss(model(xt[idx]), yt[idx]).backward()
        opt.step()
    return pack(model)
