"""Distributed noise under secure aggregation: the distributed Skellam mechanism, accounted.

With local noise (the default, `federated.dp`) each hospital adds the full DP-SGD noise for its
own patients. With ``noise: distributed`` (docs/secure-aggregation.md, "Noise") each hospital
adds only a SHARE of the noise to integer vectors that SecAgg+ sums, so the aggregate the
coordinator sees carries the calibrated noise once, not once per hospital. This is the Skellam
mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021): Skellam noise Sk(mu) = Poisson(mu/2) -
Poisson(mu/2), variance mu, is integer (it goes through SecAgg's modular arithmetic without
rounding) and closed under addition, so t honest hospitals each adding Sk(mu / t) give the sum
exactly Sk(mu) noise, whatever the dishonest ones add.

The mechanism, per round and hospital (DP-FedSGD: one full-batch step per round):
1. every admitted patient contributes ONE of their records, drawn uniformly (as in `federated.dp`,
   so the unit is still the patient); its gradient at the global model is clipped to L2 norm
   `clip` and a constant `COUNT_SHARE * clip` is appended (the server's denominator, below);
2. that vector is scaled by `SCALE / clip` and rounded to integers by conditional randomized
   rounding: each coordinate rounds up with probability equal to its fractional part, and the
   rounding is drawn again until the integer vector's L2 norm is at most the bound `l2` of
   `rounded_l2_bound` (Kairouz, Liu and Steinke 2021, Section 4.1; the same bound as TensorFlow
   Federated's `rounded_l2_norm_bound`). Adding or removing one patient therefore changes the
   sum by an integer vector with L2 norm <= `l2` and L1 norm <= `l1 = l2 * min(sqrt(d), l2)`;
3. the hospital sums its patients' integer vectors, adds Skellam noise of variance mu / t to
   every coordinate, reduces modulo 2**22 (the quantization range of SecAgg+, which the sum of the
   members' vectors is taken modulo; a sum modulo m is a post-processing of the sum);
4. the server gets the members' sum modulo 2**22 (`federated.secagg.server`), centres it, and
   takes the step w <- w - lr * (gradient sum / noisy patient count), both read off the sum.

Accounting (the Skellam RDP bound, Agarwal et al. 2021 Corollary 3.6 / TFF's `_skellam_rdp` at
scale 1, integer sensitivities):
    RDP(alpha) <= alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu)).
For alpha >= 1 this is at most alpha / (2 sigma^2), the Gaussian mechanism's RDP at noise
multiplier sigma, when mu solves mu^2 - sigma^2 l2^2 mu - sigma^2 (l2^2 + 3 l1) = 0 (each
correction term is bounded by alpha l2^2 / (2 mu) times (1/mu) resp. (3 l1 / (l2^2 mu))). So
the study's noise is calibrated as a Gaussian of multiplier sigma without subsampling
(`federated.accounting.calibrate`, RDP accountant: RDP dominance is what carries over), and the
privacy ledger accounts it exactly as that Gaussian (a DPPlan with sample rate 1, one step per
round, accountant "rdp"): an upper bound on the Skellam epsilon. `skellam_epsilon` gives the
Skellam bound itself (tighter), converted with Opacus's RDP-to-(epsilon, delta) conversion.

Two guarantees, both reported per round (`DistributedNoise.guarantees`):
- against the coordinator (central): the study's epsilon, provided at least t = min_hospitals of
  the aggregate's members are honest (each added its share and none of them colludes with the
  coordinator). SecAgg+ never lets an aggregate have fewer than min_hospitals members;
- local: a hospital whose every other member colludes with the coordinator is protected by its
  own share Sk(mu / t) only: `epsilon_local`, larger by roughly a factor sqrt(t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from federated.accounting import AccountingError, DPPlan, calibrate, max_delta
from federated.secure_random import SecureRandom
from federated.study_spec import StudySpec
from federated.templates import Template, get_template

if TYPE_CHECKING:  # a hospital computes its vector with NumPy (`federated.numpy_mlp`), without torch
    import torch
    from torch import nn

    from federated.numpy_mlp import NumpyMLP

#: integer units per clip norm: a patient's clipped gradient has integer L2 norm <= SCALE
SCALE = 1024
#: the patient-count coordinate each patient adds, as a fraction of the clip norm
COUNT_SHARE = 0.5
#: conditional rounding's bound holds with probability >= 1 - BETA per draw (TFF's default)
BETA = math.exp(-0.5)
#: the members' sum is taken modulo this (SecAgg+'s quantization range, federated.secagg.params)
MODULUS = 2**22
#: the metric by which a hospital's reply says its update is an encoded integer vector
INTEGER_METRIC = "secagg_integer"
#: RDP orders for the Skellam epsilon (integers: the bound is stated for alpha > 1)
ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512, 1024)
#: Poisson draws by PTRS need mean >= 10 (Hoermann 1993); shares are far larger in practice
_PTRS_MIN_MEAN = 10.0


class DistributedNoiseError(ValueError):
    """Distributed noise cannot be used with these parameters; the message says why."""


# -- accounting ----------------------------------------------------------------------------------


def rounded_l2_bound(l2: float, dim: int, beta: float = BETA) -> float:
    """The L2 norm bound conditional randomized rounding enforces on a vector of norm <= `l2` in
    `dim` coordinates (Kairouz, Liu, Steinke 2021; TFF `rounded_l2_norm_bound`): the smaller of
    l2 + sqrt(dim) (always true) and sqrt(l2^2 + dim/4 + sqrt(2 ln(1/beta)) (l2 + sqrt(dim)/2))
    (true with probability >= 1 - beta per draw, and enforced by redrawing)."""
    if not (l2 > 0 and dim >= 1 and 0 <= beta < 1):
        raise DistributedNoiseError(f"rounded_l2_bound: needs l2 > 0, dim >= 1, beta in [0, 1), got "
                                    f"{l2}, {dim}, {beta}")
    always = l2 + math.sqrt(dim)
    if beta == 0:
        return always
    spread = math.sqrt(2.0 * math.log(1.0 / beta)) * (l2 + 0.5 * math.sqrt(dim))
    likely = math.sqrt(l2 * l2 + 0.25 * dim + spread)
    return min(always, likely)


def rounded_l1_bound(l2: float, dim: int) -> float:
    """L1 <= sqrt(dim) L2 always, and L1 <= L2^2 for an integer vector."""
    return l2 * min(math.sqrt(dim), l2)


def skellam_rdp(alpha: float, l1: float, l2: float, mu: float) -> float:
    """RDP of order `alpha` of adding Sk(mu) (variance mu) per coordinate to an integer query of
    L1 / L2 sensitivity `l1` / `l2` (Agarwal, Kairouz, Liu 2021, Corollary 3.6)."""
    if alpha <= 1 or mu <= 0:
        raise DistributedNoiseError(f"skellam_rdp: needs alpha > 1 and mu > 0, got {alpha}, {mu}")
    return alpha * l2 * l2 / (2 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu),
                                            3 * l1 / (2 * mu))


def skellam_epsilon(l1: float, l2: float, mu: float, releases: int, delta: float) -> float:
    """Epsilon at `delta` of `releases` compositions of the Skellam mechanism (RDP adds up),
    converted as Opacus's RDP accountant does (`get_privacy_spent`)."""
    from federated.dp_accountants import get_privacy_spent

    if releases == 0:
        return 0.0
    rdp = [releases * skellam_rdp(a, l1, l2, mu) for a in ORDERS]
    eps, _order = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def dominating_variance(sigma: float, l1: float, l2: float) -> float:
    """The Skellam variance whose RDP is at most the Gaussian's at multiplier `sigma`, at every
    order (module docstring): the positive root of mu^2 - sigma^2 l2^2 mu - sigma^2 (l2^2 + 3 l1)."""
    a = sigma * sigma * l2 * l2
    b = sigma * sigma * (l2 * l2 + 3 * l1)
    return (a + math.sqrt(a * a + 4 * b)) / 2


@dataclass(frozen=True)
class DistributedNoise:
    """A study's distributed-noise parameters: all from its public terms (no patient count).

    `dim`: model weights + 1 (the count coordinate); `l2`, `l1`: integer sensitivities of one
    patient; `sigma`: the Gaussian multiplier the ledger accounts; `mu`: the aggregate's Skellam
    variance; `honest`: t, the members assumed honest; each hospital adds Sk(mu / honest)."""

    clip: float
    dim: int
    honest: int
    rounds: int
    delta: float
    sigma: float
    l2: float
    l1: float
    mu: float

    @property
    def scale(self) -> float:
        """Integer units per gradient unit."""
        return SCALE / self.clip

    @property
    def share_variance(self) -> float:
        return self.mu / self.honest

    def central_epsilon(self, rounds: int) -> float:
        """The Skellam bound on the aggregate after `rounds` rounds (t honest members)."""
        return skellam_epsilon(self.l1, self.l2, self.mu, rounds, self.delta)

    def local_epsilon(self, rounds: int) -> float:
        """A hospital's own share alone, after `rounds` rounds (every other member colludes)."""
        return skellam_epsilon(self.l1, self.l2, self.share_variance, rounds, self.delta)

    def guarantees(self, rounds: int) -> dict[str, float]:
        return {"epsilon_central_skellam": self.central_epsilon(rounds),
                "epsilon_local": self.local_epsilon(rounds),
                "noise_honest": float(self.honest)}


def plan_noise(*, epsilon: float, delta: float, rounds: int, clip: float, n_weights: int,
               honest: int) -> DistributedNoise:
    """Calibrate the aggregate's Skellam noise for a study's (epsilon, delta) over `rounds`
    rounds (module docstring). Public inputs only: every hospital and the server compute the same."""
    if not isinstance(honest, int) or honest < 2:
        raise DistributedNoiseError(f"honest: distributed noise needs at least 2 honest hospitals, "
                                    f"got {honest}")
    if not (math.isfinite(clip) and clip > 0):
        raise DistributedNoiseError(f"clip: must be positive, got {clip}")
    return _plan_cached((float(epsilon), float(delta), int(rounds)), float(clip), int(n_weights), honest)


@lru_cache(maxsize=256)
def _plan_cached(target: tuple[float, float, int], clip: float, n_weights: int,
                 honest: int) -> DistributedNoise:
    epsilon, delta, rounds = target
    dim = n_weights + 1
    l2 = rounded_l2_bound(SCALE * math.sqrt(1.0 + COUNT_SHARE**2), dim)
    l1 = rounded_l1_bound(l2, dim)
    sigma = calibrate(epsilon, delta, 1.0, rounds, accountant="rdp")
    mu = dominating_variance(sigma, l1, l2)
    if mu / honest < _PTRS_MIN_MEAN * 2:
        raise DistributedNoiseError("noise share below the Poisson sampler's range")
    return DistributedNoise(clip=clip, dim=dim, honest=honest, rounds=rounds, delta=delta, sigma=sigma,
                            l2=l2, l1=l1, mu=mu)


def ledger_plan(noise: DistributedNoise, *, epsilon: float, n_patients: int) -> DPPlan:
    """The privacy ledger's view of a distributed-noise study: the dominating Gaussian without
    subsampling, one step per round, RDP accountant (an upper bound on the Skellam epsilon).
    The hold-out evaluation (a local release at each hospital, as with local noise) is
    calibrated on the same accountant: the Gaussian at `noise.sigma`, one release per round."""
    if noise.delta > max_delta(n_patients):
        raise AccountingError(f"delta: {noise.delta:g} is above 1/n for the n eligible patients")
    return DPPlan(target_epsilon=float(epsilon), delta=noise.delta, rounds=noise.rounds, steps_per_round=1,
                  sample_rate=1.0, noise_multiplier=noise.sigma, batch_size=n_patients,
                  n_patients=n_patients, accountant="rdp", eval_noise_multiplier=noise.sigma)


# -- sampling ------------------------------------------------------------------------------------


def _log_factorial(k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return np.asarray(gammaln(k + 1.0))


def poisson(rng: SecureRandom, n: int, lam: float) -> np.ndarray:
    """`n` Poisson(lam) draws by Hoermann's PTRS transformed rejection (what numpy uses for
    lam >= 10), driven by `rng`'s ChaCha20 uniforms so the noise is as unpredictable as the
    Gaussian noise of DP-SGD. Vectorised: every pending draw takes two uniforms per attempt."""
    if lam < _PTRS_MIN_MEAN:
        raise DistributedNoiseError(f"poisson: mean {lam} is below {_PTRS_MIN_MEAN}")
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.shape[0]:
        m = pending.shape[0]
        u = rng.uniform(m) - 0.5
        v = rng.uniform(m)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / np.maximum(us, 1e-300) + b) * u + lam + 0.43)
        fast = (us >= 0.07) & (v <= vr)
        possible = ~fast & (k >= 0) & ~((us < 0.013) & (v > us))
        slow = np.zeros(m, dtype=bool)
        if possible.any():
            kk, uu, vv = k[possible], us[possible], v[possible]
            slow[possible] = (np.log(np.maximum(vv, 1e-300)) + math.log(invalpha)
                              - np.log(a / (uu * uu) + b)) <= (-lam + kk * loglam - _log_factorial(kk))
        accept = fast | slow
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out


def skellam(rng: SecureRandom, n: int, variance: float) -> np.ndarray:
    """`n` draws of Sk(variance) = Poisson(variance/2) - Poisson(variance/2)."""
    return poisson(rng, n, variance / 2) - poisson(rng, n, variance / 2)


def conditional_round(rows: np.ndarray, bound: float, rng: SecureRandom) -> np.ndarray:
    """Randomized rounding of each row (up with probability = fractional part), redrawn for every
    row whose integer L2 norm exceeds `bound` (Kairouz et al. 2021, conditional rounding)."""
    floor = np.floor(rows)
    frac = rows - floor
    out = np.empty(rows.shape, dtype=np.int64)
    todo = np.arange(rows.shape[0])
    for _ in range(10_000):
        if todo.shape[0] == 0:
            return out
        ups = rng.uniform(todo.shape[0] * rows.shape[1]).reshape(todo.shape[0], rows.shape[1])
        cand = (floor[todo] + (ups < frac[todo])).astype(np.int64)
        ok = np.sqrt((cand.astype(np.float64) ** 2).sum(1)) <= bound
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    raise DistributedNoiseError("conditional rounding did not meet its bound (input above the clip norm)")


# -- the hospital's and the server's steps ---------------------------------------------------------


def per_record_grads(model: NumpyMLP, template: Template, xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """Per-record gradients [records, weights] in `pack` order (weight then bias per Linear),
    from the same backward as the DP-SGD fast engine (`federated.numpy_mlp.NumpyMLP.backprop`)."""
    acts, grads_out = model.backprop(template.task, xb, yb)
    parts: list[np.ndarray] = []
    for a, g, b in zip(acts, grads_out, model.biases, strict=True):
        parts.append((g[:, :, None] * a[:, None, :]).reshape(g.shape[0], -1))
        if b is not None:
            parts.append(g)
    return np.concatenate(parts, 1)


def hospital_vector(model: NumpyMLP | nn.Module | Any, template: Template, x: np.ndarray | torch.Tensor,
                    y: np.ndarray | torch.Tensor, *, patients: np.ndarray, noise: DistributedNoise,
                    rng: SecureRandom, chunk: int = 256) -> np.ndarray:
    """Step 1-3 of the module docstring: the hospital's integer vector modulo `MODULUS`, in
    [0, MODULUS). `patients` are the record indices, one per admitted patient. `model`: the
    NumPy model (a torch `nn.Sequential` of the template is converted)."""
    from federated.numpy_mlp import NumpyMLP

    if not isinstance(model, NumpyMLP):
        try:
            model = NumpyMLP.from_torch(model, template.activation)
        except (TypeError, ValueError):
            raise DistributedNoiseError("template: distributed noise needs a Sequential of Linear layers and "
                                        "tanh or ReLU") from None
    xa = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    ya = np.ascontiguousarray(np.asarray(y), dtype=np.float32).reshape(-1)
    clip, scale = noise.clip, noise.scale
    total = np.zeros(noise.dim, dtype=np.int64)
    for start in range(0, patients.shape[0], chunk):
        idx = patients[start:start + chunk]
        grads = per_record_grads(model, template, xa[idx], ya[idx]).astype(np.float64)
        norms = np.linalg.norm(grads, axis=1)
        grads *= np.minimum(1.0, clip / (norms + 1e-6))[:, None]
        rows = np.concatenate([grads, np.full((grads.shape[0], 1), COUNT_SHARE * clip)], 1) * scale
        total += conditional_round(rows, noise.l2, rng).sum(0)
    total += skellam(rng, noise.dim, noise.share_variance)
    return np.mod(total, MODULUS)


def centred(summed: np.ndarray) -> np.ndarray:
    """The members' sum modulo `MODULUS`, as integers in [-MODULUS/2, MODULUS/2)."""
    s = np.mod(np.asarray(summed, dtype=np.int64), MODULUS)
    return np.where(s >= MODULUS // 2, s - MODULUS, s)


def apply_sum(weights: np.ndarray, summed: np.ndarray, *, noise: DistributedNoise, lr: float) -> np.ndarray:
    """Step 4: the server's step from the members' noisy integer sum (centred): the gradient sum
    over the noisy patient count (at least 1)."""
    s = centred(summed).astype(np.float64) / noise.scale
    if s.shape[0] != weights.shape[0] + 1:
        raise DistributedNoiseError(f"sum: expected {weights.shape[0] + 1} values, got {s.shape[0]}")
    count = max(s[-1] / (COUNT_SHARE * noise.clip), 1.0)
    return (np.asarray(weights, dtype=np.float64) - lr * s[:-1] / count).astype(np.float32)


#: a hospital's integer vector travels through Flower's float layout as k * 2**-18 - 8, which
#: secaggplus_mod's quantizer (clip +-8, 2**22 levels, weight ratio 1) maps back to exactly k
_GRID = 16.0 / MODULUS


def encode(vector: np.ndarray) -> np.ndarray:
    """Integers in [0, MODULUS) as the floats secaggplus_mod quantizes to exactly them."""
    v = np.asarray(vector, dtype=np.int64)
    if v.size and (v.min() < 0 or v.max() >= MODULUS):
        raise DistributedNoiseError(f"encode: values must be in [0, {MODULUS})")
    return v.astype(np.float64) * _GRID - 8.0


def decode(encoded: np.ndarray) -> np.ndarray:
    """Inverse of `encode` (tests, and the hospital's own check)."""
    return np.rint((np.asarray(encoded, dtype=np.float64) + 8.0) / _GRID).astype(np.int64)


def for_study(spec: StudySpec, n_weights: int) -> DistributedNoise:
    """A study's distributed-noise parameters, from its public terms only (every hospital and the
    server compute the same): clip and the honest count t from the spec."""
    clip = spec.clip or get_template(spec.template).defaults.clip
    return plan_noise(epsilon=spec.epsilon, delta=spec.delta, rounds=spec.rounds, clip=clip,
                      n_weights=n_weights, honest=honest_hospitals(spec.min_hospitals))


def server_step(spec: StudySpec, weights: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The server's step for a distributed-noise study (`apply_sum` with the study's learning rate)."""
    noise = for_study(spec, weights.shape[0])
    lr = spec.lr or get_template(spec.template).defaults.lr

    def step(current: np.ndarray, summed: np.ndarray) -> np.ndarray:
        return apply_sum(current, summed, noise=noise, lr=lr)

    return step


def honest_hospitals(min_hospitals: int) -> int:
    """t, the members assumed honest: the study's minimum aggregate size (SecAgg+ never forms
    an aggregate with fewer members)."""
    return int(min_hospitals)


__all__: Sequence[str] = [
    "DistributedNoise",
    "DistributedNoiseError",
    "apply_sum",
    "centred",
    "decode",
    "encode",
    "hospital_vector",
    "ledger_plan",
    "plan_noise",
    "skellam",
    "skellam_epsilon",
    "skellam_rdp",
]
