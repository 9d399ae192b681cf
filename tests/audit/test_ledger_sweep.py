"""Unclaimed rewards: after a study's claim window, what no patient claimed goes, once per pool,
to the account its escrow named; claims are refused from then on; conservation holds throughout,
and every wrong sweep is refused with its field named and changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from audit.ledger import Ledger
from tests.audit import test_ledger_support as support
from tests.audit.test_ledger import refused
from tests.audit.test_ledger_support import World, pool_store  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pool_store")

WINDOW = 30 * 86_400


def paid_world(unclaimed: dict[str, object] | None = None) -> tuple[World, Ledger]:
    return support.paid_world({"reward:p1": 1},
                              {"after_s": WINDOW, "to": "org:acme"} if unclaimed is None else unclaimed)


def test_after_the_window_the_rest_of_each_pool_is_swept_once_and_conservation_holds() -> None:
    world, ledger = paid_world()
    world.claim("s-1", "hospital:a", 1, "reward:p2", pool=200)  # 50 of round 1's 200
    world.feed(ledger)
    assert ledger.sweepable(ledger.claim_pools[("s-1", "hospital:a", 1)].closes
                            - timedelta(microseconds=1)) == []
    world.later = timedelta(seconds=WINDOW)
    closes = ledger.claim_pools[("s-1", "hospital:a", 1)].closes
    assert closes is not None
    due = ledger.sweepable(closes)
    assert due == [{"study_id": "s-1", "hospital": "hospital:a", "round": 1, "amount": 150, "to": "org:acme"},
                   {"study_id": "s-1", "hospital": "hospital:a", "round": 2, "amount": 200, "to": "org:acme"}]
    before = ledger.balance("org:acme")
    for payload in due:
        world.sweep(**{k: v for k, v in payload.items() if k != "round"}, round_number=payload["round"])
    world.feed(ledger)
    assert ledger.balance("org:acme") == before + 350
    assert ledger.state.unclaimed == 0
    ledger.state.check_conservation()
    pools = ledger.claim_pools_json()
    assert [(p["paid"], p["swept"], p["remaining"]) for p in pools] == [(50, 150, 0), (0, 200, 0)]
    assert ledger.sweepable(closes + timedelta(days=1)) == []
    # the auditor's fold of the whole log, from scratch, agrees (what `audit rewards` runs)
    auditor = Ledger(world.operator.key_id)
    auditor.apply_all(world.entries)
    assert auditor.state == ledger.state
    auditor.state.check_conservation()


def test_a_sweep_before_the_window_closes_twice_wrong_amount_or_account_is_refused() -> None:
    world, ledger = paid_world()
    assert "time: the claim window is open until" in refused(
        world, ledger, world.sweep("s-1", "hospital:a", 1, 200, "org:acme"))
    world.later = timedelta(seconds=WINDOW)
    assert "amount: a sweep takes exactly what the pool still holds (200), got 199" in refused(
        world, ledger, world.sweep("s-1", "hospital:a", 1, 199, "org:acme"))
    assert "to: the escrow names 'org:acme' for unclaimed rewards, got 'hospital:a'" in refused(
        world, ledger, world.sweep("s-1", "hospital:a", 1, 200, "hospital:a"))
    assert "round: no claim pool for 'hospital:a' round 3" in refused(
        world, ledger, world.sweep("s-1", "hospital:a", 3, 200, "org:acme"))
    not_coordinator = world.sign(world.operator, "reward.sweep", {
        "study_id": "s-1", "hospital": "hospital:a", "round": 1, "amount": 200, "to": "org:acme"})
    assert "must be signed by a coordinator key" in refused(world, ledger, not_coordinator)
    world.sweep("s-1", "hospital:a", 1, 200, "org:acme")
    world.feed(ledger)
    assert "round: this pool was already swept" in refused(
        world, ledger, world.sweep("s-1", "hospital:a", 1, 200, "org:acme"))
    ledger.state.check_conservation()


def test_no_claim_after_the_window_closes_even_before_the_sweep() -> None:
    """The window, not the moment of the sweep, decides: the outcome of a claim never depends
    on when the operator ran the sweep."""
    world, ledger = paid_world()
    world.later = timedelta(seconds=WINDOW)
    assert "time: the claim window of this pool closed at" in refused(
        world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", pool=200))
    world.sweep("s-1", "hospital:a", 1, 200, "org:acme")
    world.feed(ledger)
    assert "time: the claim window of this pool closed" in refused(
        world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", pool=200))


def test_an_escrow_without_a_window_is_never_swept_and_bad_terms_are_refused() -> None:
    world = World()
    world.mint("org:acme", 1000)
    world.escrow("s-0", "org:acme", 100, None, 0, 5000)  # no `unclaimed`: an earlier log's escrow
    world.receipt("s-0", 1, "hospital:a", 40, {"reward:p1": 1})
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    world.payout(ledger.expected_payout("s-0", 100))
    world.feed(ledger)
    world.later = timedelta(days=4000)
    assert ledger.sweepable(datetime.max.replace(tzinfo=UTC)) == []
    assert "study_id: the escrow of 's-0' set no claim window" in refused(
        world, ledger, world.sweep("s-0", "hospital:a", 1, 50, "org:acme"))
    for terms, reason in (({"after_s": 0, "to": "org:acme"}, "unclaimed.after_s: must be an integer"),
                          ({"after_s": 10}, "to: missing"),
                          ({"after_s": 10, "to": "reward:p1"}, "unclaimed.to: 'reward:p1' is a patient's"),
                          ({"after_s": 10, "to": "claim:" + "0" * 64}, "is a patient's account"),
                          ({"after_s": 10, "to": "org:acme", "x": 1}, "x: unknown field"),
                          ("30 days", "unclaimed: must be an object")):
        assert reason in refused(world, ledger, world.escrow("s-2", "org:acme", 10, None, 0, 0,
                                                             unclaimed=terms))  # type: ignore[arg-type]
