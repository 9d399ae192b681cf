"""Reward claims against a receipt's salted Merkle commitment: paid once, exactly, to the leaf's
claim account; every wrong claim is refused with its field named and changes nothing."""

from __future__ import annotations

import json
import secrets

import pytest

from audit.ledger import Ledger
from audit.reward_commitment import (
    DEFAULT_SIZE,
    UNITS,
    ClaimError,
    claim_account,
    commit,
    holder,
    open_claim,
    padded_size,
    verify_leaf,
)
from tests.audit import test_ledger_support as support
from tests.audit.test_ledger import refused
from tests.audit.test_ledger_support import World, pool_store  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pool_store")


def paid_world() -> tuple[World, Ledger]:
    return support.paid_world({"reward:p1": 1, "reward:p3": 1})


def test_payout_opens_one_pool_per_receipt_and_no_account_is_credited() -> None:
    _, ledger = paid_world()
    pools = ledger.claim_pools_json()
    assert [(p["round"], p["pool"], p["remaining"]) for p in pools] == [(1, 200, 200), (2, 200, 200)]
    assert ledger.state.unclaimed == 400
    assert ledger.state.to_json()["balances"] == {"hospital:a": 400, "org:acme": 200}
    ledger.state.check_conservation()


def test_a_claim_pays_its_leaf_once_into_the_holders_account() -> None:
    world, ledger = paid_world()
    opening = world.openings[("s-1", "hospital:a", 1)]["reward:p2"]
    assert opening.units == 2 * UNITS // 8  # two patients named p2 in a tree of 8
    due = ledger.expected_claim("s-1", "hospital:a", 1, opening.units)
    assert due == 200 * 2 // 8
    world.claim("s-1", "hospital:a", 1, "reward:p2", due)
    world.feed(ledger)
    assert ledger.balance(claim_account(opening.holder)) == due
    assert ledger.state.unclaimed == 400 - due
    ledger.state.check_conservation()
    # a replay of the same claim (same leaf) is refused and changes nothing
    replay = world.claim("s-1", "hospital:a", 1, "reward:p2", due)
    assert "holder: this leaf was already claimed" in refused(world, ledger, replay)
    # the same account's leaf of another round is another claim (another salt, another holder)
    world.claim("s-1", "hospital:a", 2, "reward:p1", pool=200)
    world.feed(ledger)
    assert ledger.claim_pools[("s-1", "hospital:a", 2)].paid == 25


def test_wrong_amount_forged_proof_and_foreign_leaf_are_refused() -> None:
    world, ledger = paid_world()
    assert "amount: the leaf's 131072 units of the pool 200 pay 25, got 26" in refused(
        world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 26))
    assert "amount:" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 25.0))
    # more units than the leaf holds: the leaf hash changes and the proof fails
    assert "proof: the leaf (holder, units) is not in the committed tree" in refused(
        world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 50, units=2 * UNITS // 8))
    # a forged proof (one hash flipped), a proof of another index, a proof of the wrong length
    opening = world.openings[("s-1", "hospital:a", 1)]["reward:p1"]
    forged = list(opening.proof)
    forged[0] = ("0" if forged[0][0] != "0" else "1") + forged[0][1:]
    assert "proof:" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 25,
                                                           proof=forged))
    assert "proof:" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 25,
                                                           index=(opening.index + 1) % 8))
    assert "proof:" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 25,
                                                           proof=list(opening.proof)[:-1]))
    # a made-up holder (someone guessing an account with a salt of their own)
    guess = holder(secrets.token_bytes(32), "reward:p1")
    assert "proof:" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 25,
                                                           holder=guess))
    # round 2's leaf against round 1's root
    other = world.openings[("s-1", "hospital:a", 2)]["reward:p1"]
    assert "proof:" in refused(world, ledger, world.claim(
        "s-1", "hospital:a", 1, "reward:p1", 25, holder=other.holder, index=other.index,
        proof=list(other.proof)))
    assert "round: no claim pool for 'hospital:a' round 3" in refused(
        world, ledger, world.claim("s-1", "hospital:a", 2, "reward:p1", 25, round=3))
    assert "units: must be an integer in [1," in refused(
        world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 0, units=0))
    not_coordinator = world.sign(world.operator, "reward.claim",
                                 dict(world.claim("s-1", "hospital:a", 1, "reward:p1", 25).payload))
    world.drop_last()
    world.entries.append(not_coordinator)
    assert "must be signed by a coordinator key" in refused(world, ledger, not_coordinator)
    ledger.state.check_conservation()


def test_no_claim_before_the_payout() -> None:
    world = World()
    world.mint("org:acme", 100)
    world.escrow("s-1", "org:acme", 100, None, 0, 5000)
    world.receipt("s-1", 1, "hospital:a", 10, {"reward:p1": 1})
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    assert "not paid out" in refused(world, ledger, world.claim("s-1", "hospital:a", 1, "reward:p1", 6))


def test_the_claimant_checks_the_opening_for_the_wrong_account() -> None:
    commitment = commit({"reward:p1": 1, "reward:p2": 1}, minimum_size=8)
    opening = next(o for o in commitment.openings if o.account == "reward:p1")
    open_claim(opening.salt, "reward:p1", opening.holder)
    with pytest.raises(ClaimError, match="account: the salt and account do not open"):
        open_claim(opening.salt, "reward:p2", opening.holder)
    verify_leaf(commitment.root, commitment.size, opening.holder, opening.units, index=opening.index,
                proof=list(opening.proof))


def test_membership_cannot_be_read_from_the_log() -> None:
    """The attack of issue 14: reading which reward accounts (patients) took part from the log.
    No account appears in any entry; the same cohort commits to unrelated roots and holders in
    two rounds; a reader who knows a candidate account cannot test it without the leaf's salt."""
    world, ledger = paid_world()
    world.claim("s-1", "hospital:a", 1, "reward:p1", pool=200)
    world.feed(ledger)
    log_text = "\n".join(json.dumps(e.to_json()) for e in world.entries)
    for account in ("reward:p1", "reward:p2", "reward:p3"):
        assert account not in log_text
        assert account.removeprefix("reward:") + '"' not in log_text
    again = [commit({"reward:p1": 1, "reward:p3": 1}, minimum_size=8) for _ in range(2)]
    assert again[0].root != again[1].root
    assert {o.holder for o in again[0].openings}.isdisjoint({o.holder for o in again[1].openings})
    # the claimed holder is a salted hash: the unsalted guess does not match it
    claimed = world.openings[("s-1", "hospital:a", 1)]["reward:p1"].holder
    assert claimed in log_text
    assert holder(b"\x00" * 32, "reward:p1") != claimed
    assert ledger.state.to_json()["balances"].keys().isdisjoint({"reward:p1", "reward:p2", "reward:p3"})


def test_the_tree_size_reveals_a_count_only_above_the_site_constant_and_at_powers_of_two() -> None:
    """The known leak of the reward tree's size (docs/privacy.md, "Known limits"), stated as a
    bound: for every study with at most DEFAULT_SIZE patients the size is the same constant;
    above it, the size is the next power of two, so one patient more or fewer changes it only
    when the study's patient count is exactly a power of two (256, 512, ...); what it tells is
    ceil(log2 n), never n. The size is fixed per study, so no revocation moves it between rounds."""
    sizes = {n: padded_size(n, DEFAULT_SIZE) for n in range(0, 5000)}
    assert {sizes[n] for n in range(0, DEFAULT_SIZE + 1)} == {DEFAULT_SIZE}
    flips = [n for n in range(0, 4999) if sizes[n] != sizes[n + 1]]
    assert flips == [256, 512, 1024, 2048, 4096]
    assert all(n <= sizes[n] < 2 * n for n in range(DEFAULT_SIZE + 1, 5000))
    # leaves are accounts, not patients: a study's tree is built at its plan's size, whatever
    # the number of patients used in a round
    assert commit({"reward:p1": 1}, minimum_size=padded_size(300, DEFAULT_SIZE)).size == 512
    assert commit({f"reward:p{i}": 1 for i in range(300)},
                  minimum_size=padded_size(300, DEFAULT_SIZE)).size == 512
