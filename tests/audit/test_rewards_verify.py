"""End to end: a tampered payout, re-signed by the coordinator key, fails the auditor's verify.

The log is written as a real export (entries.jsonl, a checkpoint signed by the log key over the
tampered entries, trust.json), so every other check passes: signatures, keyring, Merkle root. Only
the ledger's recomputation of the payout can catch it, and the verifier must name that entry.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from audit.checkpoint import Checkpoint, sign_checkpoint
from audit.entry import Entry
from audit.export import Trust, write_entries_export
from audit.generate import generate_log
from audit.ledger import Ledger
from audit.merkle import MemoryTree, leaf_hash
from audit.signing import Signer
from audit.verify import verify_export
from tests.audit.test_ledger_example import EXPECTED_PAYOUT
from tests.audit.test_ledger_support import World

ORIGIN = "exchange.example/rewards-test"


CLAIMS = [("hospital:a", 1, "reward:p1", 106), ("hospital:b", 2, "reward:p3", 70)]


def example_log(payout: dict[str, Any]) -> World:
    """The worked example of docs/rewards.md, plus two claims after the payout."""
    world = World()
    world.mint("org:acme", 25000)
    world.escrow("s-1", "org:acme", 10000, "author:alice", 500, 3000)
    world.receipt("s-1", 1, "hospital:a", 120, {"reward:p1": 1, "reward:p2": 1})
    world.receipt("s-1", 1, "hospital:b", 90, {"reward:p3": 1})
    world.receipt("s-1", 1, "hospital:c", 13)
    world.receipt("s-1", 2, "hospital:a", 100, {"reward:p1": 1, "reward:p2": 1})
    world.receipt("s-1", 2, "hospital:b", 80, {"reward:p3": 1})
    world.sign(world.coordinator, "model.stored", {"study_id": "s-1", "sha256": "ab" * 32})
    world.payout(payout)
    world.mint("org:beta", 7)
    for hospital, round_number, account, amount in CLAIMS:
        world.claim("s-1", hospital, round_number, account, amount)
    return world


def expected_fold(world: World) -> dict[str, Any]:
    claimed = {"claim:" + world.openings[("s-1", h, r)][a].holder: x for h, r, a, x in CLAIMS}
    balances = {"author:alice": 500, "hospital:a": 3631, "hospital:b": 2805, "hospital:c": 215,
                "org:acme": 15000, "org:beta": 7, **claimed}
    return {"minted": 25007, "escrow": 0, "unclaimed": 2849 - 176,
            "balances": dict(sorted(balances.items()))}


def export(world: World, entries: list[Entry], folder: Path) -> Path:
    log_key = Signer.generate()
    tree = MemoryTree(leaf_hash(entry.leaf_bytes()) for entry in entries)
    note = sign_checkpoint(Checkpoint(ORIGIN, tree.size, tree.root()), log_key)
    write_entries_export(folder, entries, note, Trust(ORIGIN, world.operator.public_key,
                                                      log_key.public_key))
    return folder


def test_honest_export_verifies_and_recomputes_balances(tmp_path: Path) -> None:
    world = example_log(EXPECTED_PAYOUT)
    report = verify_export(export(world, world.entries, tmp_path / "log"))
    assert report.ok, report.problem
    assert report.ledger_checked
    assert report.ledger is not None
    pools = report.ledger.pop("claim_pools")
    assert report.ledger == expected_fold(world)
    assert [(p["hospital"], p["round"], p["pool"], p["paid"], p["remaining"]) for p in pools] == [
        ("hospital:a", 1, 848, 106, 742), ("hospital:a", 2, 707, 0, 707),
        ("hospital:b", 1, 636, 0, 636), ("hospital:b", 2, 566, 70, 496), ("hospital:c", 1, 92, 0, 92)]
    assert sum(p["remaining"] for p in pools) == report.ledger["unclaimed"]


def test_tampered_payout_resigned_by_coordinator_is_named(tmp_path: Path) -> None:
    # Move one unit from hospital a's kept part to its round-1 claim pool: the payout still sums
    # to 10000, so conservation alone would not notice; the recomputation does.
    tampered = copy.deepcopy(EXPECTED_PAYOUT)
    tampered["hospitals"][0]["pools"][0]["pool"] += 1
    tampered["hospitals"][0]["pool"] += 1
    tampered["hospitals"][0]["kept"] -= 1
    world = example_log(tampered)
    payout_index = next(i for i, e in enumerate(world.entries) if e.kind == "study.payout")
    assert world.entries[payout_index].key_id == world.coordinator.key_id

    report = verify_export(export(world, world.entries, tmp_path / "log"))
    assert not report.ok
    assert report.problem is not None
    assert report.problem.index == payout_index
    assert "hospitals[0].kept: entry says 3630, the fold computes 3631" in report.problem.reason
    assert "hospitals[0].pools[0].pool: entry says 849, the fold computes 848" in report.problem.reason
    assert report.ledger is None  # no balances are reported from a bad log


def test_overpaying_royalty_is_named(tmp_path: Path) -> None:
    tampered = copy.deepcopy(EXPECTED_PAYOUT)
    tampered["royalty"]["amount"] = 501
    world = example_log(tampered)
    report = verify_export(export(world, world.entries, tmp_path / "log"))
    assert report.problem is not None
    assert report.problem.index == next(i for i, e in enumerate(world.entries) if e.kind == "study.payout")
    assert "royalty.amount: entry says 501, the fold computes 500" in report.problem.reason


def test_generated_log_payouts_agree_with_compute_payout(tmp_path: Path) -> None:
    """The audit generator's payouts (its own builder) are accepted by the one fold."""
    log = generate_log(3000, seed=7)
    ledger = Ledger(log.operator.key_id)
    ledger.apply_all(log.entries)
    ledger.state.check_conservation()
    assert any(study.paid for study in ledger.studies.values())
    assert any(study.refunded for study in ledger.studies.values())


AUDIT = str(Path(sys.executable).with_name("audit"))


def test_audit_cli_rewards_prints_the_fold_and_verify_names_the_tampered_payout(tmp_path: Path) -> None:
    """The real `audit` console script, as an auditor runs it."""
    world = example_log(EXPECTED_PAYOUT)
    folder = export(world, world.entries, tmp_path / "honest")
    shown = subprocess.run([AUDIT, "rewards", str(folder)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert len(printed.pop("claim_pools")) == 5
    assert printed == expected_fold(world)
    assert "reward:" not in shown.stdout

    tampered = copy.deepcopy(EXPECTED_PAYOUT)
    tampered["hospitals"][2]["amount"] += 1
    tampered["hospitals"][2]["kept"] += 1
    tampered["hospitals"][1]["amount"] -= 1
    tampered["hospitals"][1]["kept"] -= 1
    bad = example_log(tampered)
    payout_index = next(i for i, e in enumerate(bad.entries) if e.kind == "study.payout")
    checked = subprocess.run([AUDIT, "verify", str(export(bad, bad.entries, tmp_path / "bad"))],
                             capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 1
    said = checked.stdout + checked.stderr
    assert f"entry {payout_index}" in said
    assert "hospitals[1].amount: entry says 4006, the fold computes 4007" in said


def test_audit_rewards_checks_sweeps_of_unclaimed_rewards(tmp_path: Path) -> None:
    """Issue 14: unclaimed rewards swept after the claim window. `audit rewards` accepts the
    honest sweeps (conservation exact, every pool emptied) and names a sweep made before the
    window closed, even though the coordinator key signed it."""
    world = World()
    world.mint("org:acme", 1000)
    world.escrow("s-1", "org:acme", 800, None, 0, 5000,
                 unclaimed={"after_s": 86_400, "to": "operator:consortium"})
    world.receipt("s-1", 1, "hospital:a", 40, {"reward:p1": 1, "reward:p2": 1})
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    world.payout(ledger.expected_payout("s-1", 800))
    world.claim("s-1", "hospital:a", 1, "reward:p1", pool=400)  # 50 of the pool of 400
    early = list(world.entries)
    early.append(world.sweep("s-1", "hospital:a", 1, 350, "operator:consortium"))
    world.drop_last()
    world.later = timedelta(days=1)
    world.sweep("s-1", "hospital:a", 1, 350, "operator:consortium")

    shown = subprocess.run([AUDIT, "rewards", str(export(world, world.entries, tmp_path / "honest"))],
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    (pool,) = printed.pop("claim_pools")
    assert (pool["pool"], pool["paid"], pool["swept"], pool["remaining"]) == (400, 50, 350, 0)
    assert printed["unclaimed"] == 0 and printed["balances"]["operator:consortium"] == 350
    assert printed["minted"] == sum(printed["balances"].values()) + printed["escrow"]
    assert "reward:" not in shown.stdout

    report = verify_export(export(world, early, tmp_path / "early"))
    assert report.problem is not None and report.problem.index == len(early) - 1
    assert "reward.sweep: time: the claim window is open until" in report.problem.reason
