"""End to end: `exchange demo` with the coordinator on PostgreSQL and each hospital on a network
host of its own (`--hosts netns`, tests/e2e/test_across_hosts.py; loopback where namespaces
cannot be made outside CI), as a user runs it (the CLI in its own process), then everything it
claims is checked against the system's own records:

- the study completed and its escrow was paid out exactly as the payout rules compute it from
  the hospitals' signed receipts in the verified log, and tokens are conserved;
- the export in DIR/audit verifies again with the `audit` CLI, and its ledger fold equals the
  balances the coordinator serves;
- report.json has the promised shape, and its numbers are the records' numbers (records used =
  the receipts' sums; epsilon, noise multiplier, sample rate and steps = the node's privacy
  ledger);
- the records revoked mid-study were used before and are not used in any round trained after
  their revocation was imported (recomputed here from the node's exported consent contracts, and
  matched with the commitment each hospital signed);
- no process the demo started is left running;
- with netns: each hospital ran in its own namespace on a non-loopback address, reaching an
  HTTPS coordinator and a TLS SuperLink, and no namespace is left behind.

One run checks both the PostgreSQL coordinator and the placement across hosts: a demo run is the
suite's costliest kind of test (docs/testing.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from audit.entry import Entry, parse_time
from audit.ledger import Ledger
from audit.rewards import Receipt, StudyTerms, compute_payout, payout_credits
from exchange.demo.report import REQUIRED_HOSPITAL_FIELDS
from tests.e2e.test_across_hosts import check_each_hospital_ran_on_its_own_host, namespaces, placement

pytestmark = [pytest.mark.slow, pytest.mark.flower, pytest.mark.postgres]
ROUNDS = 6


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the demo's output folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _entries(folder: Path) -> list[Entry]:
    return [Entry.from_json(json.loads(line)) for line in (folder / "entries.jsonl").read_text().splitlines()
            if line.strip()]


def test_demo_on_postgres_across_hosts(postgres_url: str, tmp_path: Path) -> None:
    """One run of the CLI (it takes a minute or two), then each claim checked in turn."""
    out = tmp_path / "out"
    hosts = placement()
    before = namespaces() if hosts == "netns" else set()
    result = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "demo", "--out", str(out), "--db", postgres_url,
         "--rounds", str(ROUNDS), "--hosts", hosts, "--no-live"],
        capture_output=True, text=True, timeout=900, check=False, env={**os.environ, "COLUMNS": "160"})
    run = {"out": out, "db": postgres_url, "result": result, "leftovers": _our_processes(str(out))}
    check_demo_completes_and_stops_everything(run)
    report = json.loads((out / "report.json").read_text())
    assert report["coordinator_database"].startswith("postgresql")
    check_payout_conserves_tokens_and_matches_the_signed_receipts(run)
    check_export_verifies_with_the_audit_cli(run)
    check_the_export_is_cosigned_by_a_quorum_of_hospital_witnesses(run)
    check_each_hospital_witnessed_the_log_and_proved_its_entries_included(run)
    check_report_shape_and_values_come_from_the_records(run)
    check_revoked_records_are_not_used_after_their_revocation(run)
    if hosts == "netns":
        check_each_hospital_ran_on_its_own_host(run, before)


def _rounds(report: dict[str, Any]) -> int:
    return int(report["study"]["rounds_planned"])


def check_demo_completes_and_stops_everything(demo_run: dict[str, Any]) -> None:
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Cross-checks:" in result.stdout
    assert demo_run["leftovers"] == []
    report = json.loads((demo_run["out"] / "report.json").read_text())
    assert report["study"]["status"] == "completed"
    assert [c for c in report["checks"] if not c["ok"]] == []
    assert (demo_run["out"] / "report.html").read_text().count("<svg") == 4


def check_payout_conserves_tokens_and_matches_the_signed_receipts(demo_run: dict[str, Any]) -> None:
    out: Path = demo_run["out"]
    report = json.loads((out / "report.json").read_text())
    study_id = report["study"]["id"]
    entries = _entries(out / "audit")
    mine = [e for e in entries if isinstance(e.payload, dict) and e.payload.get("study_id") == study_id]
    (escrow,) = [e for e in mine if e.kind == "study.escrow"]
    (payout,) = [e for e in mine if e.kind == "study.payout"]
    receipts = [e for e in mine if e.kind == "round.receipt"]
    assert {e.payload["round"] for e in receipts} == set(range(1, _rounds(report) + 1))
    terms = StudyTerms(escrow.payload["royalty_account"], escrow.payload["royalty_bps"],
                       escrow.payload["forward_bps"])
    expected = compute_payout(study_id, escrow.payload["amount"], terms, [
        Receipt(study_id, e.payload["round"], e.payload["hospital"], e.payload["records_used"],
                e.payload["rewards"]) for e in receipts])
    assert payout.payload == expected
    # The auditor's fold over the whole log: conservation holds and agrees with the report.
    ledger = Ledger()
    state = ledger.apply_all(entries)
    folded = state.to_json()
    assert folded["minted"] == sum(folded["balances"].values()) + folded["escrow"] + folded["unclaimed"]
    assert folded["escrow"] == 0
    assert report["ledger"] == {"minted": folded["minted"], "escrow": folded["escrow"],
                                "unclaimed": folded["unclaimed"],
                                "balances": dict(sorted(folded["balances"].items()))}
    # no reward account anywhere outside the hospitals: not in the log, not in the report
    for text in ((out / "report.json").read_text(), (out / "report.html").read_text(),
                 *(p.read_text() for p in (out / "audit").glob("*.jsonl"))):
        assert "reward:" not in text
    credits = payout_credits(payout.payload)
    for hospital in report["hospitals"]:
        part = next((p for p in payout.payload["hospitals"] if p["hospital"] == f"hospital:{hospital['id']}"),
                    None)
        assert hospital["tokens_paid"] == (part["amount"] if part else 0)
        assert hospital["tokens_kept"] == credits.get(f"hospital:{hospital['id']}", 0)
        assert folded["balances"].get(f"hospital:{hospital['id']}", 0) == hospital["tokens_kept"]


def check_the_export_is_cosigned_by_a_quorum_of_hospital_witnesses(demo_run: dict[str, Any]) -> None:
    """The export holds the coordinator's cosigned checkpoint; `audit verify` enforces the
    trust policy's quorum (a majority of the 3 hospitals' witnesses), and the same export with
    the cosignatures stripped is refused (exit 1), naming the witnesses that did not sign."""
    out: Path = demo_run["out"]
    trust = json.loads((out / "trust.json").read_text())
    assert len(trust["witnesses"]) == 3
    verified = json.loads(subprocess.run(
        [sys.executable, "-m", "audit.cli", "verify", str(out / "audit"), "--trust", str(out / "trust.json"),
         "--json"], capture_output=True, text=True, timeout=300, check=True).stdout)
    assert verified["witnesses"]["quorum"] == 2
    assert len(verified["witnesses"]["signed"]) >= 2
    stripped = out / "audit-uncosigned"
    stripped.mkdir()
    for name in ("entries.jsonl", "trust.json"):
        (stripped / name).write_bytes((out / "audit" / name).read_bytes())
    note = (out / "audit" / "checkpoint").read_text()
    (stripped / "checkpoint").write_text("".join(line for line in note.splitlines(keepends=True)
                                                 if ".witness " not in line))
    refused = subprocess.run([sys.executable, "-m", "audit.cli", "verify", str(stripped), "--trust",
                              str(out / "trust.json")], capture_output=True, text=True, timeout=300,
                             check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "below the quorum of 2" in refused.stdout + refused.stderr


def check_each_hospital_witnessed_the_log_and_proved_its_entries_included(demo_run: dict[str, Any]) -> None:
    """`node status` of each hospital: its witness holds a cosigned checkpoint, no alarm, and
    every decision and receipt it signed is proven included in it."""
    out: Path = demo_run["out"]
    report = json.loads((out / "report.json").read_text())
    for hospital in report["hospitals"]:
        config = out / "work" / hospital["id"] / "node.toml"
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "exchange.cli", "node", "status", "--config", str(config), "--json"],
            capture_output=True, text=True, timeout=120, check=True).stdout)
        assert status["witness"]["state"] == "ok" and not status["witness"]["alarm"], status["witness"]
        if f"{hospital['id']}.witness" in report["audit"]["witnesses"]["signed"]:
            assert status["witness"]["cosigned_size"] >= report["audit"]["entries"]
        inclusion = status["inclusion"]
        assert inclusion["alarm"] is False and inclusion["missing"] == [], inclusion
        assert inclusion["entries_proven"] >= 1  # its decision, and a receipt per round it trained


def check_export_verifies_with_the_audit_cli(demo_run: dict[str, Any]) -> None:
    out: Path = demo_run["out"]
    rounds = _rounds(json.loads((out / "report.json").read_text()))
    result = subprocess.run([sys.executable, "-m", "audit.cli", "verify", str(out / "audit"), "--trust",
                             str(out / "trust.json"), "--json"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    verified = json.loads(result.stdout)
    assert verified["ok"] is True
    assert verified["kinds"]["round.receipt"] >= 2 * rounds
    # Tampering with one receipt's records_used is caught by the same verifier.
    tampered = out / "audit-tampered"
    tampered.mkdir()
    for name in ("checkpoint", "trust.json"):
        if (out / "audit" / name).exists():
            (tampered / name).write_bytes((out / "audit" / name).read_bytes())
    lines = (out / "audit" / "entries.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"round.receipt"' in line)
    lines[index] = lines[index].replace('"records_used":', '"records_used":1', 1)
    (tampered / "entries.jsonl").write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, "-m", "audit.cli", "verify", str(tampered), "--trust",
                          str(out / "trust.json")], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def check_report_shape_and_values_come_from_the_records(demo_run: dict[str, Any]) -> None:
    from sqlalchemy import create_engine

    from federated.privacy_ledger import PrivacyLedger

    out: Path = demo_run["out"]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"study", "rounds", "hospitals"}
    rounds = _rounds(report)
    metric = report["study"].get("metric", "accuracy")
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    for r in report["rounds"]:
        assert isinstance(r["round"], int)
        assert isinstance(r[metric], float) and 0.5 < r[metric] <= 1.0
    study_id = report["study"]["id"]
    receipts = [e for e in _entries(out / "audit") if e.kind == "round.receipt"
                and e.payload["study_id"] == study_id]
    used: dict[str, int] = defaultdict(int)
    for e in receipts:
        used[e.payload["hospital"].removeprefix("hospital:")] += e.payload["records_used"]
    assert len(report["hospitals"]) == 3
    trained = 0
    for h in report["hospitals"]:
        assert set(REQUIRED_HOSPITAL_FIELDS) <= set(h)
        assert h["records_used"] == used.get(h["id"], 0)
        ledger = PrivacyLedger(create_engine(f"sqlite:///{out / 'work' / h['id'] / 'node.db'}"))
        plan = ledger.plan(study_id)
        if h["decision"] == "refuse":
            assert plan is None and h["records_used"] == 0 and h["tokens_paid"] == 0
            assert any("epsilon" in reason for reason in h["decision_reasons"])
            continue
        trained += 1
        assert plan is not None, (h, report["study"], report["rounds"])
        assert h["epsilon_spent"] == ledger.spent(study_id)
        assert 0 < h["epsilon_spent"] <= report["study"]["epsilon"] + 1e-9
        assert h["noise_multiplier"] == plan.noise_multiplier and h["sample_rate"] == plan.sample_rate
        assert h["delta"] == plan.delta == report["study"]["delta"]
        assert h["steps"] == plan.steps_per_round * len(ledger.charges(study_id)) > 0
        # records_used is the receipts' public weight (the same every round), not a count
        assert len({r["records_used"] for r in h["rounds"]}) == 1
        assert h["tokens_paid"] > 0
        ledger.engine.dispose()
    assert trained == 2


def check_revoked_records_are_not_used_after_their_revocation(demo_run: dict[str, Any]) -> None:
    """Recomputed here from the node's own exported files with the ClientApp's gate; the
    signed receipts' commitments must equal these gates, so the hospital committed to sets
    without the revoked records."""
    from consent.model import SignedContract
    from exchange.demo.consortium import RESEARCH_ORG, RESEARCH_REGION, RESEARCHER
    from exchange.node.settings import load_node_settings
    from exchange.node.site_export import node_config
    from federated.runtime.site import Site

    out: Path = demo_run["out"]
    report = json.loads((out / "report.json").read_text())
    study_id = report["study"]["id"]
    entries = _entries(out / "audit")
    (submit,) = [e for e in entries if e.kind == "study.submit" and e.payload["study_id"] == study_id]
    from exchange.study.spec import AcceptedStudy, consent_request

    request = consent_request(AcceptedStudy(study_id=study_id, spec=submit.payload["spec"],
                                            organisation_id=RESEARCH_ORG, region=RESEARCH_REGION,
                                            researcher_id=RESEARCHER))
    revoking = [r for r in report["revocations"] if r["pseudonyms_revoked"] > 0]
    assert revoking, "the demo revokes consent mid-study"
    checked_after = 0
    for item in revoking:
        hospital = item["hospital"]
        settings = load_node_settings(out / "work" / hospital / "node.toml")
        site = Site.from_node_config(node_config(settings))
        contracts = [SignedContract.model_validate_json(line).contract
                     for line in site.contracts_path.read_text().splitlines() if line.strip()]
        revoked = {c.pseudonym for c in contracts if c.version == 2}
        assert len(revoked) == item["pseudonyms_revoked"]
        imported = datetime.fromisoformat(item["imported_at"])
        effective = datetime.fromisoformat(item["effective_at"])
        assert effective <= imported
        train = site.records()[0].train()
        receipts = sorted((e for e in entries if e.kind == "round.receipt"
                           and e.payload["study_id"] == study_id
                           and e.payload["hospital"] == f"hospital:{hospital}"),
                          key=lambda e: e.payload["round"])
        # the run was held while the revocation was imported: no round gated in between
        # (a round gating then would have used the old contracts with the revocation in force)
        assert not [r.payload["round"] for r in receipts if effective <= parse_time(r.time) <= imported]
        first = site.gate(request, train.pseudonyms, parse_time(receipts[0].time),
                          (study_id, receipts[0].payload["round"]))
        assert revoked <= first.eligible, "the revoked records were used before their revocation"
        for receipt in receipts:
            at = parse_time(receipt.time)
            # the commitment is keyed per study and round; the hospital's key opens it
            gate = site.gate(request, train.pseudonyms, at, (study_id, receipt.payload["round"]))
            assert gate.commitment == receipt.payload["commitment"]
            # the public weight does not move when patients revoke
            assert receipt.payload["records_used"] == receipts[0].payload["records_used"]
            if at >= effective:
                checked_after += 1
                assert not revoked & gate.eligible
    assert checked_after >= 1, "at least one round was trained after a revocation took effect"
