"""The worked example of docs/rewards.md, asserted to the unit (entry by entry)."""

from __future__ import annotations

from typing import Any

from audit.ledger import EscrowStatus, Ledger
from tests.audit.test_ledger_support import World

EXPECTED_PAYOUT: dict[str, Any] = {
    "study_id": "s-1", "amount": 10000,
    "royalty": {"account": "author:alice", "amount": 500},
    "hospitals": [
        {"hospital": "hospital:a", "records": 220, "amount": 5186, "kept": 4479,
         "forwarded": [{"account": "reward:p1", "records": 50, "amount": 354},
                       {"account": "reward:p2", "records": 50, "amount": 353}]},
        {"hospital": "hospital:b", "records": 170, "amount": 4007, "kept": 2876,
         "forwarded": [{"account": "reward:p3", "records": 160, "amount": 1131}]},
        {"hospital": "hospital:c", "records": 13, "amount": 307, "kept": 307, "forwarded": []}]}


def build_example() -> tuple[World, Ledger]:
    world = World()
    for hospital in ("hospital:a", "hospital:b", "hospital:c"):
        world.key(hospital, "hospital")
    ledger = Ledger(world.operator.key_id)
    ledger.apply_all(world.entries)
    return world, ledger


def test_worked_example_to_the_unit() -> None:
    world, ledger = build_example()
    start = len(world.entries)
    world.mint("org:acme", 25000)
    world.escrow("s-1", "org:acme", 10000, "author:alice", 500, 3000)
    world.receipt("s-1", 1, "hospital:a", 120, {"reward:p1": 30, "reward:p2": 25})
    world.receipt("s-1", 1, "hospital:b", 90, {"reward:p3": 90})
    world.receipt("s-1", 1, "hospital:c", 13)
    world.receipt("s-1", 2, "hospital:a", 100, {"reward:p1": 20, "reward:p2": 25})
    world.receipt("s-1", 2, "hospital:b", 80, {"reward:p3": 70})
    ledger.apply_all(world.entries[start:], start)
    assert ledger.state.to_json() == {"minted": 25000, "escrow": 10000,
                                      "balances": {"org:acme": 15000}}

    assert ledger.expected_payout("s-1", 10000) == EXPECTED_PAYOUT
    entry = world.payout(EXPECTED_PAYOUT)
    ledger.apply(entry, len(world.entries) - 1)

    assert ledger.state.to_json() == {
        "minted": 25000, "escrow": 0,
        "balances": {"author:alice": 500, "hospital:a": 4479, "hospital:b": 2876,
                     "hospital:c": 307, "org:acme": 15000, "reward:p1": 354, "reward:p2": 353,
                     "reward:p3": 1131}}
    ledger.state.check_conservation()
    study = ledger.studies["s-1"]
    assert (study.paid, study.held, study.status) == (10000, 0, EscrowStatus.CLOSED)


def test_receipt_order_does_not_change_the_example_payout() -> None:
    world, ledger = build_example()
    start = len(world.entries)
    world.mint("org:acme", 25000)
    world.escrow("s-1", "org:acme", 10000, "author:alice", 500, 3000)
    world.receipt("s-1", 2, "hospital:b", 80, {"reward:p3": 70})
    world.receipt("s-1", 1, "hospital:c", 13)
    world.receipt("s-1", 2, "hospital:a", 100, {"reward:p2": 25, "reward:p1": 20})
    world.receipt("s-1", 1, "hospital:b", 90, {"reward:p3": 90})
    world.receipt("s-1", 1, "hospital:a", 120, {"reward:p2": 25, "reward:p1": 30})
    ledger.apply_all(world.entries[start:], start)
    assert ledger.expected_payout("s-1", 10000) == EXPECTED_PAYOUT
