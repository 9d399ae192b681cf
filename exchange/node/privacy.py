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
from federated.privacy_ledger import PrivacyLedger


def open_ledger(engine: Engine, total_budget: float) -> PrivacyLedger:
    """The ledger, with the site policy's total budget written into it (the ledger refuses
    every charge while no total is set)."""
    ledger = PrivacyLedger(engine)
    if ledger.total_budget() != total_budget:
        ledger.set_total_budget(total_budget)
    return ledger


def budget(ledger: PrivacyLedger, total: float, active: Iterable[tuple[str, float]]) -> Budget:
    """Spent (ledger) + reserved (for each active approved study: its target minus what it
    already spent, never below 0) against `total`."""
    reserved = sum(max(0.0, target - ledger.spent(study_id)) for study_id, target in active)
    return Budget(spent=ledger.total_spent(), reserved=reserved, total=total)
