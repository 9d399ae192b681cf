"""Ledger rules: every refusal names the field and changes nothing; the happy paths move exactly."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from audit.entry import Entry
from audit.ledger import EscrowStatus, Ledger, LedgerError
from audit.rewards import PayoutError
from audit.signing import Signer
from tests.audit.test_ledger_support import World


@pytest.fixture(autouse=True, params=["studies in memory", "finished studies spilled"])
def study_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule twice: the coordinator's fold (studies in a dict), and the auditor's with each
    finished study in the temporary SQLite file from the first one on (audit.finished_studies)."""
    if request.param == "finished studies spilled":
        monkeypatch.setattr(Ledger.__init__, "__kwdefaults__",
                            {"spill_pools_after": None, "spill_studies_after": 0})


def setup() -> tuple[World, Ledger]:
    world = World()
    world.mint("org:acme", 1000)
    world.escrow("s-1", "org:acme", 600, "author:alice", 1000, 5000)
    world.receipt("s-1", 1, "hospital:a", 30, {"reward:p1": 10})
    world.receipt("s-1", 1, "hospital:b", 10)
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    return world, ledger


def snapshot(ledger: Ledger) -> Any:
    return (copy.deepcopy(ledger.state.to_json()),
            {sid: study.to_json() for sid, study in ledger.studies.items()},
            ledger.claim_pools_json())


def refused(world: World, ledger: Ledger, entry: Entry) -> str:
    """Apply `entry` (the last one of `world`), expect LedgerError, check nothing changed."""
    assert world.entries[-1] is entry
    index = len(world.entries) - 1
    world.feed(ledger, index)
    before = snapshot(ledger)
    with pytest.raises(LedgerError) as caught:
        ledger.apply(entry, index)
    assert caught.value.index == index
    assert snapshot(ledger) == before
    world.drop_last()
    return caught.value.reason


def test_setup_state() -> None:
    _, ledger = setup()
    assert ledger.state.to_json() == {"minted": 1000, "escrow": 600, "unclaimed": 0,
                                      "balances": {"org:acme": 400}}


# --- mint ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "field"), [
    ({"account": "org:x", "amount": 0}, "amount"),
    ({"account": "org:x", "amount": -5}, "amount"),
    ({"account": "org:x", "amount": 1.0}, "amount"),
    ({"account": "org:x", "amount": True}, "amount"),
    ({"account": "org:x", "amount": "10"}, "amount"),
    ({"account": "no prefix", "amount": 1}, "account"),
    ({"account": "org:has space", "amount": 1}, "account"),
    ({"account": "org:x"}, "amount"),
    ({"account": "org:x", "amount": 1, "memo": "hi"}, "memo"),
])
def test_mint_bad_payload_names_field(payload: dict[str, Any], field: str) -> None:
    world, ledger = setup()
    reason = refused(world, ledger, world.sign(world.operator, "token.mint", payload))
    assert reason.startswith(f"token.mint: {field}:"), reason


def test_amount_beyond_i_json_refused() -> None:
    # rfc8785 cannot even sign 2**53, but a hostile export can carry it unsigned-checked here
    world, ledger = setup()
    entry = Entry(kind="token.mint", key_id=world.operator.key_id, time="2026-01-01T00:00:00.000000Z",
                  payload={"account": "org:x", "amount": 2**53}, signature="AA==")
    world.entries.append(entry)
    assert refused(world, ledger, entry).startswith("token.mint: amount: must be an integer in [1,")


def test_mint_only_by_operator() -> None:
    world, ledger = setup()
    entry = world.sign(world.coordinator, "token.mint", {"account": "org:x", "amount": 5})
    assert "operator" in refused(world, ledger, entry)


def test_mint_total_is_capped_at_i_json_range() -> None:
    world, ledger = setup()
    reason = refused(world, ledger, world.mint("org:x", 2**53 - 1))
    assert "amount: total minted would exceed" in reason


# --- transfer -------------------------------------------------------------------------------

def test_transfer_moves_exactly() -> None:
    world, ledger = setup()
    world.transfer("org:acme", "org:beta", 150)
    world.feed(ledger)
    assert ledger.state.balances == {"org:acme": 250, "org:beta": 150}
    ledger.state.check_conservation()


def test_transfer_needs_owner_key() -> None:
    world, ledger = setup()
    world.key("org:acme", "researcher")
    other = world.key("org:beta", "researcher")
    entry = world.sign(other, "token.transfer", {"from": "org:acme", "to": "org:beta", "amount": 1})
    assert "key_id: the signer's account is 'org:beta'" in refused(world, ledger, entry)


def test_transfer_overdraft_and_self_refused() -> None:
    world, ledger = setup()
    world.key("org:acme", "researcher")
    assert "amount: 'org:acme' holds 400, less than 401" in refused(
        world, ledger, world.transfer("org:acme", "org:beta", 401))
    assert "to: must differ" in refused(world, ledger, world.transfer("org:acme", "org:acme", 1))


def test_unregistered_signer_refused() -> None:
    world, ledger = setup()
    stranger = Signer.generate()
    entry = world.sign(stranger, "token.transfer", {"from": "org:acme", "to": "org:b", "amount": 1})
    reason = refused(world, ledger, entry)
    assert reason.startswith("token.transfer: key_id:")
    assert "is not registered in this log" in reason


# --- escrow ---------------------------------------------------------------------------------

def test_escrow_rules() -> None:
    world, ledger = setup()
    assert "amount: 'org:acme' holds 400, less than 401" in refused(
        world, ledger, world.escrow("s-2", "org:acme", 401))
    assert "study_id: 's-1' was already escrowed" in refused(
        world, ledger, world.escrow("s-1", "org:acme", 1))
    assert "royalty_bps: must be 0 when royalty_account is null" in refused(
        world, ledger, world.escrow("s-2", "org:acme", 1, None, 10))
    assert "forward_bps: must be an integer in [0, 10000]" in refused(
        world, ledger, world.escrow("s-2", "org:acme", 1, None, 0, 10001))
    bad_signer = world.sign(world.operator, "study.escrow",
                            {"study_id": "s-2", "account": "org:acme", "amount": 1,
                             "royalty_account": None, "royalty_bps": 0, "forward_bps": 0})
    assert "must be signed by a coordinator key" in refused(world, ledger, bad_signer)


# --- receipts -------------------------------------------------------------------------------

def test_receipt_rules() -> None:
    world, ledger = setup()
    assert "round: 'hospital:a' already has a receipt for round 1" in refused(
        world, ledger, world.receipt("s-1", 1, "hospital:a", 5))
    assert "study_id: no study.escrow for 's-9'" in refused(
        world, ledger, world.receipt("s-9", 1, "hospital:a", 5))
    bad_root = world.sign(world.keys["hospital:a"], "round.receipt",
                          {"study_id": "s-1", "round": 2, "hospital": "hospital:a", "records_used": 5,
                           "rewards": {"root": "zz", "size": 8}})
    assert "rewards.root: must be 64 lowercase hex digits" in refused(world, ledger, bad_root)
    bad_size = world.sign(world.keys["hospital:a"], "round.receipt",
                          {"study_id": "s-1", "round": 2, "hospital": "hospital:a", "records_used": 5,
                           "rewards": {"root": "0" * 64, "size": 12}})
    assert "rewards.size: must be a power of two" in refused(world, ledger, bad_size)
    in_clear = world.sign(world.keys["hospital:a"], "round.receipt",
                          {"study_id": "s-1", "round": 2, "hospital": "hospital:a", "records_used": 5,
                           "reward_accounts": {"reward:p1": 1}})
    assert "rewards: missing" in refused(world, ledger, in_clear)
    assert "round: must be an integer in [1," in refused(
        world, ledger, world.receipt("s-1", 0, "hospital:a", 5))
    forged = world.sign(world.keys["hospital:a"], "round.receipt",
                        {"study_id": "s-1", "round": 2, "hospital": "hospital:b",
                         "records_used": 1000, "rewards": {"root": "0" * 64, "size": 8}})
    assert "hospital: 'hospital:b' is not the signing key's owner 'hospital:a'" in refused(
        world, ledger, forged)
    by_coordinator = world.sign(world.coordinator, "round.receipt",
                                {"study_id": "s-1", "round": 2, "hospital": "hospital:a",
                                 "records_used": 1, "rewards": {"root": "0" * 64, "size": 8}})
    assert "must be signed by a hospital key" in refused(world, ledger, by_coordinator)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("study_id", "", "study_id: must be a non-empty string"),
    ("study_id", "s" * 201, "study_id: must be a non-empty string"),
    ("study_id", 7, "study_id: must be a non-empty string"),
    ("round", True, "round: must be an integer in [1,"),
    ("round", 2.0, "round: must be an integer in [1,"),
    ("hospital", "reward:p1", "hospital: 'reward:p1' is a reward account"),
    ("hospital", "hospital a", "hospital: 'hospital a' is not an account"),
    ("records_used", -1, "records_used: must be an integer in [0,"),
    ("records_used", False, "records_used: must be an integer in [0,"),
    ("records_used", 1.5, "records_used: must be an integer in [0,"),
])
def test_receipt_fields_checked_inline_are_named(name: str, value: Any, reason: str) -> None:
    """The receipt's common case is checked inline; every other value is still refused by name
    (also for a hospital account the ledger has seen before)."""
    world, ledger = setup()
    payload = {"study_id": "s-1", "round": 2, "hospital": "hospital:a", "records_used": 5,
               "rewards": {"root": "0" * 64, "size": 8}, name: value}
    assert reason in refused(world, ledger, world.sign(world.keys["hospital:a"], "round.receipt",
                                                       payload))


# --- payout ---------------------------------------------------------------------------------

def test_payout_checked_field_by_field() -> None:
    world, ledger = setup()
    good = ledger.expected_payout("s-1", 600)
    # royalty 60; rest 540 -> a 405 (30/40), b 135; each puts floor(share/2) in its claim pools
    assert good["royalty"] == {"account": "author:alice", "amount": 60}
    assert [(h["hospital"], h["amount"], h["kept"], h["pool"]) for h in good["hospitals"]] == [
        ("hospital:a", 405, 203, 202), ("hospital:b", 135, 68, 67)]
    assert good["hospitals"][0]["pools"] == [{"round": 1, "records": 30, "pool": 202}]

    cases: list[tuple[list[Any], Any, str]] = [
        (["royalty", "amount"], 61, "royalty.amount: entry says 61, the fold computes 60"),
        (["hospitals", 0, "amount"], 406, "hospitals[0].amount: entry says 406"),
        (["hospitals", 0, "kept"], 204, "hospitals[0].kept: entry says 204"),
        (["hospitals", 0, "pool"], 202.0, "hospitals[0].pool"),
        (["hospitals", 0, "pools", 0, "pool"], 203, "hospitals[0].pools[0].pool: entry says 203"),
        (["hospitals", 1, "hospital"], "hospital:z", "hospitals[1].hospital"),
    ]
    for path, value, expected in cases:
        tampered = copy.deepcopy(good)
        target: Any = tampered
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        reason = refused(world, ledger, world.payout(tampered))
        assert reason.startswith("study.payout: " + expected.split(":")[0]), reason
        assert expected in reason, reason

    dropped = copy.deepcopy(good)
    dropped["hospitals"].pop()
    assert "hospitals: entry lists 1, the fold computes 2" in refused(world, ledger, world.payout(dropped))
    extra = {**good, "note": "x"}
    assert "note: unknown field" in refused(world, ledger, world.payout(extra))
    assert "amount: 601 exceeds the 600 held" in refused(
        world, ledger, world.payout({**good, "amount": 601}))
    by_operator = world.sign(world.operator, "study.payout", good)
    assert "must be signed by a coordinator key" in refused(world, ledger, by_operator)

    world.payout(good)
    world.feed(ledger)
    assert ledger.state.to_json() == {
        "minted": 1000, "escrow": 0, "unclaimed": 269,
        "balances": {"author:alice": 60, "hospital:a": 203, "hospital:b": 68, "org:acme": 400}}
    assert "is closed" in refused(world, ledger, world.payout(good))
    assert "is closed" in refused(world, ledger, world.refund("s-1", "org:acme", 1))


def test_payout_without_records_refused() -> None:
    world = World()
    world.mint("org:acme", 10)
    world.escrow("s-1", "org:acme", 10)
    world.receipt("s-1", 1, "hospital:a", 0)
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    payload = {"study_id": "s-1", "amount": 10, "royalty": None, "hospitals": []}
    assert "hospitals: no receipt with records_used > 0" in refused(world, ledger, world.payout(payload))


# --- refund ---------------------------------------------------------------------------------

def test_partial_payout_then_exact_refund() -> None:
    world, ledger = setup()
    first = ledger.expected_payout("s-1", 250)
    world.payout(first)
    world.feed(ledger)
    study = ledger.studies["s-1"]
    assert (study.paid, study.held, study.status) == (250, 350, EscrowStatus.PAID)
    assert "study_id: study 's-1' is paid; a study is paid out at most once" in refused(
        world, ledger, world.payout(first))
    with pytest.raises(PayoutError, match="is paid; a study is paid out at most once"):
        ledger.expected_payout("s-1", 10)
    assert "no more receipts" in refused(world, ledger, world.receipt("s-1", 2, "hospital:a", 1))
    assert "amount: a refund returns exactly what was not paid out (350), got 349" in refused(
        world, ledger, world.refund("s-1", "org:acme", 349))
    assert "account: must be the escrow's account 'org:acme'" in refused(
        world, ledger, world.refund("s-1", "org:beta", 350))
    world.refund("s-1", "org:acme", 350)
    world.feed(ledger)
    assert ledger.state.escrow == 0
    assert ledger.balance("org:acme") == 750
    assert ledger.studies["s-1"].status is EscrowStatus.CLOSED
    assert "is closed" in refused(world, ledger, world.refund("s-1", "org:acme", 350))
    ledger.state.check_conservation()


def test_refund_of_open_study_returns_everything() -> None:
    world, ledger = setup()
    world.refund("s-1", "org:acme", 600)
    world.feed(ledger)
    assert ledger.state.to_json() == {"minted": 1000, "escrow": 0, "unclaimed": 0,
                                      "balances": {"org:acme": 1000}}
    assert "is closed" in refused(world, ledger, world.payout(
        {"study_id": "s-1", "amount": 1, "royalty": None, "hospitals": []}))


# --- keys and other kinds -------------------------------------------------------------------

def test_other_kinds_are_ignored_and_root_is_inferred() -> None:
    world = World()
    world.sign(world.coordinator, "study.decision", {"study_id": "s-1", "decision": "approve"})
    world.mint("org:acme", 5)
    ledger = Ledger()  # root inferred: the signer of entry 0 (the coordinator's key.register)
    ledger.apply_all(world.entries)
    assert ledger.state.to_json() == {"minted": 5, "escrow": 0, "unclaimed": 0, "balances": {"org:acme": 5}}


def test_rotated_key_keeps_role_and_owner() -> None:
    world, ledger = setup()
    new = Signer.generate()
    old = world.keys["hospital:a"]
    world.sign(old, "key.rotate", {"old_key_id": old.key_id, "new_key_id": new.key_id,
                                   "new_public_key": new.public_key_b64})
    world.sign(new, "round.receipt", {"study_id": "s-1", "round": 2, "hospital": "hospital:a",
                                      "records_used": 4, "rewards": {"root": "0" * 64, "size": 8}})
    world.feed(ledger)
    assert len(ledger.studies["s-1"].receipts) == 3


def test_error_message_carries_index() -> None:
    world, ledger = setup()
    entry = world.mint("org:acme", 0)
    with pytest.raises(LedgerError) as caught:
        ledger.apply(entry, 41)
    assert str(caught.value).startswith("entry 41: token.mint: amount:")


def test_unknown_token_kind_refused() -> None:
    world, ledger = setup()
    entry = world.sign(world.operator, "token.mnit", {"account": "org:x", "amount": 5})
    assert refused(world, ledger, entry).startswith("kind: unknown token kind 'token.mnit'")


# --- secure aggregation ------------------------------------------------------------------------


def test_a_secure_round_pays_only_its_aggregate_members() -> None:
    """`study.round` names the members of a SecAgg+ round's aggregate: a receipt of that round
    from any other hospital (e.g. one that dropped before its masked update arrived and sent its
    receipt itself) pays nothing; the auditor's fold refuses a payout that counts it."""
    world = World()
    world.mint("org:acme", 1000)
    world.escrow("s-1", "org:acme", 600)
    world.receipt("s-1", 1, "hospital:a", 30)
    world.receipt("s-1", 1, "hospital:b", 10)
    world.receipt("s-1", 1, "hospital:c", 20)
    world.sign(world.coordinator, "study.round", {"study_id": "s-1", "round": 1, "metrics": {},
                                                  "hospitals": ["hospital:a", "hospital:b"],
                                                  "aggregate_members": ["hospital:a", "hospital:b"]})
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    good = ledger.expected_payout("s-1", 600)
    assert [h["hospital"] for h in good["hospitals"]] == ["hospital:a", "hospital:b"]
    # a payout computed over every receipt (hospital:c included) is refused by the fold
    world2 = World()
    world2.mint("org:acme", 1000)
    world2.escrow("s-1", "org:acme", 600)
    for hospital, records in (("hospital:a", 30), ("hospital:b", 10), ("hospital:c", 20)):
        world2.receipt("s-1", 1, hospital, records)
    everyone = Ledger(world2.operator.key_id)
    world2.feed(everyone)
    paying_c = everyone.expected_payout("s-1", 600)
    assert "hospital:c" in [h["hospital"] for h in paying_c["hospitals"]]
    assert "hospitals" in refused(world, ledger, world.payout(paying_c))
    world.payout(good)
    world.feed(ledger)
    assert ledger.balance("hospital:c") == 0 and ledger.balance("hospital:a") > 0


def test_aggregate_members_rules() -> None:
    world, ledger = setup()
    bad = world.sign(world.coordinator, "study.round", {"study_id": "s-1", "round": 1,
                                                        "aggregate_members": ["reward:p1"]})
    assert "aggregate_members: must be a list of hospital:<id>" in refused(world, ledger, bad)
    forged = world.sign(world.key("hospital:a", "hospital"), "study.round",
                        {"study_id": "s-1", "round": 1, "aggregate_members": ["hospital:a"]})
    assert "coordinator" in refused(world, ledger, forged)
    world.sign(world.coordinator, "study.round", {"study_id": "s-1", "round": 1, "aggregate_members": []})
    world.feed(ledger)
    again = world.sign(world.coordinator, "study.round", {"study_id": "s-1", "round": 1,
                                                          "aggregate_members": ["hospital:a"]})
    assert "already named its members" in refused(world, ledger, again)
