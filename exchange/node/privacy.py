"""The node's view of its privacy budget, read from federated's persistent privacy ledger
(`federated.privacy_ledger.PrivacyLedger`, same database, migration 0001).

The ledger holds what was actually spent (cumulative epsilon per study, idempotent per round,
so a restarted node never double counts). The node adds what approved but unfinished studies
still hold in reserve, so two approvals can never together promise more than the total.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine

from exchange.node.policy import Budget
from exchange.node.settings import SitePolicy
from federated.privacy_ledger import PrivacyLedger


def open_ledger(engine: Engine, total_budget: float, *, max_delta: float | None = None,
                total_delta: float | None = None) -> PrivacyLedger:
    """The ledger, with the site policy's total budget (and delta limits, when given) written
    into it (the ledger refuses every charge while no total is set). Written only when they
    differ, so a reader does not take the ledger's write lock."""
    ledger = PrivacyLedger(engine)
    if ledger.total_budget() != total_budget:
        ledger.set_total_budget(total_budget)
    limits = (max_delta, total_delta)
    if max_delta is not None and total_delta is not None and ledger.delta_limits() != limits:
        ledger.set_delta_limits(max_delta=max_delta, total_delta=total_delta)
    return ledger


def site_ledger(engine: Engine, policy: SitePolicy) -> PrivacyLedger:
    """The ledger with every privacy limit of the site policy written into it: the ClientApp
    enforces them from there (it never reads the node's settings)."""
    return open_ledger(engine, policy.total_privacy_budget, max_delta=policy.max_delta,
                       total_delta=policy.total_delta_budget)


def budget(ledger: PrivacyLedger, total: float, active: Iterable[tuple[str, float]],
           active_deltas: Iterable[tuple[str, float]] = (), exclude: str | None = None) -> Budget:
    """Spent (ledger) + reserved (for each active approved study: its target minus what it
    already spent, its decision count included, never below 0) against `total`; deltas
    likewise (a registered study's delta is spent, an approved one's not yet registered is
    reserved). `exclude`: the study being decided, whose own spend so far (its decision
    count) is part of the target it is checked with, so it is not counted twice."""
    reserved = sum(max(0.0, target - ledger.spent(study_id)) for study_id, target in active)
    own = 0.0 if exclude is None else ledger.study_spent(exclude)
    delta_reserved = sum(delta for study_id, delta in active_deltas if ledger.plan(study_id) is None)
    _site_max, delta_total = ledger.delta_limits()
    return Budget(spent=ledger.total_spent() - own, reserved=reserved, total=total,
                  delta_spent=ledger.delta_spent(), delta_reserved=delta_reserved, delta_total=delta_total)
