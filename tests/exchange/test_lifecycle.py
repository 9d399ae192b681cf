"""The study lifecycle end to end through the HTTP API, on SQLite and PostgreSQL.

Each state change must leave its signed entry in the log, and the log alone must give the
same balances as the coordinator serves (the auditor's fold, audit.ledger.Ledger)."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from safetensors.numpy import load as load_safetensors

from audit.entry import Entry
from audit.keyring import Keyring
from audit.ledger import Ledger
from audit.merkle import leaf_hash, root_from_inclusion_proof, verify_consistency
from audit.signing import b64decode
from tests.exchange.conftest import World, receipt, study_body


def log_entries(world: World) -> list[Entry]:
    return list(world.runtime.audit_log.entries())


def fold(world: World) -> dict:
    """What an auditor computes from the log alone, signatures and signers checked."""
    operator_key = world.runtime.journal.operator.public_key
    keyring = Keyring(operator_key)
    ledger = Ledger(world.runtime.journal.operator.key_id)
    for index, entry in enumerate(log_entries(world)):
        keyring.check(entry, index)
        keyring.apply(entry, index)
        ledger.apply(entry, index)
    return ledger.state.to_json()


def served_balances(world: World) -> dict:
    response = world.as_("auditor", "GET", "/v1/ledger/balances")
    assert response.status_code == 200
    return response.json()


def kinds(world: World) -> list[str]:
    return [e.kind for e in log_entries(world)]


def test_submission_escrows_budget_with_entries(world: World) -> None:
    before = world.runtime.audit_log.size()
    study = world.submit(token_budget=1234)
    assert study["status"] == "submitted"
    entries = log_entries(world)[before:]
    assert [e.kind for e in entries] == ["study.submit", "study.escrow"]
    assert entries[1].payload["amount"] == 1234 and entries[1].payload["account"] == "org:acme"
    assert entries[1].key_id == world.runtime.journal.coordinator.key_id
    balances = served_balances(world)
    assert balances["balances"]["org:acme"] == 50_000 - 1234
    assert balances["escrow"] == 1234
    assert fold(world) == {**balances, "balances": {**balances["balances"]}}


def test_complete_study_pays_out_by_receipts_and_log_agrees(world: World) -> None:
    study = world.submit(token_budget=10_000, rounds=2, min_hospitals=3)
    sid = study["id"]
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, sid).status_code == 201
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "submitted"
    assert world.decide("h-three", sid).status_code == 201
    world.wait_runs()
    done = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert done["status"] == "completed", done
    assert done["rounds_completed"] == 2 and done["approvals"] == 3
    # Records: h-one 120/round, h-two 90, h-three 13 over 2 rounds: shares apportion(10000,
    # [240, 180, 26]) = 5381, 4036, 583; the forward share (30 %) of each goes to its claim pools.
    served = served_balances(world)
    balances = served["balances"]
    assert balances["hospital:h-one"] == 5381 - 1614 and balances["hospital:h-two"] == 4036 - 1210
    assert balances["hospital:h-three"] == 583 - 174
    assert served["unclaimed"] == 1614 + 1210 + 174
    assert fold(world) == served_balances(world)
    assert kinds(world)[-3:] == ["study.round", "study.complete", "study.payout"]
    # Results: metrics per round, records and epsilon per hospital.
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    by_hospital = {c["hospital_id"]: c for c in results["contributions"]}
    assert by_hospital["h-one"]["records_used"] == 240 and by_hospital["h-one"]["rounds"] == 2
    assert by_hospital["h-three"]["epsilon_spent"] == 0.2
    model = world.as_("alice", "GET", f"/v1/studies/{sid}/model")
    assert model.status_code == 200
    assert hashlib.sha256(model.content).hexdigest() == done["model_sha256"]
    assert model.headers["digest-sha256"] == done["model_sha256"]
    assert set(load_safetensors(model.content)) == {"weight", "bias"}
    # The log records the model hash, signed by the coordinator.
    complete = next(e for e in log_entries(world) if e.kind == "study.complete")
    assert complete.payload["model_sha256"] == done["model_sha256"]


def test_refusal_reasons_reach_the_researcher(world: World) -> None:
    sid = world.submit()["id"]
    response = world.decide("h-one", sid, "refuse", ["policy: max epsilon per study is 1.0"])
    assert response.status_code == 201
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["refusals"] == 1
    assert study["decisions"][0]["reasons"] == ["policy: max epsilon per study is 1.0"]
    assert study["decisions"][0]["hospital_id"] == "h-one"
    # A second decision by the same hospital is refused and not logged.
    size = world.runtime.audit_log.size()
    assert world.decide("h-one", sid, "approve").status_code == 409
    assert world.runtime.audit_log.size() == size


def test_refusal_without_reason_is_refused(world: World) -> None:
    sid = world.submit()["id"]
    size = world.runtime.audit_log.size()
    response = world.decide("h-one", sid, "refuse", [])
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "payload.reasons"
    assert world.runtime.audit_log.size() == size


def test_cancel_submitted_study_refunds_escrow(world: World) -> None:
    sid = world.submit(token_budget=700)["id"]
    assert served_balances(world)["balances"]["org:acme"] == 50_000 - 700
    response = world.as_("alice", "POST", f"/v1/studies/{sid}/cancel", json={"reason": "wrong cohort"})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["outcome_reason"] == "wrong cohort"
    assert served_balances(world)["balances"]["org:acme"] == 50_000
    assert kinds(world)[-2:] == ["study.cancel", "study.refund"]
    assert world.as_("alice", "POST", f"/v1/studies/{sid}/cancel", json={}).status_code == 409
    assert fold(world) == served_balances(world)


def test_cancel_running_study_stops_the_run(world: World) -> None:
    world.runner.pause = threading.Event()
    sid = world.submit(min_hospitals=1, rounds=3)["id"]
    world.decide("h-one", sid)
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "running"
    response = world.as_("anna", "POST", f"/v1/studies/{sid}/cancel", json={})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    world.runner.pause.set()
    world.wait_runs()
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "cancelled" and study["rounds_completed"] == 0
    assert "study.round" not in kinds(world)
    assert served_balances(world)["balances"]["org:acme"] == 50_000
    assert fold(world) == served_balances(world)


def test_failed_run_refunds(world: World) -> None:
    world.runner.fail_at_round = 2
    sid = world.submit(min_hospitals=1, rounds=3, token_budget=900)["id"]
    world.decide("h-two", sid)
    world.wait_runs()
    study = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert study["status"] == "failed" and "round 2" in study["outcome_reason"]
    assert study["rounds_completed"] == 1
    assert kinds(world)[-2:] == ["study.fail", "study.refund"]
    assert served_balances(world)["balances"]["org:acme"] == 50_000
    assert world.as_("alice", "GET", f"/v1/studies/{sid}/model").status_code == 409
    assert fold(world) == served_balances(world)


def test_hospital_delivers_its_own_receipt(world: World) -> None:
    world.runner.pause = threading.Event()
    sid = world.submit(min_hospitals=1, rounds=1)["id"]
    world.decide("h-one", sid)
    entry = receipt(world.hospitals["h-one"], "h-one", sid, 1, 77, {"reward:p1": 7})
    response = world.signed("h-one", "POST", "/v1/hospital/entries", json=entry.to_json())
    assert response.status_code == 201, response.text
    # The same receipt again: refused (one per study, round, hospital), nothing logged.
    size = world.runtime.audit_log.size()
    again = world.signed("h-one", "POST", "/v1/hospital/entries", json=entry.to_json())
    assert again.status_code == 409
    assert world.runtime.audit_log.size() == size
    # A hospital that did not join cannot deliver receipts for the study.
    other = receipt(world.hospitals["h-two"], "h-two", sid, 1, 5)
    assert world.signed("h-two", "POST", "/v1/hospital/entries", json=other.to_json()).status_code == 403
    world.runner.pause.set()
    world.wait_runs()
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    assert results["contributions"] == [{"hospital_id": "h-one", "rounds": 1, "records_used": 77,
                                         "epsilon_spent": 0.5}]
    served = served_balances(world)
    assert served["unclaimed"] > 0 and not any(a.startswith("reward:") for a in served["balances"])
    assert fold(world) == served_balances(world)


def test_audit_endpoints_prove_inclusion_and_consistency(world: World) -> None:
    world.submit()
    first = world.as_("auditor", "GET", "/v1/audit/checkpoint").json()
    world.submit()
    second = world.as_("h-one", "GET", "/v1/audit/checkpoint").json()
    assert second["size"] == first["size"] + 2
    page = world.as_("auditor", "GET", "/v1/audit/entries", params={"start": 0, "limit": 5}).json()
    assert [item["index"] for item in page["items"]] == [0, 1, 2, 3, 4] and page["next_start"] == 5
    proof = world.as_("bob", "GET", "/v1/audit/proofs/inclusion",
                      params={"index": 3, "size": second["size"]}).json()
    entry = Entry.from_json(page["items"][3]["entry"])
    assert b64decode(proof["leaf_hash"]) == leaf_hash(entry.leaf_bytes())
    root = root_from_inclusion_proof(leaf_hash(entry.leaf_bytes()), 3, second["size"],
                                     [b64decode(p) for p in proof["proof"]])
    assert root == b64decode(second["root_hash"])
    consistency = world.as_("auditor", "GET", "/v1/audit/proofs/consistency",
                            params={"old_size": first["size"], "new_size": second["size"]}).json()
    verify_consistency(first["size"], second["size"], [b64decode(p) for p in consistency["proof"]],
                       b64decode(first["root_hash"]), b64decode(second["root_hash"]))
    export = world.as_("auditor", "GET", "/v1/audit/export")
    lines = export.content.splitlines()
    assert len(lines) == world.runtime.audit_log.size()
    assert lines[3] == entry.leaf_bytes()


def test_revoked_api_key_stops_working(world: World) -> None:
    issued = world.as_("operator", "POST", "/v1/api-keys",
                       json={"role": "researcher", "organisation_id": "acme", "researcher_id": "anna"})
    assert issued.status_code == 201
    token = issued.json()["key"]
    headers = {"X-API-Key": token}
    assert world.client.get("/v1/studies", headers=headers).status_code == 200
    revoked = world.as_("operator", "DELETE", f"/v1/api-keys/{issued.json()['prefix']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert world.client.get("/v1/studies", headers=headers).status_code == 401
    assert kinds(world)[-2:] == ["apikey.issue", "apikey.revoke"]
    # The secret is nowhere in the database or the log.
    assert all(token not in e.leaf_bytes().decode() for e in log_entries(world))


def test_hospital_key_rotation(world: World) -> None:
    from audit.entry import sign_entry
    from audit.signing import Signer

    old = world.hospitals["h-one"]
    new = Signer.generate()
    rotation = sign_entry(old, "key.rotate", {"old_key_id": old.key_id, "new_key_id": new.key_id,
                                              "new_public_key": new.public_key_b64})
    response = world.signed("h-one", "POST", "/v1/hospital/entries", json=rotation.to_json())
    assert response.status_code == 201, response.text
    assert world.signed("h-one", "GET", "/v1/hospital/me").status_code == 401
    me = world.signed("h-one", "GET", "/v1/hospital/me", signer=new)
    assert me.status_code == 200 and me.json()["signing_key_id"] == new.key_id
    fold(world)  # the keyring accepts the rotation and everything after it


def test_concurrent_submissions_share_commits_and_stay_exact(world: World) -> None:
    """Many researchers submit at once (group commit): each accepted submission escrows exactly
    its budget, the ones the balance cannot cover are refused and leave nothing behind, and the
    auditor's fold over the log equals the served balances."""
    from concurrent.futures import ThreadPoolExecutor

    balance = served_balances(world)["balances"]["org:globex"]  # 5000
    before = world.runtime.audit_log.size()

    def submit(i: int) -> int:
        body = study_body(token_budget=400, title=f"s{i}")
        return world.as_("bob", "POST", "/v1/studies", json=body).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(submit, range(20)))
    accepted = codes.count(201)
    assert accepted == balance // 400 and codes.count(422) == 20 - accepted
    assert served_balances(world)["balances"]["org:globex"] == balance - 400 * accepted
    assert world.runtime.audit_log.size() == before + 2 * accepted
    assert fold(world) == served_balances(world)


def test_export_and_trust_verify_offline(world: World, tmp_path: Path) -> None:
    """What an auditor downloads (entries + checkpoint + trust roots) verifies with the audit
    package alone, and its fold equals the served balances."""
    from audit.checkpoint import verify_checkpoint
    from audit.trust import Trust

    world.submit()
    trust = Trust.from_json(world.as_("auditor", "GET", "/v1/audit/trust").json())
    checkpoint = world.as_("auditor", "GET", "/v1/audit/checkpoint").json()
    verify_checkpoint(checkpoint["checkpoint"], trust.log_public_key, trust.log_key_name,
                      trust.origin)
    lines = world.as_("auditor", "GET", "/v1/audit/export").content.splitlines()
    entries = [Entry.from_json(json.loads(line)) for line in lines]
    keyring = Keyring(trust.operator_public_key)
    for index, entry in enumerate(entries):
        keyring.check(entry, index)
        keyring.apply(entry, index)
    assert len(entries) == checkpoint["size"]


def test_study_list_pages(world: World) -> None:
    ids = [world.submit(title=f"t{i}", token_budget=5)["id"] for i in range(5)]
    first = world.as_("alice", "GET", "/v1/studies", params={"limit": 2}).json()
    assert first["total"] == 5 and len(first["items"]) == 2 and first["next_offset"] == 2
    seen = [s["id"] for s in first["items"]]
    offset = first["next_offset"]
    while offset is not None:
        page = world.as_("alice", "GET", "/v1/studies", params={"limit": 2, "offset": offset}).json()
        seen += [s["id"] for s in page["items"]]
        offset = page["next_offset"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    cancelled = world.as_("alice", "POST", f"/v1/studies/{ids[0]}/cancel", json={})
    assert cancelled.status_code == 200
    only = world.as_("alice", "GET", "/v1/studies", params={"status": "cancelled"}).json()
    assert [s["id"] for s in only["items"]] == [ids[0]]


def test_payout_uses_the_terms_recorded_at_escrow_not_todays_settings(world: World) -> None:
    """Settings change between submission and completion (royalty and forward share): the
    payout follows the study.escrow entry's terms, so the auditor's fold accepts it."""
    from exchange.study.lifecycle import Terms

    coordinator = world.runtime.lifecycle
    coordinator.terms = Terms(forward_bps=3000, royalties={"logistic_regression": ("org:globex", 1000)})
    sid = world.submit(token_budget=10_000, rounds=2, min_hospitals=3)["id"]
    escrow = next(e for e in log_entries(world) if e.kind == "study.escrow"
                  and e.payload["study_id"] == sid)
    assert escrow.payload["royalty_account"] == "org:globex" and escrow.payload["royalty_bps"] == 1000
    # The operator changes the settings while the study is open.
    coordinator.terms = Terms(forward_bps=0, royalties={"logistic_regression": ("org:acme", 5000)})
    for hospital in ("h-one", "h-two", "h-three"):
        assert world.decide(hospital, sid).status_code == 201
    world.wait_runs()
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "completed"
    payout = next(e for e in log_entries(world) if e.kind == "study.payout"
                  and e.payload["study_id"] == sid)
    assert payout.payload["royalty"] == {"account": "org:globex", "amount": 1000}
    assert sum(h["amount"] for h in payout.payload["hospitals"]) == 9000
    served = served_balances(world)
    assert served["balances"]["org:globex"] == 5_000 + 1000
    assert served["balances"]["org:acme"] == 50_000 - 10_000
    assert fold(world) == served  # the auditor's fold accepts every entry and agrees


def test_balances_follow_appends_made_by_another_process(world: World, tmp_path: Path) -> None:
    """A mint by a second coordinator on the same database (as `exchange admin` does) shows in
    the served balances without a restart: the fold moves forward from the log itself."""
    from exchange.coordinator.app import build_runtime
    from tests.exchange.scripted_runner import ScriptedRunner

    other = build_runtime(world.runtime.config, ScriptedRunner(hospital_keys={}, records={}))
    try:
        other.registry.mint("org:clinics", 777)
    finally:
        other.close()
    assert served_balances(world)["balances"]["org:clinics"] == 777
    assert fold(world) == served_balances(world)


def test_hospitals_list_shows_each_hospitals_last_contact(world: World) -> None:
    """Issue 21 item 12: the operator sees when each hospital last made a signed request."""
    before = {h["id"]: h["last_contact_at"] for h in
              world.as_("operator", "GET", "/v1/hospitals").json()}
    assert before["h-two"] is None
    assert world.as_("h-two", "GET", "/v1/hospital/studies").status_code == 200
    after = {h["id"]: h["last_contact_at"] for h in
             world.as_("operator", "GET", "/v1/hospitals").json()}
    assert after["h-two"] is not None
    assert datetime.fromisoformat(after["h-two"]) >= datetime.now(UTC) - timedelta(minutes=5)
    assert after["h-one"] == before["h-one"]
