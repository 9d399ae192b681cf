"""The node daemon with real Flower processes: a SuperLink, the SuperNode and warm executor the
daemon supervises, and the study's ServerApp run by federated's runner (what the coordinator's
runner does). The coordinator is the real app (its own scripted run is held, so the study stays
"running" there while Flower trains).

One study of 4 rounds checks, in order:
- a consent revoked between rounds excludes those records from the next round: the node's own
  database shows it, while the signed receipts (public) do NOT (their weight is the study's);
- the daemon killed with kill -9 mid-study and restarted brings its SuperNode back, the node
  rejoins, the study completes, and privacy spent is neither double counted nor lost (one
  ledger charge per round; the node's rounds table matches);
- rewards match the contributions, checked on the coordinator's log (exported and folded with
  the audit CLI): the hospital delivers the run's signed receipts itself, the log holds exactly
  those, and the payout is the one the ledger recomputes from them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from audit.cli import app as audit_cli
from audit.entry import Entry
from audit.ledger import Ledger
from audit.rewards import payout_credits
from audit.signing import Signer
from consent.model import revoke
from consent.request import StudyRequest
from exchange.cli import app
from exchange.coordinator.client import HospitalClient
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.models import RoundRow
from exchange.node.privacy import open_ledger
from exchange.node.settings import load_node_settings
from exchange.node.site_export import site_paths
from exchange.node.store import NodeStore
from federated.data import feature_specs, load_federated
from federated.privacy_ledger import privacy_patient_spend
from federated.runtime.deployment import READY_LINE, SuperLinkProcess, free_port
from federated.runtime.server_runner import run_study
from federated.runtime.site import read_records
from federated.study_spec import StudySpec
from tests.node.helpers import ISSUED, gru_contract, live_coordinator, seed_consent, wait_for

pytestmark = [pytest.mark.flower, pytest.mark.slow]

COLUMNS = [s.name.replace(" ", "_") for s in feature_specs("breast_cancer") if s.category == "labs"]
ROUNDS = 4
REVOKED = 30
#: every wait is for an event (a state, a log line, a node online); the deadline only keeps a
#: broken run from hanging, and must cover a daemon importing torch on a loaded 2-core machine
#: before its SuperNode starts (180 s was not always enough)
EVENT_DEADLINE_S = 600.0


class Observer:
    def __init__(self) -> None:
        self.rounds: dict[int, list[Any]] = {}
        self.completed: Any = None
        self.failed: list[str] = []
        self.hooks: dict[int, Any] = {}
        self.hook_errors: list[BaseException] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds[round] = list(receipts)
        if round in self.hooks:
            try:
                self.hooks[round]()
            except BaseException as exc:  # reported by the test, never swallowed
                self.hook_errors.append(exc)

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


def _seed_breast_cancer(store: NodeStore, tmp_path: Path) -> list[str]:
    [data] = load_federated("breast_cancer", 1, hospital_ids=["hospital-a"])
    names = [s.name for s in feature_specs("breast_cancer")]
    index = [names.index(c.replace("_", " ")) for c in COLUMNS]
    lines = ["pid," + ",".join(COLUMNS) + ",label"]
    for i, pseudonym in enumerate(data.pseudonyms):
        lines.append(f"{pseudonym}," + ",".join(f"{data.x[i, j]:.6f}" for j in index) + f",{int(data.y[i])}")
    (tmp_path / "records.csv").write_text("\n".join(lines) + "\n")
    mapping = parse_mapping({"pseudonym_column": "pid",
                             "columns": {**dict.fromkeys(COLUMNS, "labs"),
                                         "label": {"category": "outcomes", "type": "integer"}}})
    with store.transaction() as session:
        import_records(session, tmp_path / "records.csv", "csv", mapping)
    return list(data.pseudonyms)


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[SuperLinkProcess]:
    link = SuperLinkProcess(tmp_path / "superlink")
    link.start()
    try:
        yield link
    finally:
        link.stop()


def _start_daemon(node_dir: Path, coordinator_url: str, superlink: SuperLinkProcess,
                  runtime_port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EXCHANGE_NODE_COORDINATOR_URL": coordinator_url, "EXCHANGE_NODE_HEALTH_PORT": "0",
           "EXCHANGE_NODE_POLL_INTERVAL_S": "0.3", "EXCHANGE_NODE_POLICY__MODE": "auto-approve",
           "EXCHANGE_NODE_SUPERNODE__SUPERLINK_ADDRESS": superlink.address,
           "EXCHANGE_NODE_SUPERNODE__CLIENTAPPIO_ADDRESS": f"127.0.0.1:{runtime_port}",
           "EXCHANGE_NODE_SUPERNODE__RESTART_BACKOFF_INITIAL_S": "0.5"}
    return subprocess.Popen([sys.executable, "-m", "exchange.cli", "node", "run", "--config",
                             str(node_dir / "node.toml")], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(node_dir / "daemon.log", "ab"))


def test_revocation_between_rounds_and_kill9_mid_study(node_dir: Path, store: NodeStore, tmp_path: Path,
                                                       superlink: SuperLinkProcess,
                                                       runner: CliRunner) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    signer = Signer.load(settings.signing_key_path)
    pseudonyms = _seed_breast_cancer(store, tmp_path)
    contracts = [gru_contract(p, "hospital-a") for p in pseudonyms]
    seed_consent(store, tmp_path / "consent", contracts, "hospital-a", signer)
    hold = threading.Event()
    flower_key = settings.flower_public_key_path.read_text().strip()
    runtime_port = free_port()
    with live_coordinator(tmp_path, {"hospital-a": (signer, flower_key)}, pause=hold) as coordinator:
        study_id = coordinator.submit(columns={"labs": COLUMNS}, epsilon=3.0, rounds=ROUNDS)
        process = _start_daemon(node_dir, coordinator.url, superlink, runtime_port)
        processes = [process]
        try:
            wait_for(lambda: coordinator.study(study_id)["status"] == "running", "approval", EVENT_DEADLINE_S)
            superlink.wait_for_nodes(1, timeout=EVENT_DEADLINE_S)
            spec = StudySpec(study_id=study_id, template="logistic_regression", task="binary",
                             columns=tuple(COLUMNS), label="label", epsilon=3.0, delta=1e-5, rounds=ROUNDS,
                             min_hospitals=1, accountant="rdp", round_timeout_s=180, join_timeout_s=180,
                             request=StudyRequest(purpose="DUO:0000042", organisation="acme", region="DE",
                                                  data_categories=("labs",), epsilon=3.0, study_id=study_id))
            observer = Observer()
            revoked = pseudonyms[:REVOKED]

            def revoke_some() -> None:  # on_round(1) arrives with round 2's replies: applies to round 3
                folder = tmp_path / "revocations"
                folder.mkdir()
                for contract in contracts[:REVOKED]:
                    (folder / f"{contract.pseudonym}.json").write_text(
                        json.dumps(revoke(contract, ISSUED + timedelta(days=1)).to_json()))
                result = runner.invoke(app, ["node", "consent", "import", str(folder), "--config",
                                             str(node_dir / "node.toml")])
                assert result.exit_code == 0, result.output

            def crash_and_restart() -> None:  # on_round(2), with round 3's replies: before round 4
                old_ids = set(superlink.online_node_ids())
                processes[-1].send_signal(signal.SIGKILL)
                processes[-1].wait(30)
                processes.append(_start_daemon(node_dir, coordinator.url, superlink, runtime_port))
                wait_for(lambda: store.get_state("daemon_starts") == 2, "the restarted daemon",
                         EVENT_DEADLINE_S)
                # The node rejoins under a new node id. The SuperLink lists the old id until its
                # heartbeat expires even after the SuperNode's graceful exit, and the ServerApp
                # picks a round's nodes from that list: wait for the old id to go (docs/node.md).
                wait_for(lambda: (ids := set(superlink.online_node_ids())) and not ids & old_ids,
                         "the restarted SuperNode to replace the old one", EVENT_DEADLINE_S)

            observer.hooks = {1: revoke_some, 2: crash_and_restart}
            result = run_study(superlink.address, spec, observer, tmp_path / "study", insecure=True)
            assert observer.hook_errors == []
            assert result.status == "completed", (result.reason, observer.failed)
            # The hospital delivers the run's real receipts itself (POST /v1/hospital/entries)
            # while the coordinator's study runs; its own (scripted) run then finds every round
            # delivered and adds none, so the payout is computed from these.
            with HospitalClient(coordinator.url, signer, "hospital-a") as client:
                for round_number in sorted(observer.rounds):
                    for receipt in observer.rounds[round_number]:
                        client.submit_entry(receipt.entry)
            # The children while the study is still active: once the daemon sees it completed
            # it stops the SuperNode it started on demand, so after completion there may be none.
            children = [c["pid"] for c in store.get_state("children").values() if c["pid"]]
            assert len(children) == 1  # the SuperNode hosting the executor, restarted
            hold.set()
            wait_for(lambda: coordinator.study(study_id)["status"] == "completed", "completion",
                     EVENT_DEADLINE_S)
            logged = wait_for(lambda: _exported(tmp_path / "coordinator.db", tmp_path / "export"),
                              "a checkpoint of the whole log", EVENT_DEADLINE_S)
            for p in processes[:-1]:
                assert p.poll() is not None
            processes[-1].send_signal(signal.SIGTERM)
            assert processes[-1].wait(60) == 0
            for pid in children:  # SIGTERM stops the children too
                assert not Path(f"/proc/{pid}").exists() or \
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    assert sorted(observer.rounds) == list(range(1, ROUNDS + 1))
    # Rewards match the contributions, from the log: the hospital killed mid-study and rejoined
    # trained every round, and the log's receipts are exactly the run's, each paid by the payout
    # the auditor's fold recomputes.
    entries, fold = logged
    in_log = [e for e in entries if e.kind == "round.receipt" and e.payload["study_id"] == study_id]
    assert [e.leaf_bytes() for e in in_log] == [r.entry.leaf_bytes() for k in sorted(observer.rounds)
                                                for r in observer.rounds[k]]
    audit_ledger = Ledger()
    audit_ledger.apply_all([e for e in entries if e.kind != "study.payout"])
    (payout,) = [e for e in entries if e.kind == "study.payout" and e.payload["study_id"] == study_id]
    expected = audit_ledger.expected_payout(study_id, audit_ledger.studies[study_id].held)
    assert {k: payout.payload[k] for k in expected} == expected
    paid = payout_credits(payout.payload)
    assert paid.get("hospital:hospital-a", 0) > 0
    assert fold["balances"]["hospital:hospital-a"] == paid["hospital:hospital-a"]
    used = {r: rs[0].records_used for r, rs in observer.rounds.items()}
    data, _label = read_records(site_paths(settings)["records"])
    train = {p for p, test in zip(data.pseudonyms, data.is_test, strict=True) if not test}
    # the public receipts cannot show the revocation: every round carries the same weight
    assert used[1] == used[2] == used[3] == used[4]
    assert len({rs[0].rewards["size"] for rs in observer.rounds.values()}) == 1
    # the hospital's own spend rows do: the revoked patients took part in rounds 1-2 only
    with store.engine.connect() as conn:
        units = dict(conn.execute(select(privacy_patient_spend.c.pseudonym, privacy_patient_spend.c.units)
                                  .where(privacy_patient_spend.c.study_id == study_id,
                                         privacy_patient_spend.c.role == "train")).tuples().all())
    gone = [units[p] for p in set(train) & set(revoked) if p in units]
    stayed = [u for p, u in units.items() if p not in set(revoked)]
    assert gone and stayed and max(gone) < min(stayed)
    ledger = open_ledger(store.engine, settings.policy.total_privacy_budget)
    charges = ledger.charges(study_id)
    assert [c.round for c in charges] == [1, 2, 3, 4]  # one charge per round, none lost or doubled
    epsilons = [r.epsilon_total for r in (observer.rounds[k][0] for k in sorted(observer.rounds))]
    # each receipt's total is the decision count's epsilon plus the round's DP-SGD charge
    decision = ledger.decision(study_id)
    assert decision is not None
    assert [decision.epsilon + c.epsilon for c in charges] == pytest.approx(epsilons)
    assert ledger.spent(study_id) == pytest.approx(epsilons[-1]) and epsilons[-1] <= 3.0 + 1e-9
    # the hospital's total: the decision count + the larger of training and hold-out evaluation
    assert ledger.total_spent() == pytest.approx(ledger.study_spent(study_id))
    assert epsilons[-1] - 1e-9 <= ledger.study_spent(study_id) <= 3.0 + 1e-9
    with store.sessions() as session:
        rows = session.execute(select(RoundRow.round, RoundRow.epsilon).where(RoundRow.study_id == study_id)
                               .order_by(RoundRow.round)).tuples().all()
    assert [r for r, _e in rows] == [1, 2, 3, 4]
    assert [e for _r, e in rows] == pytest.approx([c.epsilon for c in charges])  # the node's DP-SGD record
    # each daemon run started its SuperNode, which became ready once its executor had loaded
    events = [(e.get("event"), e.get("child")) for e in _json_lines(node_dir / "daemon.log")]
    runs = [i for i, (event, _c) in enumerate(events) if event == "node_started"]
    assert len(runs) == 2
    for start, end in zip(runs, [*runs[1:], len(events)], strict=True):
        run = events[start:end]
        assert ("child_started", "supernode") in run and ("child_ready", "supernode") in run
        assert run.index(("child_started", "supernode")) < run.index(("child_ready", "supernode"))
    # ... before the SuperNode connected: the executor's ready line precedes flwr's first line
    log_text = (node_dir / "logs" / "supernode.log").read_text(errors="replace")
    assert log_text.index(READY_LINE) < log_text.index("Starting Flower SuperNode")


def _exported(db: Path, out: Path) -> tuple[list[Entry], dict[str, Any]] | None:
    """The coordinator's log as an auditor gets it (`audit export`, `audit rewards`), once its
    latest checkpoint covers the study's payout; None before."""
    runner = CliRunner()
    exported = runner.invoke(audit_cli, ["export", "--db", f"sqlite:///{db}", "--out", str(out), "--force"])
    if exported.exit_code != 0:
        return None
    entries = [Entry.from_json(json.loads(line)) for line in (out / "entries.jsonl").read_text().splitlines()
               if line.strip()]
    if not any(e.kind == "study.payout" for e in entries):
        return None
    folded = runner.invoke(audit_cli, ["rewards", str(out)])
    assert folded.exit_code == 0, folded.output
    return entries, json.loads(folded.stdout)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
