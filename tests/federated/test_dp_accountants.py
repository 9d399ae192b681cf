"""Opacus's accountants without importing Opacus (federated.dp_accountants) give exactly Opacus's
epsilons, bit for bit: RDP and PRV, one mechanism and compositions of different ones, and the RDP
conversion the distributed noise uses; and the accounting imports neither Opacus nor torch."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from federated import dp_accountants
from federated.accounting import PRV_EPS_ERROR

SIGMAS = (0.5, 0.9, 1.3, 4.0)
RATES = (0.001, 0.02, 0.3, 1.0)
STEPS = (1, 37, 1200)
DELTAS = (1e-5, 1e-8)


def _opacus(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PRVAccountant() if kind == "prv" else RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "prv":
            return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        return float(accountant.get_epsilon(delta))


def _ours(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "prv":
            return dp_accountants.prv_epsilon(history, delta, eps_error=PRV_EPS_ERROR)
        return dp_accountants.rdp_epsilon(history, delta)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"),
                         list(itertools.product(SIGMAS, RATES, STEPS, DELTAS)))
def test_rdp_epsilon_is_opacus_bit_for_bit(sigma: float, q: float, steps: int, delta: float) -> None:
    history = [(sigma, q, steps)]
    assert _ours("rdp", history, delta) == _opacus("rdp", history, delta)


PRV_CASES = [(1.1, 0.01, 300, 1e-5), (0.8, 0.05, 60, 1e-6), (2.5, 0.2, 12, 1e-5), (1.0, 0.004, 3000, 1e-7),
             (4.0, 1.0, 5, 1e-5), (0.6, 0.3, 1, 1e-5)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), PRV_CASES)
def test_prv_epsilon_is_opacus_bit_for_bit(sigma: float, q: float, steps: int, delta: float) -> None:
    history = [(sigma, q, steps)]
    ours = _ours("prv", history, delta)
    assert ours == _opacus("prv", history, delta)
    assert 0 < ours < np.inf


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_compositions_of_different_mechanisms_are_opacus_bit_for_bit(kind: str) -> None:
    """What `compose_epsilon` asks: a patient's studies, each its own mechanism (the PRV then
    convolves them pairwise)."""
    for history in ([(1.1, 0.01, 300), (0.9, 0.02, 120)],
                    [(1.1, 0.01, 300), (0.9, 0.02, 120), (2.0, 0.1, 40)]):
        assert _ours(kind, history, 1e-5) == _opacus(kind, history, 1e-5)


def test_rdp_conversion_is_opacus_bit_for_bit() -> None:
    """The conversion the distributed (Skellam) noise's accounting uses, on arbitrary RDP curves."""
    rng = np.random.default_rng(3)
    orders = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]
    for _ in range(20):
        rdp = list(rng.uniform(0.01, 5.0, len(orders)) * np.linspace(0.5, 3, len(orders)))
        delta = float(10 ** rng.uniform(-9, -4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert (dp_accountants.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
                    == opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta))
    with pytest.raises(ValueError, match="same length"):
        dp_accountants.get_privacy_spent(orders=orders, rdp=[1.0], delta=1e-5)


def test_accounting_imports_neither_opacus_nor_torch() -> None:
    """Nor does the distributed noise's accounting add Opacus to the torch it imports itself."""
    code = ("import sys\n"
            "from federated.accounting import epsilon_spent, compose_epsilon\n"
            "epsilon_spent(1.0, 0.01, 50, 1e-5, 'prv'); epsilon_spent(1.0, 0.01, 50, 1e-5, 'rdp')\n"
            "compose_epsilon([(1.0, 0.01, 50), (2.0, 0.1, 5)], 1e-5)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'opacus', 'torch', 'sympy'}))\n"
            "from federated.distributed_noise import skellam_epsilon\n"
            "skellam_epsilon(1.0, 1.0, 100.0, 3, 1e-5)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'opacus', 'sympy'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr


def test_quad_is_scipys_quad_without_importing_scipy_integrate() -> None:
    """`dp_accountants._quad` calls QUADPACK as `scipy.integrate.quad` does (same numbers, reversed
    limits and empty intervals alike), and hands anything but a clean result to `quad` itself
    (its warning here); the PRV accountant then runs a study's plan (one mechanism, composed
    with itself) without `scipy.integrate` imported, which takes ~270 modules and ~24 MB in a
    hospital's Flower process (docs/benchmarks/scale.md). (Composing different mechanisms
    imports `scipy.signal`, and it imports `scipy.integrate`.)"""
    import math

    from scipy import integrate

    cases = [(lambda x: math.exp(-x * x), 0.0, 3.0), (math.sin, 2.0, -1.5), (math.cos, 1.0, 1.0),
             (lambda x: 1.0 / (1.0 + x * x), -1e-5, 1e4)]
    for func, a, b in cases:
        assert dp_accountants._quad(func, a, b, limit=500) == integrate.quad(func, a, b, limit=500)[0]
    with pytest.warns(integrate.IntegrationWarning):  # QUADPACK's ier != 0: quad's own warning
        dp_accountants._quad(lambda x: math.sin(1.0 / x), 1e-9, 1.0, limit=5)
    code = ("import sys\n"
            "from federated.accounting import epsilon_spent, compose_epsilon\n"
            "epsilon_spent(1.0, 0.01, 50, 1e-5, 'prv')\n"
            "compose_epsilon([(1.0, 0.01, 50)], 1e-5, 'prv')\n"
            "print(sorted(m for m in sys.modules if m.startswith('scipy.integrate')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['scipy.integrate._quadpack']"], out.stdout + out.stderr
