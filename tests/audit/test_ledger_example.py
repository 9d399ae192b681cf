"""The worked example of docs/rewards.md, asserted to the unit (entry by entry), claims included."""

from __future__ import annotations

from typing import Any

from audit.ledger import EscrowStatus, Ledger
from tests.audit.test_ledger_support import World

EXPECTED_PAYOUT: dict[str, Any] = {
    "study_id": "s-1", "amount": 10000,
    "royalty": {"account": "author:alice", "amount": 500},
    "hospitals": [
        {"hospital": "hospital:a", "records": 220, "amount": 5186, "kept": 3631, "pool": 1555,
         "pools": [{"round": 1, "records": 120, "pool": 848}, {"round": 2, "records": 100, "pool": 707}]},
        {"hospital": "hospital:b", "records": 170, "amount": 4007, "kept": 2805, "pool": 1202,
         "pools": [{"round": 1, "records": 90, "pool": 636}, {"round": 2, "records": 80, "pool": 566}]},
        {"hospital": "hospital:c", "records": 13, "amount": 307, "kept": 215, "pool": 92,
         "pools": [{"round": 1, "records": 13, "pool": 92}]}]}


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
    world.receipt("s-1", 1, "hospital:a", 120, {"reward:p1": 1, "reward:p2": 1})
    world.receipt("s-1", 1, "hospital:b", 90, {"reward:p3": 1})
    world.receipt("s-1", 1, "hospital:c", 13)
    world.receipt("s-1", 2, "hospital:a", 100, {"reward:p1": 1, "reward:p2": 1})
    world.receipt("s-1", 2, "hospital:b", 80, {"reward:p3": 1})
    ledger.apply_all(world.entries[start:], start)
    assert ledger.state.to_json() == {"minted": 25000, "escrow": 10000, "unclaimed": 0,
                                      "balances": {"org:acme": 15000}}

    assert ledger.expected_payout("s-1", 10000) == EXPECTED_PAYOUT
    entry = world.payout(EXPECTED_PAYOUT)
    ledger.apply(entry, len(world.entries) - 1)
    assert ledger.state.to_json() == {
        "minted": 25000, "escrow": 0, "unclaimed": 848 + 707 + 636 + 566 + 92,
        "balances": {"author:alice": 500, "hospital:a": 3631, "hospital:b": 2805,
                     "hospital:c": 215, "org:acme": 15000}}

    # trees of 8 leaves: a patient's leaf holds 2**20 / 8 units, one eighth of its round's pool
    claims = [("hospital:a", 1, "reward:p1", 106), ("hospital:a", 1, "reward:p2", 106),
              ("hospital:a", 2, "reward:p1", 88), ("hospital:b", 1, "reward:p3", 79),
              ("hospital:b", 2, "reward:p3", 70)]
    for hospital, round_number, account, amount in claims:
        entry = world.claim("s-1", hospital, round_number, account, amount)
        ledger.apply(entry, len(world.entries) - 1)
    holders = {(h, r, a): world.openings[("s-1", h, r)][a].holder for h, r, a, _ in claims}
    state = ledger.state.to_json()
    assert state["unclaimed"] == 2849 - 449
    for (hospital, round_number, account), holder in holders.items():
        amount = next(x for h, r, a, x in claims if (h, r, a) == (hospital, round_number, account))
        assert state["balances"]["claim:" + holder] == amount
    assert not any(account.startswith("reward:") for account in state["balances"])
    ledger.state.check_conservation()
    study = ledger.studies["s-1"]
    assert (study.paid, study.held, study.status) == (10000, 0, EscrowStatus.CLOSED)


def test_receipt_order_does_not_change_the_example_payout() -> None:
    world, ledger = build_example()
    start = len(world.entries)
    world.mint("org:acme", 25000)
    world.escrow("s-1", "org:acme", 10000, "author:alice", 500, 3000)
    world.receipt("s-1", 2, "hospital:b", 80, {"reward:p3": 1})
    world.receipt("s-1", 1, "hospital:c", 13)
    world.receipt("s-1", 2, "hospital:a", 100, {"reward:p2": 1, "reward:p1": 1})
    world.receipt("s-1", 1, "hospital:b", 90, {"reward:p3": 1})
    world.receipt("s-1", 1, "hospital:a", 120, {"reward:p2": 1, "reward:p1": 1})
    ledger.apply_all(world.entries[start:], start)
    assert ledger.expected_payout("s-1", 10000) == EXPECTED_PAYOUT
