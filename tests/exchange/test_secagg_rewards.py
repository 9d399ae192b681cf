"""Secure-aggregation rounds in the coordinator's log: the `study.round` entry names the
aggregate's members, and a hospital outside them earns nothing for that round even if it
delivers its own signed receipt (the payout the coordinator makes is the auditor's fold)."""

from __future__ import annotations

import threading

from tests.exchange.conftest import World, receipt
from tests.exchange.test_lifecycle import fold, log_entries, served_balances


def test_rewards_follow_the_aggregate_members(world: World) -> None:
    world.runner.pause = threading.Event()
    sid = str(world.submit(min_hospitals=3, token_budget=900, rounds=1)["id"])
    for hospital in ("h-one", "h-two", "h-three"):
        assert world.decide(hospital, sid).status_code == 201
    c = world.runtime.lifecycle
    members = [receipt(world.hospitals[h], h, sid, 1, 10) for h in ("h-one", "h-two")]
    c.on_round(sid, 1, {"secure_aggregation": 1.0, "aggregate_members": 2.0}, members)
    # h-three trained but its masked update never entered the aggregate; it delivers its receipt
    outsider = receipt(world.hospitals["h-three"], "h-three", sid, 1, 13)
    c.record_receipt(c_hospital(world, "h-three"), outsider)
    (round_entry,) = [
        e for e in log_entries(world) if e.kind == "study.round" and e.payload["study_id"] == sid
    ]
    assert round_entry.payload["aggregate_members"] == ["hospital:h-one", "hospital:h-two"]
    c.on_complete(sid, b"model", {"sha256": "0" * 64})
    (payout,) = [e for e in log_entries(world) if e.kind == "study.payout" and e.payload["study_id"] == sid]
    assert [h["hospital"] for h in payout.payload["hospitals"]] == ["hospital:h-one", "hospital:h-two"]
    assert fold(world) == served_balances(world)
    assert served_balances(world)["balances"].get("hospital:h-three", 0) == 0


def c_hospital(world: World, hospital_id: str) -> object:
    from exchange.coordinator.models import Hospital

    with world.runtime.journal.read() as session:
        found = session.get(Hospital, hospital_id)
        session.expunge(found)
        return found
