"""End to end through the coordinator's API: a study pays out into claim pools, a hospital claims
its patients' leaves with their inclusion proofs, and every wrong claim is refused with the field
named and nothing appended. No reward account ever appears in the log or in a response."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from audit.ledger import Ledger
from audit.reward_commitment import ClaimError, claim_account, claim_amount
from exchange.coordinator.claims import sweep_unclaimed
from federated.reward_openings import claim_request
from tests.exchange.conftest import World, make_world
from tests.exchange.test_lifecycle import fold, log_entries, served_balances

ACCOUNTS = {"h-one": {"reward:alice-7": 1, "reward:bob-3": 2}, "h-two": {"reward:carol-1": 1}}
CLAIMS = "/v1/hospital/rewards/claims"


def paid_study(world: World) -> str:
    world.runner.reward_accounts = ACCOUNTS
    sid = world.submit(token_budget=10_000, rounds=2, min_hospitals=2)["id"]
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, sid).status_code == 201
    world.wait_runs()
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "completed"
    return sid


def ledger_of(world: World) -> Ledger:
    ledger = Ledger(world.runtime.journal.operator.key_id)
    ledger.apply_all(log_entries(world))
    return ledger


def body(world: World, sid: str, hospital: str, round_number: int, account: str,
         **override: Any) -> dict[str, Any]:
    opening = next(o for o in world.runner.openings[(sid, hospital, round_number)].openings
                   if o.account == account)
    pool = ledger_of(world).claim_pools[(sid, f"hospital:{hospital}", round_number)].pool
    claim = claim_request(sid, f"hospital:{hospital}", round_number, opening,
                          amount=claim_amount(pool, opening.units), account=account)
    del claim["hospital"]  # the calling hospital's own
    claim.update(override)
    return claim


def refused(world: World, hospital: str, claim: dict[str, Any], status: int = 422) -> str:
    size = world.runtime.audit_log.size()
    response = world.signed(hospital, "POST", CLAIMS, json=claim)
    assert response.status_code == status, response.text
    assert world.runtime.audit_log.size() == size
    return response.text


def test_claims_pay_each_leaf_once_and_refuse_every_wrong_claim(sqlite_world: World) -> None:
    world = sqlite_world
    sid = paid_study(world)
    before = served_balances(world)
    assert before["unclaimed"] > 0

    good = body(world, sid, "h-one", 1, "reward:bob-3")
    response = world.signed("h-one", "POST", CLAIMS, json=good)
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "reward.claim"
    after = served_balances(world)
    assert after["balances"][claim_account(good["holder"])] == good["amount"] > 0
    assert after["unclaimed"] == before["unclaimed"] - good["amount"]
    assert fold(world) == after  # the auditor's fold agrees to the unit

    assert "holder: this leaf was already claimed" in refused(world, "h-one", good)  # replayed
    other = body(world, sid, "h-one", 1, "reward:alice-7")
    assert "amount: the leaf" in refused(world, "h-one", {**other, "amount": other["amount"] + 1})
    forged = list(good["proof"])
    forged[-1] = "0" * 64 if forged[-1] != "0" * 64 else "1" * 64
    assert "proof:" in refused(world, "h-one", {**other, "proof": forged})
    assert "proof:" in refused(world, "h-one", {**other, "units": other["units"] * 2,
                                                "amount": other["amount"] * 2})
    # h-two cannot claim h-one's leaf: its own commitment does not contain it
    assert "proof:" in refused(world, "h-two", {**other, "round": 1})
    assert "no claim pool" in refused(world, "h-one", {**other, "round": 9})
    # a claim for the wrong account is refused by the claimant's own check before it is sent
    opening = next(o for o in world.runner.openings[(sid, "h-one", 1)].openings
                   if o.account == "reward:alice-7")
    with pytest.raises(ClaimError, match=r"^account:"):
        claim_request(sid, "hospital:h-one", 1, opening, amount=other["amount"], account="reward:bob-3")
    # malformed bodies: 422 naming the field, nothing appended
    assert "\"field\":\"holder\"" in refused(world, "h-one", {**other, "holder": "xyz"})
    assert "\"field\":\"account\"" in refused(world, "h-one", {**other, "account": "reward:alice-7"})
    # only hospitals claim (a researcher's key is refused)
    assert world.as_("alice", "POST", CLAIMS, json=other).status_code in (401, 403)
    assert world.signed("h-one", "POST", CLAIMS, json=other).status_code == 201
    assert fold(world) == served_balances(world)


def test_no_reward_account_in_the_log_or_any_response(sqlite_world: World) -> None:
    world = sqlite_world
    sid = paid_study(world)
    texts = [world.as_("auditor", "GET", "/v1/audit/export").text,
             world.as_("alice", "GET", f"/v1/studies/{sid}/results").text,
             world.as_("alice", "GET", f"/v1/studies/{sid}").text,
             world.as_("auditor", "GET", "/v1/ledger/balances").text]
    for text in texts:
        for accounts in ACCOUNTS.values():
            for account in accounts:
                assert account not in text and account.removeprefix("reward:") not in text


def test_unclaimed_rewards_are_swept_after_the_claim_window(sqlite_url: str, tmp_path: Path) -> None:
    """Issue 14: no pool holds tokens for ever. After the claim window (here one second) the
    rest of every pool goes, in `reward.sweep` entries, to the account the escrow named; a later
    claim is refused; the served balances and the auditor's fold agree and conserve tokens."""
    worlds = make_world(sqlite_url, tmp_path, claim_window_s=1,
                        unclaimed_rewards_account="operator:consortium")
    world = next(worlds)
    try:
        sid = paid_study(world)
        escrow = next(e for e in log_entries(world) if e.kind == "study.escrow")
        assert escrow.payload["unclaimed"] == {"after_s": 1, "to": "operator:consortium"}
        claim = body(world, sid, "h-one", 1, "reward:bob-3")
        assert world.signed("h-one", "POST", CLAIMS, json=claim).status_code == 201
        left = served_balances(world)["unclaimed"]
        assert left > 0
        time.sleep(1.1)
        late = body(world, sid, "h-one", 1, "reward:alice-7")
        assert "time: the claim window of this pool closed" in refused(world, "h-one", late)
        swept = sweep_unclaimed(world.runtime.journal)
        assert sum(item["amount"] for item in swept) == left
        assert {item["to"] for item in swept} == {"operator:consortium"}
        after = served_balances(world)
        assert after["unclaimed"] == 0
        assert after["balances"]["operator:consortium"] == left
        assert after["balances"][claim_account(claim["holder"])] == claim["amount"]  # paid stays paid
        assert fold(world) == after
        assert [e.kind for e in log_entries(world)].count("reward.sweep") == len(swept)
        assert sweep_unclaimed(world.runtime.journal) == []  # once
        assert "time: the claim window" in refused(world, "h-one", late)
    finally:
        next(worlds, None)
