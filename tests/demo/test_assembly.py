"""The demo's report is assembled from real records, and every cross-check can fail.

Records here are real artefacts made by the parts' own code, without starting any process:
hospital sites (records Parquet, signed consent contracts from the synthetic mix, a privacy
ledger database) written by `federated.runtime.demo_sites`; consent gated with the ClientApp's
`Site.gate` at each round's instant; receipts signed with the hospitals' keys
(`federated.receipts.make_receipt`); the escrow, rounds and payout as signed log entries, the
payout computed by `audit.rewards.compute_payout`. The node side is read back by the demo's
collector (`exchange.demo.collect.hospital_records`), exactly as after a real run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from audit.entry import Entry, sign_entry
from audit.reward_commitment import commit
from audit.rewards import Receipt as PayoutReceipt
from audit.rewards import StudyTerms, compute_payout, payout_credits, payout_pools
from audit.signing import Signer
from consent.model import revoke, sign
from consent.synthetic import make_signed_contracts
from exchange.demo.collect import hospital_records
from exchange.demo.consortium import RESEARCH_ORG, RESEARCH_REGION, RESEARCHER, DemoConfig, study_body
from exchange.demo.report import (
    REQUIRED_HOSPITAL_FIELDS,
    HospitalRecords,
    assemble_report,
    failed_checks,
    validate_report,
    write_report,
)
from exchange.study.spec import AcceptedStudy, consent_request

STUDY = "st-demo-assembly"
HOSPITALS = ("hospital-a", "hospital-b")
ROUND_TIMES = (datetime(2026, 11, 1, 10, 0, tzinfo=UTC), datetime(2026, 11, 1, 10, 5, tzinfo=UTC))
REVOKED_AT = datetime(2026, 11, 1, 10, 2, tzinfo=UTC)  # between round 1 and round 2
BUDGET = 10_000
WEIGHT = 640  # a receipt's records_used: expected batch x steps, the study's public terms
MINTED = 50_000


def _write_contracts(site: Any, hospital: str, seed: int) -> set[str]:
    """Replace the site's contracts with a realistic mix, plus two revocations at REVOKED_AT of
    records that round 1 could use; returns the revoked pseudonyms."""
    data, _label = site.records()
    train = data.train()
    issuer = Signer.generate()
    signed = make_signed_contracts(list(data.pseudonyms), hospital, issuer, seed, revoke_fraction=0.0,
                                   issued=datetime(2026, 1, 1, tzinfo=UTC))
    site.contracts_path.write_text("\n".join(json.dumps(s.to_json()) for s in signed) + "\n")
    request = _request()
    eligible = sorted(site.gate(request, train.pseudonyms, ROUND_TIMES[0]).eligible)[:2]
    by_pseudonym = {s.contract.pseudonym: s.contract for s in signed}
    lines = [json.dumps(sign(revoke(by_pseudonym[p], REVOKED_AT), issuer).to_json()) for p in eligible]
    with site.contracts_path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    return set(eligible)


def _request() -> Any:
    return consent_request(AcceptedStudy(study_id=STUDY, spec=_spec(), organisation_id=RESEARCH_ORG,
                                         region=RESEARCH_REGION, researcher_id=RESEARCHER))


def _spec() -> dict[str, Any]:
    body = study_body(DemoConfig(out=Path("unused"), rounds=2, token_budget=BUDGET))
    return dict(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from federated.accounting import DPPlan
    from federated.receipts import make_receipt
    from federated.runtime.demo_sites import provision_sites

    root = tmp_path_factory.mktemp("sites")
    demo = provision_sites(root, hospitals=HOSPITALS)
    coordinator = Signer.generate()
    request = _request()
    spec_hash = "ab" * 32
    receipts: list[Entry] = []
    revoked: dict[str, set[str]] = {}
    for seed, hospital in enumerate(HOSPITALS):
        site = demo[hospital].site
        revoked[hospital] = _write_contracts(site, hospital, seed)
        train = site.records()[0].train()
        ledger = site.ledger()
        plan = DPPlan(target_epsilon=3.0, delta=1e-5, rounds=2, steps_per_round=10, sample_rate=0.5,
                      noise_multiplier=4.25 + seed, batch_size=64, n_patients=len(train), accountant="prv")
        ledger.register_study(STUDY, plan)
        previous = 0.0
        for number, (at, epsilon) in enumerate(zip(ROUND_TIMES, (1.9, 2.95), strict=True), start=1):
            gate = site.gate(request, train.pseudonyms, at, (STUDY, number))
            charge = ledger.charge(STUDY, number, epsilon)
            rewards: dict[str, int] = {}
            for p in gate.eligible:
                account = gate.reward_accounts.get(p)
                if account is not None:
                    key = account if account.startswith("reward:") else f"reward:{account}"
                    rewards[key] = rewards.get(key, 0) + 1
            receipts.append(make_receipt(demo[hospital].signer, study_id=STUDY, round=number,
                                         hospital_id=hospital, records_used=WEIGHT,
                                         commitment=gate.commitment, epsilon_spent=charge.increment,
                                         epsilon_total=epsilon, delta=1e-5, spec_sha256=spec_hash,
                                         rewards=commit(rewards).public(), instant=at).entry)
            previous = epsilon
        assert previous == ledger.spent(STUDY)
    terms = {"study_id": STUDY, "account": f"org:{RESEARCH_ORG}", "amount": BUDGET,
             "royalty_account": "author:exchange-templates", "royalty_bps": 500, "forward_bps": 3000}
    escrow = sign_entry(coordinator, "study.escrow", terms, ROUND_TIMES[0] - timedelta(minutes=1))
    rounds = [sign_entry(coordinator, "study.round", {
        "study_id": STUDY, "round": n, "hospitals": [f"hospital:{h}" for h in HOSPITALS],
        "metrics": {"eval_accuracy": 0.9 + n / 100, "eval_auroc": 0.97, "eval_loss": 0.2,
                    "round_wall_s": 2.5, "eval_macro_f1": 0.8, "eval_accuracy@hospital-a": 0.85 + n / 100,
                    "eval_macro_f1@hospital-a": 0.7, "eval_macro_f1@hospital-b": 0.75}},
        at + timedelta(seconds=3)) for n, at in enumerate(ROUND_TIMES, 1)]
    payout = compute_payout(STUDY, BUDGET, StudyTerms("author:exchange-templates", 500, 3000), [
        PayoutReceipt(STUDY, e.payload["round"], e.payload["hospital"], e.payload["records_used"],
                      e.payload["rewards"]) for e in receipts])
    payout_entry = sign_entry(coordinator, "study.payout", payout, ROUND_TIMES[1] + timedelta(minutes=1))
    credits = payout_credits(payout)
    balances = {"minted": MINTED, "escrow": 0, "unclaimed": sum(payout_pools(payout).values()),
                "balances": {f"org:{RESEARCH_ORG}": MINTED - BUDGET, **credits}}
    study = {"id": STUDY, "title": "t", "status": "completed", "spec": _spec(), "rounds_planned": 2,
             "rounds_completed": 2, "min_hospitals": 2, "token_budget": BUDGET, "model_sha256": "cd" * 32,
             "decisions": [{"hospital_id": h, "decision": "approve", "reasons": ["meets site policy"],
                            "eligible_records": 100} for h in HOSPITALS]}
    entries = [escrow, *receipts, *rounds, payout_entry]
    records = [hospital_records(h, demo[h].site.ledger_url, demo[h].site.node_config(), study_id=STUDY,
                                request=request, receipts=[e for e in receipts
                                                           if e.payload["hospital"] == f"hospital:{h}"])
               for h in HOSPITALS]
    return {"study": study, "entries": entries, "balances": balances, "records": records,
            "receipts": receipts, "revoked": revoked, "coordinator": coordinator, "payout": payout,
            "demo": demo}


def _assemble(world: dict[str, Any], **changes: Any) -> dict[str, Any]:
    args = {"study": world["study"], "entries": world["entries"], "balances": world["balances"],
            "hospitals": world["records"]}
    args.update(changes)
    return assemble_report(**args)


def test_report_numbers_are_the_records_numbers(world: dict[str, Any], tmp_path: Path) -> None:
    report = _assemble(world)
    assert failed_checks(report) == []
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["accuracy"] == pytest.approx(0.92)
    # each hospital's charged hold-out metrics, per round, from the signed study.round entries
    assert report["rounds"][1]["holdout_by_hospital"] == {
        "hospital-a": {"accuracy": pytest.approx(0.87), "macro_f1": 0.7}, "hospital-b": {"macro_f1": 0.75}}
    assert report["rounds"][1]["holdout_macro_f1"] == 0.8
    for h, records in zip(report["hospitals"], world["records"], strict=True):
        assert set(REQUIRED_HOSPITAL_FIELDS) <= set(h)
        mine = [e for e in world["receipts"] if e.payload["hospital"] == f"hospital:{h['id']}"]
        assert h["records_used"] == sum(e.payload["records_used"] for e in mine)
        assert h["records_used"] == 2 * WEIGHT  # the public weight, the same every round
        assert h["epsilon_spent"] == 2.95 and h["steps"] == 20
        assert h["noise_multiplier"] == records.plan["noise_multiplier"]
        part = next(p for p in world["payout"]["hospitals"] if p["hospital"] == f"hospital:{h['id']}")
        assert (h["tokens_paid"], h["tokens_kept"]) == (part["amount"], part["kept"])
        # the two revocations at REVOKED_AT: used in round 1, excluded (denied) from round 2 in the
        # hospital's own gating, while the public receipts do not show them
        first, second = h["rounds"]
        assert second["records_used"] == first["records_used"]
        assert second["records_excluded"]["denied"] == first["records_excluded"].get("denied", 0) + 2
    assert sum(report["payouts"].values()) + sum(report["claim_pools"].values()) == BUDGET
    json_path, html_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["hospitals"][0]["id"] == "hospital-a"
    assert html_path.read_text().count("<svg") == 4
    # no reward account (nor pseudonym) in the report: they never left the hospitals
    for text in (json_path.read_text(), html_path.read_text()):
        assert "reward:" not in text


def test_a_payout_that_differs_from_the_receipts_is_reported(world: dict[str, Any]) -> None:
    payout = json.loads(json.dumps(world["payout"]))
    payout["hospitals"][0]["kept"] -= 1
    payout["hospitals"][1]["kept"] += 1
    forged = sign_entry(world["coordinator"], "study.payout", payout, datetime.now(UTC))
    report = _assemble(world, entries=[*world["entries"][:-1], forged])
    failed = failed_checks(report)
    assert any(f.startswith("payout equals compute_payout") for f in failed)
    assert any(f.startswith("coordinator balances equal the payout credits") for f in failed)


def test_a_receipt_that_disagrees_with_consent_gating_is_reported(world: dict[str, Any]) -> None:
    demo = world["demo"]
    original = world["receipts"][1]  # round 2 of hospital-a: after the revocations
    payload = dict(original.payload)
    payload["commitment"] = "00" * 32  # as if other (pseudonym, contract) pairs had been used
    forged = sign_entry(demo["hospital-a"].signer, "round.receipt", payload, datetime.now(UTC))
    entries = [forged if e is original else e for e in world["entries"]]
    report = _assemble(world, entries=entries)
    failed = failed_checks(report)
    assert any(f.startswith("hospital-a round 2: receipt matches consent gating") for f in failed)


def test_conservation_and_the_ledger_are_checked(world: dict[str, Any]) -> None:
    balances = json.loads(json.dumps(world["balances"]))
    balances["minted"] += 1
    failed = failed_checks(_assemble(world, balances=balances))
    assert failed == [f for f in failed if f.startswith("conservation")] and len(failed) == 1
    records = [replace(world["records"][0], epsilon_spent=1.0), world["records"][1]]
    failed = failed_checks(_assemble(world, hospitals=records))
    assert any(f.startswith("hospital-a: epsilon in receipts equals its privacy ledger") for f in failed)


def test_a_hospital_that_refused_gets_zeros_not_invented_values(world: dict[str, Any]) -> None:
    study = json.loads(json.dumps(world["study"]))
    study["decisions"].append({"hospital_id": "hospital-c", "decision": "refuse",
                               "reasons": ["epsilon 3 exceeds the site maximum per study (2)"],
                               "eligible_records": 120})
    report = _assemble(world, study=study, hospitals=[*world["records"], HospitalRecords(id="hospital-c")])
    c = report["hospitals"][2]
    assert c["decision"] == "refuse" and c["decision_reasons"][0].startswith("epsilon 3")
    assert (c["records_used"], c["tokens_paid"], c["steps"], c["epsilon_spent"]) == (0, 0, 0, 0.0)
    assert c["records_excluded"] == {} and c["rounds"] == []
    assert failed_checks(report) == []


def test_a_refusal_the_coordinator_never_took_comes_from_the_node(world: dict[str, Any]) -> None:
    """Decisions close when a study starts: a late refusal stays at the node, and the report
    says so rather than showing no decision."""
    late = HospitalRecords(id="hospital-c", node_decision={
        "decision": "refuse", "reasons": ["epsilon 3 exceeds the site maximum per study (2)"],
        "eligible_records": 120, "decided_by": "policy"})
    report = _assemble(world, hospitals=[*world["records"], late])
    c = report["hospitals"][2]
    assert c["decision"] == "refuse" and c["decision_source"].startswith("node")
    assert c["decision_reasons"] == ["epsilon 3 exceeds the site maximum per study (2)"]
    assert report["hospitals"][0]["decision_source"] == "coordinator"
