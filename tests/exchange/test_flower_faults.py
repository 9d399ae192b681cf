"""Faults under the coordinator's real runner (issue 19, "Faults"): the coordinator in process
(SQLite, its production `FederatedRunner`), a SuperLink and two hospitals' SuperNodes (each with
its warm executor) as separate processes on loopback, a 2-hospital study of a tiny logistic
regression over a few rounds.

- **a hospital killed with kill -9 mid-round**: the study needs both hospitals, so it fails
  cleanly at the round the hospital missed, with the reason in the log; every round.receipt in
  the log is from a hospital the round's aggregate counted (the killed hospital's receipts stop
  at its last round); nobody is paid, the escrow is refunded whole, and the exported log
  verifies and folds (`audit verify`, `audit rewards`) to the coordinator's balances.
- **the SuperLink killed with kill -9 mid-study and restarted** on the same port and database:
  the study ends (completed, or failed with the reason in the log), never hangs; completed:
  paid exactly by the logged receipts; failed: refunded whole; the log verifies and folds.

Each test starts with both hospitals' nodes running and online (`_nodes_back`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from typer.testing import CliRunner

from audit.cli import app as audit_cli
from audit.entry import Entry
from exchange.coordinator.app import AppConfig, Runtime, build_runtime, create_app
from exchange.coordinator.client import decision_entry
from exchange.coordinator.schemas import ApiKeyCreate, HospitalCreate, OrganisationCreate, ResearcherCreate
from exchange.http_signing import sign_request
from exchange.study.runners import FederatedRunner, RunHandle, RunObserver, RunRequest
from federated.runtime.demo_sites import DemoSite, approve, provision_sites
from federated.runtime.deployment import LocalFederation
from tests.exchange.conftest import flower_key

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(600)]

HOSPITALS = ("hospital-a", "hospital-b")
LABS = ["mean radius", "mean texture", "mean perimeter", "mean area"]
BUDGET = 600
#: every wait is for an event; the deadlines only keep a broken run from hanging the suite
DEADLINE_S = 300.0


@dataclass
class Federation:
    flower: LocalFederation
    sites: dict[str, DemoSite]
    root: Path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("faults")
    sites = provision_sites(root / "sites", hospitals=HOSPITALS)
    with LocalFederation(root / "flower", {h: d.site.node_config() for h, d in sites.items()}) as flower:
        yield Federation(flower, sites, root)
    assert all(not p.alive() for p in flower.processes())


class _Hooked:
    """The lifecycle as the run sees it, with a test's hook after each recorded round."""

    def __init__(self, inner: RunObserver, hook: Callable[[int], None]) -> None:
        self.inner, self.hook = inner, hook

    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Any]) -> None:
        self.inner.on_round(study_id, round_number, metrics, receipts)
        self.hook(round_number)

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        self.inner.on_complete(study_id, model, metrics)

    def on_failed(self, study_id: str, reason: str) -> None:
        self.inner.on_failed(study_id, reason)


class HookedRunner(FederatedRunner):
    """The production runner; `hook(round)` runs in the ServerApp's thread once the coordinator
    recorded that round (round r is reported with round r+1's replies: r+1 is trained)."""

    hook: Callable[[int], None] = staticmethod(lambda _round: None)

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        return super().start(request, _Hooked(observer, self.hook))


@dataclass
class Coordinator:
    client: TestClient[Any]
    runtime: Runtime
    runner: HookedRunner
    headers: dict[str, str]
    auditor: dict[str, str]
    db_url: str

    def run(self, fed: Federation, rounds: int) -> tuple[str, dict[str, Any]]:
        """Submit a study both hospitals approve (it starts on the second approval); returns
        its id and its final state, once it ended."""
        body = {"title": "Fault study", "purpose": "GRU", "commercial": False, "ethics_approval": True,
                "data_categories": ["labs"], "columns": {"labs": LABS}, "template": "logistic_regression",
                "task": "binary", "label": "malignant", "epsilon": 2.0, "delta": 1e-5, "rounds": rounds,
                "min_hospitals": 2, "token_budget": BUDGET, "secure_aggregation": False}
        response = self.client.post("/v1/studies", json=body, headers=self.headers)
        assert response.status_code == 201, response.text
        sid = str(response.json()["id"])
        for h in HOSPITALS:
            approve(fed.sites[h].site, sid)  # what the node daemon does when it approves
            entry = decision_entry(fed.sites[h].signer, h, sid, decision="approve", reasons=["policy: ok"],
                                   eligible_records=100)
            request = self.client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                                json=entry.to_json())
            sign_request(request, fed.sites[h].signer)
            assert self.client.send(request).status_code == 201
        deadline = time.monotonic() + DEADLINE_S
        while True:
            study = dict(self.client.get(f"/v1/studies/{sid}", headers=self.headers).json())
            if study["status"] not in ("submitted", "running"):
                break
            assert time.monotonic() < deadline, f"study still {study['status']} after {DEADLINE_S:.0f} s"
            time.sleep(0.5)
        # the run's thread ended too: nothing is left waiting on the federation
        assert all(handle.wait(60) for handle in self.runner.handles)
        return sid, study

    def audited(self, tmp_path: Path) -> tuple[list[Entry], dict[str, Any]]:
        """The log exported from the database, verified and folded with the audit CLI."""
        checkpointing = self.runtime.checkpointing
        assert checkpointing is not None
        size = self.runtime.audit_log.size()
        assert checkpointing.wait_cosigned(size, 60), checkpointing.status()  # the export's end
        out = tmp_path / "export"
        exported = CliRunner().invoke(audit_cli, ["export", "--db", self.db_url, "--out", str(out)])
        assert exported.exit_code == 0, exported.output
        verified = CliRunner().invoke(audit_cli, ["verify", str(out)])
        assert verified.exit_code == 0, verified.output
        folded = CliRunner().invoke(audit_cli, ["rewards", str(out)])
        assert folded.exit_code == 0, folded.output
        entries = [Entry.from_json(json.loads(line))
                   for line in (out / "entries.jsonl").read_text().splitlines() if line.strip()]
        return entries, dict(json.loads(folded.stdout))


def _nodes_back(fed: Federation) -> None:
    """Every hospital's SuperNode and executor running and online, as the node daemon keeps them
    (a test before may have killed one, or the SuperNodes may have exited on a SuperLink that
    restarted without its state). Checked again while waiting: a SuperNode that met a SuperLink
    restarted without its state exits at its next request (a 401), which may come after the
    previous test ended. A process never stays up without its SuperNode loop (it ends itself:
    `flwr_internals.flower_supernode_main`), so restarting the dead ones is all it takes."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for node in fed.flower.nodes.values():
            if not all(p.alive() for p in node.processes()):
                node.kill()
                node.start()
                node.wait_ready(DEADLINE_S)
        if len(fed.flower.superlink.online_node_ids()) == len(HOSPITALS):
            return
        assert time.monotonic() < deadline, "the hospitals' nodes did not come back online"
        time.sleep(0.5)  # a killed node stays listed until its heartbeat expires


@pytest.fixture
def coordinator(federation: Federation, tmp_path: Path) -> Iterator[Coordinator]:
    _nodes_back(federation)
    runner = HookedRunner(federation.flower.superlink.address, tmp_path / "runs", round_timeout_s=30,
                          join_timeout_s=120)
    keys = tmp_path / "keys"
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    runtime = build_runtime(AppConfig(database_url=db_url, operator_key_file=keys / "op.key",
                                      log_key_file=keys / "log.key", coordinator_key_file=keys / "co.key",
                                      access_log=False), runner)
    c = runtime.lifecycle
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme", region="DE"))
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    researcher = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                                       researcher_id="alice"))[1]
    auditor = c.registry.issue_api_key(ApiKeyCreate(role="auditor"))[1]
    for h in HOSPITALS:
        c.registry.register_hospital(HospitalCreate(id=h, organisation_id="clinics", name=h,
                                                    signing_public_key=federation.sites[h].signer.public_key_b64,
                                                    flower_public_key=flower_key()))
    c.registry.mint("org:acme", 10_000)
    try:
        with TestClient(app=create_app(runtime)) as client:
            yield Coordinator(client, runtime, runner, {"Authorization": f"Bearer {researcher}"},
                              {"Authorization": f"Bearer {auditor}"}, db_url)
    finally:
        for handle in runner.handles:
            handle.cancel()
            handle.wait(60)
        runtime.close()


def _of(entries: list[Entry], kind: str, sid: str) -> list[Entry]:
    return [e for e in entries if e.kind == kind and e.payload.get("study_id") == sid]


def _check_money(coordinator: Coordinator, entries: list[Entry], fold: dict[str, Any], sid: str,
                 status: str) -> None:
    """Completed: paid by exactly the logged receipts; failed: refunded whole, nobody paid. The
    audit fold equals the coordinator's balances and conserves the minted tokens."""
    served = coordinator.client.get("/v1/ledger/balances", headers=coordinator.auditor).json()
    assert fold["balances"] == served["balances"] and fold["minted"] == served["minted"]
    escrow = fold["escrow"] if isinstance(fold["escrow"], int) else sum(fold["escrow"].values())
    assert escrow == 0  # nothing of the study is left held
    assert fold["minted"] == sum(fold["balances"].values()) + fold.get("unclaimed", 0)
    hospitals_paid = {k: v for k, v in fold["balances"].items() if k.startswith("hospital:")}
    if status == "failed":
        (refund,) = _of(entries, "study.refund", sid)
        assert refund.payload["amount"] == BUDGET and not _of(entries, "study.payout", sid)
        assert fold["balances"]["org:acme"] == 10_000 and not any(hospitals_paid.values())
        return
    from audit.ledger import Ledger
    from audit.rewards import payout_credits

    ledger = Ledger(coordinator.runtime.journal.operator.key_id)
    ledger.apply_all([e for e in entries if e.kind != "study.payout"])
    (payout,) = _of(entries, "study.payout", sid)
    expected = ledger.expected_payout(sid, BUDGET)  # from the receipts in the log
    assert {k: payout.payload[k] for k in expected} == expected
    for account, amount in payout_credits(payout.payload).items():
        assert fold["balances"][account] == amount
    assert fold["balances"]["org:acme"] == 10_000 - BUDGET


def _rounds_agree_with_receipts(entries: list[Entry], sid: str) -> dict[int, set[str]]:
    """Each recorded round's receipts are exactly the hospitals its aggregate counted: as many as
    the round's contributors, and the ones its `study.round` entry names. Returns them by round."""
    receipts: dict[int, set[str]] = {}
    for e in _of(entries, "round.receipt", sid):
        receipts.setdefault(int(e.payload["round"]), set()).add(str(e.payload["hospital"]))
    for e in _of(entries, "study.round", sid):
        got = receipts.get(int(e.payload["round"]), set())
        assert set(e.payload["hospitals"]) == got, e.payload
        assert e.payload["metrics"]["contributors"] == len(got), e.payload
    return receipts


@pytest.mark.parametrize("state", ["kept", "lost"])
def test_superlink_killed_and_restarted_mid_study(federation: Federation, coordinator: Coordinator,
                                                  tmp_path: Path, state: str) -> None:
    """kill -9 of the SuperLink once round 1 is recorded (round 2 trained), restarted on the same
    port: with its database ("kept") the ServerApp's calls reconnect and the study completes,
    paid by the receipts in the log; without it ("lost": the task's token is unknown, 401) the
    study fails with the reason in the log and is refunded, and the coordinator's process
    stays up (Flower's own retry policy would SIGINT it: flwr_internals.bound_retries)."""
    superlink = federation.flower.superlink
    restarted = threading.Event()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            if state == "lost":
                for path in superlink.workdir.glob("superlink.db*"):
                    path.unlink()
            superlink.start()
            restarted.set()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def kill_superlink(round_number: int) -> None:
        if round_number == 1 and superlink.proc is not None:
            superlink.proc.kill()
            threading.Thread(target=restart).start()

    coordinator.runner.hook = kill_superlink
    # the ServerApp waits for a lost SuperLink up to a round's timeout: ample for the restart
    coordinator.runner.round_timeout_s = 120
    sid, study = coordinator.run(federation, rounds=3)
    assert errors == [] and restarted.wait(120)
    entries, fold = coordinator.audited(tmp_path)
    receipts = _rounds_agree_with_receipts(entries, sid)
    if state == "kept":
        assert study["status"] == "completed", study
        assert receipts == {r: {f"hospital:{h}" for h in HOSPITALS} for r in (1, 2, 3)}
    else:
        assert study["status"] == "failed", study
        (failed,) = _of(entries, "study.fail", sid)
        assert failed.payload["reason"] == study["outcome_reason"]
        assert "401" in failed.payload["reason"], failed.payload
        assert set(receipts) == {1}  # recorded before the kill; nothing after
    _check_money(coordinator, entries, fold, sid, study["status"])
    if state == "kept":  # the SuperNodes rode it out; "lost": the node daemon restarts them
        assert all(p.alive() for node in federation.flower.nodes.values() for p in node.processes())


def test_hospital_killed_mid_round(federation: Federation, coordinator: Coordinator, tmp_path: Path) -> None:
    """hospital-b's SuperNode and executor are killed (SIGKILL) once round 1 is recorded (round 2
    trained): round 3 gets no update from it within the round timeout, so the study (it needs
    both) fails there. hospital-b's receipts stop at round 2, the failed round's receipts are
    hospital-a's alone, and nobody is paid: the escrow goes back whole."""
    node_b = federation.flower.nodes["hospital-b"]

    def kill_b(round_number: int) -> None:
        if round_number == 1:
            node_b.kill()

    coordinator.runner.hook = kill_b
    coordinator.runner.round_timeout_s = 60  # round 3 waits this long for hospital-b
    sid, study = coordinator.run(federation, rounds=3)
    assert not any(p.alive() for p in node_b.processes())
    assert study["status"] == "failed", study
    assert study["outcome_reason"].startswith("round 3: 1 hospital(s) contributed, the study needs 2")
    entries, fold = coordinator.audited(tmp_path)
    (failed,) = _of(entries, "study.fail", sid)
    assert failed.payload["reason"] == study["outcome_reason"]
    receipts = _rounds_agree_with_receipts(entries, sid)
    assert {r for r, hs in receipts.items() if "hospital:hospital-b" in hs} == {1, 2}
    assert receipts[3] == {"hospital:hospital-a"}
    _check_money(coordinator, entries, fold, sid, "failed")
