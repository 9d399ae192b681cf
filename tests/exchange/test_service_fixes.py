"""Fixes found integrating the coordinator with federated and the demo, on SQLite and PostgreSQL:

1. `on_round` logs receipts only of hospitals that approved the study (in time);
2. a failed round (`round_failed`) is logged but not counted as completed, and pays nothing;
3. a refusal that arrives after the study started or ended is recorded as late, visible to the
   researcher with its reasons, without changing the study; one decision per hospital still;
4. receipts of a cancelled study's in-flight round are logged (privacy spent), never paid.

The run is held (`ScriptedRunner.pause`) and the test plays the run's observer calls itself, in
the order federated makes them."""

from __future__ import annotations

import threading

from audit.entry import Entry
from audit.signing import b64decode
from tests.exchange.conftest import World, receipt
from tests.exchange.test_lifecycle import fold, kinds, log_entries, served_balances


def _running(world: World, *approvers: str, **overrides: object) -> str:
    """A running study whose run is held before its first round."""
    world.runner.pause = threading.Event()
    sid = str(world.submit(min_hospitals=len(approvers), **overrides)["id"])
    for hospital in approvers:
        assert world.decide(hospital, sid).status_code == 201
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "running"
    return sid


def _study_entries(world: World, sid: str, kind: str) -> list[Entry]:
    return [e for e in log_entries(world) if e.kind == kind and e.payload.get("study_id") == sid]


# ---------------------------------------------------------------- 1: approved hospitals only
def test_on_round_logs_only_receipts_of_hospitals_that_approved(world: World) -> None:
    """h-two is registered and signs with its real key but never approved: GuardedObserver
    would drop its receipt; if something hands it to on_round anyway, it is not logged."""
    sid = _running(world, "h-one", token_budget=800)
    ours = receipt(world.hospitals["h-one"], "h-one", sid, 1, 40)
    stranger = receipt(world.hospitals["h-two"], "h-two", sid, 1, 500)
    world.runtime.lifecycle.on_round(sid, 1, {"loss": 0.5}, [ours, stranger])
    logged = _study_entries(world, sid, "round.receipt")
    assert [e.payload["hospital"] for e in logged] == ["hospital:h-one"]
    (round_entry,) = _study_entries(world, sid, "study.round")
    assert round_entry.payload["hospitals"] == ["hospital:h-one"]
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    assert [c["hospital_id"] for c in results["contributions"]] == ["h-one"]
    assert fold(world) == served_balances(world)


# ---------------------------------------------------------------- 2: failed rounds
def test_failed_round_is_logged_not_completed_and_refunded(world: World) -> None:
    sid = _running(world, "h-one", "h-two", token_budget=900, rounds=3)
    c = world.runtime.lifecycle
    first = [receipt(world.hospitals[h], h, sid, 1, 10) for h in ("h-one", "h-two")]
    c.on_round(sid, 1, {"loss": 0.4}, first)
    failed = [receipt(world.hospitals["h-one"], "h-one", sid, 2, 10, epsilon_total=0.9)]
    c.on_round(sid, 2, {"round_failed": 1.0}, failed)
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "running" and study["rounds_completed"] == 1
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    assert [r["round"] for r in results["rounds"]] == [1]
    assert [(r["round"], r["metrics"]) for r in results["failed_rounds"]] == [(2, {"round_failed": 1.0})]
    # the failed round's receipt is in the log and in the contributions (privacy spent)
    assert sorted((e.payload["round"], e.payload["hospital"])
                  for e in _study_entries(world, sid, "round.receipt")) == [
        (1, "hospital:h-one"), (1, "hospital:h-two"), (2, "hospital:h-one")]
    per = {x["hospital_id"]: x for x in results["contributions"]}
    assert per["h-one"]["rounds"] == 2 and per["h-one"]["epsilon_spent"] == 0.9
    c.on_failed(sid, "round 2: too few hospitals answered")
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "failed" and study["rounds_completed"] == 1
    assert not _study_entries(world, sid, "study.payout")
    (refund,) = _study_entries(world, sid, "study.refund")
    assert refund.payload["amount"] == 900
    balances = served_balances(world)["balances"]
    assert balances["org:acme"] == 50_000
    assert balances.get("hospital:h-one", 0) == 0
    assert fold(world) == served_balances(world)


# ---------------------------------------------------------------- 3: late decisions
def test_late_refusal_is_recorded_and_shown_without_changing_the_study(world: World) -> None:
    sid = _running(world, "h-one")
    before = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    response = world.decide("h-two", sid, "refuse", ["policy: no more studies this quarter"])
    assert response.status_code == 201, response.text
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "running" and study["started_at"] == before["started_at"]
    assert (study["approvals"], study["refusals"]) == (1, 0)
    by = {d["hospital_id"]: d for d in study["decisions"]}
    assert (by["h-one"]["late"], by["h-two"]["late"]) == (False, True)
    assert by["h-two"]["decision"] == "refuse"
    assert by["h-two"]["reasons"] == ["policy: no more studies this quarter"]
    # the hospital's own signed entry is in the log, unchanged
    (entry,) = [e for e in _study_entries(world, sid, "study.decision")
                if e.payload["hospital"] == "hospital:h-two"]
    assert entry.key_id == world.hospitals["h-two"].key_id
    entry.verify_signature(b64decode(world.hospitals["h-two"].public_key_b64))
    # no second decision, late or not, and a late approval never joins
    size = world.runtime.audit_log.size()
    again = world.decide("h-two", sid, "refuse", ["another reason"])
    assert again.status_code == 409 and "already decided" in again.json()["detail"]
    joining = world.decide("h-three", sid, "approve")
    assert joining.status_code == 409 and "decisions are closed" in joining.json()["detail"]
    assert world.runtime.audit_log.size() == size
    assert "h-three" not in {d["hospital_id"] for d in
                             world.as_("alice", "GET", f"/v1/studies/{sid}").json()["decisions"]}
    # a late refuser's receipt is not taken either (it never approved)
    world.runtime.lifecycle.on_round(sid, 1, {"loss": 0.3}, [
        receipt(world.hospitals["h-two"], "h-two", sid, 1, 10)])
    assert not _study_entries(world, sid, "round.receipt")


def test_late_refusal_of_an_ended_study_is_recorded(world: World) -> None:
    sid = world.submit()["id"]
    assert world.as_("alice", "POST", f"/v1/studies/{sid}/cancel", json={}).status_code == 200
    response = world.decide("h-three", sid, "refuse", ["ethics board: no"])
    assert response.status_code == 201, response.text
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "cancelled"
    assert [(d["hospital_id"], d["late"], d["reasons"]) for d in study["decisions"]] == [
        ("h-three", True, ["ethics board: no"])]
    assert fold(world) == served_balances(world)


# ---------------------------------------------------------------- 4: cancellation race
def test_receipts_of_a_cancelled_studys_in_flight_round_are_logged_not_paid(world: World) -> None:
    sid = _running(world, "h-one", "h-two", token_budget=600)
    c = world.runtime.lifecycle
    first = [receipt(world.hospitals[h], h, sid, 1, 10) for h in ("h-one", "h-two")]
    c.on_round(sid, 1, {"loss": 0.4}, first)
    cancelled = world.as_("alice", "POST", f"/v1/studies/{sid}/cancel", json={"reason": "stop"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # the run reports round 2, which the hospitals trained before the stop reached them
    late = [receipt(world.hospitals[h], h, sid, 2, 10, epsilon_total=1.25) for h in ("h-one", "h-two")]
    stranger = receipt(world.hospitals["h-three"], "h-three", sid, 2, 10)
    c.on_round(sid, 2, {"loss": 0.35}, [*late, stranger])
    unpaid = _study_entries(world, sid, "study.unpaid_receipt")
    assert [e.payload["hospital"] for e in unpaid] == ["hospital:h-one", "hospital:h-two"]
    for wrapper, original in zip(unpaid, late, strict=True):
        assert wrapper.key_id == c.journal.coordinator.key_id
        inner = Entry.from_json(wrapper.payload["receipt"])
        assert inner.to_json() == original.to_json()
        hospital = wrapper.payload["hospital"].removeprefix("hospital:")
        inner.verify_signature(b64decode(world.hospitals[hospital].public_key_b64))
    # not a completed round, not a ledger receipt, nothing paid: the whole budget came back
    assert [e.payload["round"] for e in _study_entries(world, sid, "study.round")] == [1]
    assert {e.payload["round"] for e in _study_entries(world, sid, "round.receipt")} == {1}
    assert "study.payout" not in kinds(world)
    balances = served_balances(world)["balances"]
    assert balances["org:acme"] == 50_000 and balances.get("hospital:h-one", 0) == 0
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["rounds_completed"] == 1
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    per = {x["hospital_id"]: x for x in results["contributions"]}
    assert set(per) == {"h-one", "h-two"}
    assert per["h-one"]["rounds"] == 2 and per["h-one"]["epsilon_spent"] == 1.25
    # the same round reported again adds nothing
    size = world.runtime.audit_log.size()
    c.on_round(sid, 2, {"loss": 0.35}, late)
    assert world.runtime.audit_log.size() == size
    assert fold(world) == served_balances(world)
