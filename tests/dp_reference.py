"""An independent accountant for tests and benchmarks: Google's dp-accounting (a dev-only
dependency), to check the epsilon our PRV accountant reports."""

from __future__ import annotations

from collections.abc import Iterable

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


def independent_epsilon(mechanisms: Iterable[tuple[float, float, int]], delta: float,
                        kind: str = "pld") -> float:
    """Epsilon at `delta` of composing Poisson-subsampled Gaussians (noise multiplier, sample
    rate, steps each) on one patient, by dp-accounting's PLD (or RDP) accountant."""
    acc: dp_accounting.PrivacyAccountant = (
        pld_privacy_accountant.PLDAccountant() if kind == "pld" else rdp_privacy_accountant.RdpAccountant())
    for sigma, q, steps in mechanisms:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))
