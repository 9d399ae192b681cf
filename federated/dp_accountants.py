# Copyright (c) Meta Platforms, Inc. and affiliates (Opacus 1.6.0, opacus/accountants: rdp.py,
# prv.py, analysis/rdp.py, analysis/prv/{prvs,domain,compose}.py), licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Changes: the analysis code is
# gathered into one module with type hints; the accountants' bookkeeping (IAccountant, optimizer
# hooks, the registry, the GDP accountant) is left out; scipy.signal is imported only where two
# different mechanisms are composed. The arithmetic is Opacus's, operation for operation.
"""Opacus's RDP and PRV accountants, without importing Opacus.

Why (issue "Scale", memory per hospital; docs/benchmarks/scale.md): `import opacus.accountants`
runs `opacus/__init__.py`, which imports Opacus's privacy engine, its optimizers and through them
`torch.distributed.tensor` and SymPy: about 50 MB of memory and seconds of start-up in every
hospital's Flower process, none of it used, since training is our own DP-SGD (`federated.dp`)
and only the accountants' arithmetic is needed. This module is that arithmetic, copied from
Opacus 1.6.0 (the notice above) so that `federated.accounting` and `federated.distributed_noise`
give exactly what Opacus gives: tests/federated/test_dp_accountants.py compares every function
with Opacus's own, bit for bit, over a grid of noise multipliers, sample rates, steps and
deltas, and for compositions of different mechanisms. Opacus stays a dependency (the "opacus"
training engine, that test); a new Opacus release changes nothing here until this copy is
compared with it again.

- RDP: Mironov, Talwar, Zhang 2019 (https://arxiv.org/abs/1908.10530), conversion to
  (epsilon, delta) by Balle et al. 2020, Theorem 21 (https://arxiv.org/abs/1905.09982).
- PRV: Gopi, Lee, Wutschitz 2021 (https://arxiv.org/abs/2106.02848), after
  https://github.com/microsoft/prv_accountant.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import scipy
from scipy import special
from scipy.fft import irfft, rfft

#: One mechanism as the accountants see it: (noise multiplier, sample rate, steps).
Mechanism = tuple[float, float, int]

#: RDPAccountant.DEFAULT_ALPHAS
DEFAULT_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


# -- RDP (opacus/accountants/analysis/rdp.py) --------------------------------------------------

def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -np.inf:  # adding 0
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ValueError("The result of subtraction must be non-negative.")
    if logy == -np.inf:  # subtracting 0
        return logx
    if logx == logy:
        return -np.inf  # 0 is represented as -np.inf in the log space.
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _compute_log_a_for_int_alpha(q: float, sigma: float, alpha: int) -> float:
    log_a = -np.inf
    for i in range(alpha + 1):
        log_coef_i = math.log(special.binom(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        s = log_coef_i + (i * i - i) / (2 * (sigma**2))
        log_a = _log_add(log_a, s)
    return float(log_a)


def _log_erfc(x: float) -> float:
    return float(math.log(2) + special.log_ndtr(-x * 2**0.5))


def _compute_log_a_for_frac_alpha(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -np.inf, -np.inf
    i = 0
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    while True:  # do ... until loop
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def _compute_log_a(q: float, sigma: float, alpha: float) -> float:
    if float(alpha).is_integer():
        return _compute_log_a_for_int_alpha(q, sigma, int(alpha))
    return _compute_log_a_for_frac_alpha(q, sigma, alpha)


def compute_rdp_order(q: float, sigma: float, alpha: float) -> float:
    """RDP of the sampled Gaussian mechanism at order `alpha` (Opacus's `_compute_rdp`)."""
    if q == 0:
        return 0
    if sigma == 0:
        return np.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if np.isinf(alpha):
        return np.inf
    return _compute_log_a(q, sigma, alpha) / (alpha - 1)


def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """RDP at each of `orders` of `steps` steps of the sampled Gaussian mechanism."""
    rdp = np.array([compute_rdp_order(q, noise_multiplier, order) for order in orders])
    return rdp * steps


def get_privacy_spent(*, orders: Sequence[float] | float, rdp: Sequence[float] | np.ndarray | float,
                      delta: float) -> tuple[float, float]:
    """(epsilon, best order) at `delta` from RDP values at `orders` (Balle et al. 2020, Thm 21)."""
    orders_vec = np.atleast_1d(orders)
    rdp_vec = np.atleast_1d(rdp)
    if len(orders_vec) != len(rdp_vec):
        raise ValueError(f"Input lists must have the same length.\n\torders_vec = {orders_vec}\n"
                         f"\trdp_vec = {rdp_vec}\n")
    eps = (rdp_vec - (np.log(delta) + np.log(orders_vec)) / (orders_vec - 1)
           + np.log((orders_vec - 1) / orders_vec))
    if np.isnan(eps).all():
        return np.inf, np.nan
    idx_opt = np.nanargmin(eps)  # Ignore NaNs
    if idx_opt == 0 or idx_opt == len(eps) - 1:
        extreme = "smallest" if idx_opt == 0 else "largest"
        warnings.warn(f"Optimal order is the {extreme} alpha. Please consider expanding the range of "
                      "alphas to get a tighter privacy bound.", stacklevel=2)
    return eps[idx_opt], orders_vec[idx_opt]


def rdp_epsilon(history: Sequence[Mechanism], delta: float,
                alphas: Sequence[float] | None = None) -> float:
    """`RDPAccountant.get_epsilon(delta)` for an accountant whose history is `history`."""
    if not history:
        return 0
    orders = DEFAULT_ALPHAS if alphas is None else alphas
    rdp = sum([compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=num_steps, orders=orders)
               for (noise_multiplier, sample_rate, num_steps) in history])
    eps, _best_alpha = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


# -- PRV (opacus/accountants/analysis/prv/, opacus/accountants/prv.py) --------------------------

SQRT2 = np.sqrt(2)


@dataclass
class Domain:
    """Where the PRVs are discretized."""

    t_min: float
    t_max: float
    size: int
    shifts: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int):
            raise TypeError("`size` must be an integer")
        if self.size % 2 != 0:
            raise ValueError("`size` must be even")

    @classmethod
    def create_aligned(cls, t_min: float, t_max: float, dt: float) -> Domain:
        t_min = np.floor(t_min / dt) * dt
        t_max = np.ceil(t_max / dt) * dt
        size = int(np.round((t_max - t_min) / dt)) + 1
        if size % 2 == 1:
            size += 1
            t_max += dt
        domain = cls(t_min, t_max, size)
        if np.abs(domain.dt - dt) / dt >= 1e-8:
            raise RuntimeError
        return domain

    def shift_right(self, dt: float) -> Domain:
        return Domain(t_min=self.t_min + dt, t_max=self.t_max + dt, size=self.size, shifts=self.shifts + dt)

    @property
    def dt(self) -> float:
        return (self.t_max - self.t_min) / (self.size - 1)

    @property
    def ts(self) -> np.ndarray:
        return np.linspace(self.t_min, self.t_max, self.size)


class PoissonSubsampledGaussianPRV:
    """The privacy loss random variable of the Poisson subsampled Gaussian (propositions B1, B4 of
    Gopi et al.)."""

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.sample_rate = sample_rate
        self.noise_multiplier = noise_multiplier

    def pdf(self, t: np.ndarray) -> np.ndarray:
        q = self.sample_rate
        sigma = self.noise_multiplier
        z = np.log((np.exp(t) + q - 1) / q)
        return np.where(
            t > np.log(1 - q),
            sigma * np.exp(-(sigma**2) * z**2 / 2 - 1 / (8 * sigma**2) + 2 * t)
            / (SQRT2 * np.sqrt(np.pi) * (np.exp(t) + q - 1) * ((np.exp(t) + q - 1) / q) ** 0.5),
            0.0,
        )

    def cdf(self, t: np.ndarray) -> np.ndarray:
        q = self.sample_rate
        sigma = self.noise_multiplier
        # z doesn't matter if t <= log(1-q); this avoids a warning if the log's argument is < 0
        z = np.log(np.where(t > np.log(1 - q), (np.exp(t) + q - 1) / q, 1))
        return np.where(
            t > np.log(1 - q),
            -q * special.erfc((2 * z * sigma**2 - 1) / (2 * SQRT2 * sigma)) / 2
            - (1 - q) * special.erfc((2 * z * sigma**2 + 1) / (2 * SQRT2 * sigma)) / 2
            + 1.0,
            0.0,
        )

    def rdp(self, alpha: float) -> float:
        return compute_rdp_order(self.sample_rate, self.noise_multiplier, alpha)


class TruncatedPrivacyRandomVariable:
    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        self._prv = prv
        self.t_min = t_min
        self.t_max = t_max
        self._remaining_mass = self._prv.cdf(t_max) - self._prv.cdf(t_min)  # type: ignore[arg-type]

    def pdf(self, t: np.ndarray) -> np.ndarray:
        return np.where(t < self.t_min, 0.0,
                        np.where(t < self.t_max, self._prv.pdf(t) / self._remaining_mass, 0.0))

    def cdf(self, t: np.ndarray) -> np.ndarray:
        return np.where(
            t < self.t_min,
            0.0,
            np.where(t < self.t_max,
                     (self._prv.cdf(t) - self._prv.cdf(self.t_min)) / self._remaining_mass,  # type: ignore[arg-type]
                     1.0),
        )

    def mean(self) -> float:
        """The mean, by numerical integration."""
        lower_exponent = int(np.log10(np.abs(self.t_min)))
        upper_exponent = int(np.log10(self.t_max))
        points = np.concatenate([
            [self.t_min],
            -np.logspace(start=lower_exponent, stop=-5, num=10),
            [0],
            np.logspace(start=-5, stop=upper_exponent, num=10),
            [self.t_max],
        ])
        mean = 0.0
        for left, right in itertools.pairwise(points):
            integral = _quad(self.cdf, left, right, limit=500)
            mean += right * self.cdf(right) - left * self.cdf(left) - integral
        return mean


#: `scipy.integrate.quad`'s default tolerances.
_EPSABS = _EPSREL = 1.49e-8


@lru_cache(maxsize=1)
def _quadpack() -> ModuleType | None:
    """SciPy's QUADPACK extension (`scipy.integrate._quadpack`), loaded from its file without
    running `scipy/integrate/__init__.py`, or None where that file is not found or does not load.

    Why: `scipy.integrate` imports its ODE solvers, cubature and through them `scipy.sparse`,
    `scipy.linalg` and `scipy.optimize` (about 270 modules, ~24 MB resident in a hospital's
    Flower process, docs/benchmarks/scale.md), and the PRV accountant only calls QUADPACK's
    QAGSE routine through `quad`. The extension is C and Fortran with no Python imports of its
    own; calling it as `quad` does gives `quad`'s own numbers (tests/federated/test_dp_accountants.py
    compares with Opacus bit for bit)."""
    folder = Path(scipy.__file__).parent / "integrate"
    name = "scipy.integrate._quadpack"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_quadpack{suffix}"
        if not path.is_file():
            continue
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
        if spec is None:
            return None
        try:
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except ImportError:
            return None
        return module if hasattr(module, "_qagse") else None
    return None


def _quad(func: Callable[[Any], Any], a: float, b: float, limit: int) -> float:
    """`scipy.integrate.quad(func, a, b, limit=limit)[0]` for finite `a`, `b`: QUADPACK's QAGSE
    with `quad`'s defaults, its argument handling (empty interval, reversed limits) done as
    `quad` does it. Anything but a clean result (QUADPACK's `ier` != 0: a warning or an error
    in `quad`), or no loadable extension, is handed to `quad` itself, so its warnings and errors
    are SciPy's own."""
    if a == b:  # quad's shortcut for an empty interval
        return 0.0
    quadpack = _quadpack()
    if quadpack is not None:
        flip, low, high = b < a, min(a, b), max(a, b)
        result, _abserr, ier = quadpack._qagse(func, low, high, (), 0, _EPSABS, _EPSREL, limit)
        if ier == 0:
            return float(-result if flip else result)
    from scipy import integrate

    integral, _abserr = integrate.quad(func, a, b, limit=limit)
    return float(integral)


@dataclass
class DiscretePRV:
    pmf: np.ndarray
    domain: Domain

    def __len__(self) -> int:
        if len(self.pmf) != self.domain.size:
            raise ValueError("pmf and domain must have the same length")
        return len(self.pmf)

    def compute_epsilon(self, delta: float, delta_error: float,
                        eps_error: float) -> tuple[float, float, float]:
        if delta <= 0:
            return (float("inf"),) * 3
        if np.finfo(np.longdouble).eps * self.domain.size > delta - delta_error:
            raise ValueError("Floating point errors will dominate for such small values of delta. "
                             "Increase delta or reduce domain size.")
        t = self.domain.ts
        p = self.pmf
        d1 = np.flip(np.flip(p).cumsum())
        d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
        ndelta = np.exp(t) * d2 - d1

        def find_epsilon(delta_target: float) -> float:
            i = np.searchsorted(ndelta, -delta_target, side="left")
            if i <= 0:
                raise RuntimeError("Cannot compute epsilon")
            return np.log((d1[i] - delta_target) / d2[i])

        eps_upper = find_epsilon(delta - delta_error) + eps_error
        eps_lower = find_epsilon(delta + delta_error) - eps_error
        eps_estimate = find_epsilon(delta)
        return eps_lower, eps_estimate, eps_upper


def discretize(prv: TruncatedPrivacyRandomVariable, domain: Domain) -> DiscretePRV:
    t_c = domain.ts
    t_l = t_c - domain.dt / 2
    t_r = t_c + domain.dt / 2
    discrete_pmf = prv.cdf(t_r) - prv.cdf(t_l)
    mean_d = np.dot(domain.ts, discrete_pmf)
    mean_c = prv.mean()
    mean_shift = mean_c - mean_d
    if np.abs(mean_shift) >= domain.dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return DiscretePRV(pmf=discrete_pmf, domain=domain.shift_right(mean_shift))


def compute_safe_domain_size(prvs: Sequence[PoissonSubsampledGaussianPRV],
                             max_self_compositions: Sequence[int], eps_error: float,
                             delta_error: float) -> float:
    """Remark 5.6 of Gopi et al., as Opacus (and the paper's code) implement it."""
    total_compositions = sum(max_self_compositions)
    history = [(prv.noise_multiplier, prv.sample_rate, n)
               for prv, n in zip(prvs, max_self_compositions, strict=True)]
    l_max = rdp_epsilon(history, delta_error / 4)
    for prv in prvs:
        l_max = max(l_max, rdp_epsilon([(prv.noise_multiplier, prv.sample_rate, 1)],
                                       delta=delta_error / (8 * total_compositions)))
    return max(l_max, eps_error) + 3


def _compose_fourier(dprv: DiscretePRV, num_self_composition: int) -> DiscretePRV:
    if len(dprv) % 2 != 0:
        raise ValueError("Can only compose evenly sized discrete PRVs")
    composed_pmf = irfft(rfft(dprv.pmf) ** num_self_composition)
    m = num_self_composition - 1
    if num_self_composition % 2 == 0:
        m += len(composed_pmf) // 2
    composed_pmf = np.roll(composed_pmf, m)
    domain = dprv.domain.shift_right(dprv.domain.shifts * (num_self_composition - 1))
    return DiscretePRV(pmf=composed_pmf, domain=domain)


def _compose_two(dprv_left: DiscretePRV, dprv_right: DiscretePRV) -> DiscretePRV:
    # only where different mechanisms compose (a patient's studies, `compose_epsilon`):
    # scipy.signal imports most of SciPy (stats, sparse, spatial, optimize)
    from scipy.signal import convolve

    pmf = convolve(dprv_left.pmf, dprv_right.pmf, mode="same")
    domain = dprv_left.domain.shift_right(dprv_right.domain.shifts)
    return DiscretePRV(pmf=pmf, domain=domain)


def _compose_convolution_tree(dprvs: list[DiscretePRV]) -> DiscretePRV:
    while len(dprvs) > 1:
        dprvs_conv = []
        if len(dprvs) % 2 == 1:
            dprvs_conv.append(dprvs.pop())
        for dprv_left, dprv_right in zip(dprvs[:-1:2], dprvs[1::2], strict=True):
            dprvs_conv.append(_compose_two(dprv_left, dprv_right))
        dprvs = dprvs_conv
    return dprvs[0]


def compose_heterogeneous(dprvs: list[DiscretePRV], num_self_compositions: list[int]) -> DiscretePRV:
    """Each PRV composed with itself by FFT, then the results convolved pairwise."""
    if len(dprvs) != len(num_self_compositions):
        raise ValueError("dprvs and num_self_compositions must have the same length")
    composed = [_compose_fourier(dprv, n) for dprv, n in zip(dprvs, num_self_compositions, strict=True)]
    return _compose_convolution_tree(composed)


def prv_epsilon(history: Sequence[Mechanism], delta: float, *, eps_error: float = 0.01,
                delta_error: float | None = None) -> float:
    """`PRVAccountant.get_epsilon(delta, eps_error=...)` for an accountant whose history is
    `history`: the upper bound on epsilon."""
    if delta_error is None:
        delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
            for noise_multiplier, sample_rate, _ in history]
    num_self_compositions = [steps for _, _, steps in history]
    size = compute_safe_domain_size(prvs=prvs, max_self_compositions=num_self_compositions,
                                    eps_error=eps_error, delta_error=delta_error)
    mesh_size = eps_error / np.sqrt(sum(num_self_compositions) * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh_size)
    tprvs = [TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max) for prv in prvs]
    dprvs = [discretize(tprv, domain) for tprv in tprvs]
    dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=num_self_compositions)
    _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return eps_upper
