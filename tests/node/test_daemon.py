"""The node daemon against the real coordinator (Litestar app on loopback; runs scripted, so
no Flower here): decisions with reasons reach the researcher, the steward decides in "ask"
mode, SIGTERM stops cleanly, and a daemon killed with kill -9 resumes from its database
without deciding twice or counting privacy twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from audit.signing import Signer
from exchange.cli import app
from exchange.node.daemon import CoordinatorLink, NodeDaemon
from exchange.node.models import DecisionRow, RoundRow, StudyRow
from exchange.node.privacy import open_ledger
from exchange.node.settings import NodeSettings, load_node_settings
from exchange.node.site_export import site_paths
from exchange.node.store import NodeStore, open_store
from federated.accounting import DPPlan
from tests.node.helpers import (
    LiveCoordinator,
    gru_contract,
    live_coordinator,
    seed_consent,
    seed_records,
    wait_for,
)

PSEUDONYMS = [f"p{i}" for i in range(12)]


def _node_settings(node_dir: Path, **changes: Any) -> NodeSettings:
    settings = load_node_settings(node_dir / "node.toml")
    # a decision count of epsilon 1 puts 10 patients under the site minimum with probability
    # about 3e-5 (at the default 0.1: about 0.19), so these approvals are not left to chance
    policy = settings.policy.model_copy(update={"decision_epsilon": 1.0, **changes})
    return settings.model_copy(update={"policy": policy,
                                       "supernode": settings.supernode.model_copy(update={"enabled": False})})


@pytest.fixture
def seeded(settings: NodeSettings, store: NodeStore, tmp_path: Path) -> NodeStore:
    """12 records; 10 with general-research consent, 2 without any contract."""
    seed_records(store, tmp_path, PSEUDONYMS)
    seed_consent(store, tmp_path / "consent", [gru_contract(p, "hospital-a") for p in PSEUDONYMS[:10]],
                 "hospital-a", Signer.load(settings.signing_key_path))
    return store


@pytest.fixture
def coordinator(node_dir: Path, tmp_path: Path) -> Iterator[LiveCoordinator]:
    settings = load_node_settings(node_dir / "node.toml")
    signer = Signer.load(settings.signing_key_path)
    flower_key = settings.flower_public_key_path.read_text().strip()
    hold = threading.Event()  # scripted runs wait until the test releases them
    with live_coordinator(tmp_path, {"hospital-a": (signer, flower_key)}, pause=hold) as live:
        live.hold = hold  # type: ignore[attr-defined]
        yield live


def _daemon(settings: NodeSettings, store: NodeStore) -> tuple[NodeDaemon, CoordinatorLink]:
    signer = Signer.load(settings.signing_key_path)
    link = CoordinatorLink(settings.model_copy(update={}), signer)
    return NodeDaemon(settings, store, link, signer), link


def _decisions(live: LiveCoordinator, study_id: str) -> list[dict[str, Any]]:
    return list(live.study(study_id)["decisions"])


def test_policy_refusal_reaches_the_researcher_with_reasons(node_dir: Path, seeded: NodeStore,
                                                            coordinator: LiveCoordinator) -> None:
    settings = _node_settings(node_dir, mode="auto-approve", max_epsilon_per_study=2.0)
    settings = settings.model_copy(update={"coordinator_url": coordinator.url})
    too_greedy = coordinator.submit(epsilon=3.0)
    fine = coordinator.submit(epsilon=1.5)  # above the decision count's epsilon (1), part of it
    daemon, link = _daemon(settings, seeded)
    try:
        daemon.step()
    finally:
        link.close()
    refused = _decisions(coordinator, too_greedy)
    assert [d["decision"] for d in refused] == ["refuse"]
    assert refused[0]["reasons"] == ["epsilon 3 exceeds the site maximum per study (2)"]
    assert refused[0]["eligible_records"] is None  # the count stays at the hospital
    approved = _decisions(coordinator, fine)
    assert [(d["decision"], d["eligible_records"]) for d in approved] == [("approve", None)]
    with seeded.sessions() as session:
        posted = session.execute(select(func.count()).select_from(DecisionRow)
                                 .where(DecisionRow.posted_at.is_not(None))).scalar_one()
    assert posted == 2


def test_an_approval_is_in_the_clientapps_list_as_soon_as_the_coordinator_holds_it(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator) -> None:
    """The study may start with our approval: its first round must find the study approved at
    this hospital, even before the step's site export (which is skipped here)."""
    settings = _node_settings(node_dir, mode="auto-approve")
    settings = settings.model_copy(update={"coordinator_url": coordinator.url})
    study = coordinator.submit(epsilon=1.5)
    daemon, link = _daemon(settings, seeded)
    daemon._sync_supernode = lambda: None  # type: ignore[method-assign]
    try:
        daemon.step()
    finally:
        link.close()
    assert [d["decision"] for d in _decisions(coordinator, study)] == ["approve"]
    approvals = json.loads(site_paths(settings)["approvals"].read_text())
    assert approvals["approved"] == [study]
    # with the study's spec as its run will carry it, so the Flower process can calibrate the
    # study's DP plan before the run starts (federated.client_app.plan_approved)
    from exchange.node.models import StudyRow
    from exchange.study.spec import AcceptedStudy, study_spec
    from federated.study_spec import StudySpec

    with seeded.sessions() as session:
        document = session.execute(select(StudyRow.document).where(StudyRow.study_id == study)).scalar_one()
    expected = study_spec(AcceptedStudy.from_hospital_view(document))
    assert StudySpec.from_json(approvals["specs"][study]) == expected
    assert (expected.study_id, expected.epsilon, expected.request.region) == (study, 1.5, "DE")


def test_ask_mode_waits_for_the_steward(node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator,
                                        runner: CliRunner) -> None:
    settings = _node_settings(node_dir, mode="ask").model_copy(update={"coordinator_url": coordinator.url})
    first, second = coordinator.submit(), coordinator.submit()
    daemon, link = _daemon(settings, seeded)
    try:
        daemon.step()
        assert _decisions(coordinator, first) == []
        with seeded.sessions() as session:
            assert session.get(StudyRow, first).status == "pending"  # type: ignore[union-attr]
        config = ["--config", str(node_dir / "node.toml")]
        # issue 21 item 7: the whole request, within 80 columns; a unique id prefix is enough
        shown = runner.invoke(app, ["node", "status", *config], env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        lines = shown.output.splitlines()
        assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
        text = " ".join(shown.output.split())
        assert "Waiting for your decision (2)" in text and first in text and second in text
        for expected in ('"Breast cancer risk"', "DUO:0000042 (GRU, general research use)",
                         "labs: mean_radius, mean_texture", "label label (binary", "epsilon 3,",
                         "ethics approval yes", "deadline"):
            assert expected in text, expected
        common = next(first[:i] for i in range(len(first)) if first[i] != second[i])
        ambiguous = runner.invoke(app, ["node", "approve", common, *config])
        assert ambiguous.exit_code == 1 and "ambiguous" in ambiguous.output
        assert first in ambiguous.output and second in ambiguous.output
        ok = runner.invoke(app, ["node", "approve", first[:max(len(common) + 1, 8)], "--reason",
                                 "ethics board said yes", *config])
        assert ok.exit_code == 0, ok.output
        no = runner.invoke(app, ["node", "refuse", second, "--reason", "we are busy this quarter", *config])
        assert no.exit_code == 0, no.output
        again = runner.invoke(app, ["node", "approve", second, *config])
        assert again.exit_code == 1 and "already refused by steward" in again.output
        unknown = runner.invoke(app, ["node", "approve", "st-nope", *config])
        assert unknown.exit_code == 1 and "not known to this node" in unknown.output
        daemon.step()
    finally:
        link.close()
    assert [(d["decision"], d["reasons"]) for d in _decisions(coordinator, first)] == [
        ("approve", ["ethics board said yes"])]
    assert [(d["decision"], d["reasons"]) for d in _decisions(coordinator, second)] == [
        ("refuse", ["we are busy this quarter"])]


def test_a_study_closed_before_our_decision_is_never_joined(node_dir: Path, seeded: NodeStore,
                                                            tmp_path: Path, runner: CliRunner) -> None:
    """Another hospital's approval started the study before this node decided: the coordinator
    refuses our late approval (409), and the node must not train for it."""
    from exchange.coordinator.client import HospitalClient
    from exchange.node.decisions import approved_active, current_budget, unposted

    settings = _node_settings(node_dir, mode="auto-approve")
    signer = Signer.load(settings.signing_key_path)
    other = Signer.generate()
    hold = threading.Event()
    from exchange.node.keys import create_flower_key

    key_a = settings.flower_public_key_path.read_text().strip()
    key_b = create_flower_key(tmp_path / "b" / "flower.key")
    with live_coordinator(tmp_path / "c2", {"hospital-a": (signer, key_a), "hospital-b": (other, key_b)},
                          pause=hold) as live:
        study_id = live.submit(min_hospitals=1)
        with HospitalClient(live.url, other, "hospital-b") as b:
            b.decide(study_id, "approve", ["ok"], 50)
        wait_for(lambda: live.study(study_id)["status"] == "running", "the study to start")
        daemon, link = _daemon(settings.model_copy(update={"coordinator_url": live.url}), seeded)
        try:
            daemon.step()
            daemon.step()
        finally:
            link.close()
        assert [d["hospital_id"] for d in _decisions(live, study_id)] == ["hospital-b"]
    # the rejection is recorded with the coordinator's reason, and the approval counts for nothing:
    # not acknowledged, not re-posted, no budget reserved, never joined
    assert _study_status(seeded, study_id) == "rejected"
    assert approved_active(seeded) == []
    assert unposted(seeded) == []
    with seeded.sessions() as session:
        [decision] = session.execute(select(DecisionRow).where(DecisionRow.study_id == study_id)).scalars()
        assert (decision.decision, decision.posted_at) == ("approve", None)
    assert current_budget(seeded, settings).reserved == 0.0
    assert "decisions are closed" in _last_error(seeded)
    config = ["--config", str(node_dir / "node.toml")]
    report = json.loads(runner.invoke(app, ["node", "status", "--json", *config]).output)
    [study] = [s for s in report["studies"] if s["study_id"] == study_id]
    assert (study["status"], study["decision"], study["posted"]) == ("rejected", "approve", False)
    assert study["rejected"]["status"] == 409
    assert study["rejected"]["reason"] == f"study {study_id!r} is running; decisions are closed"
    table = runner.invoke(app, ["node", "status", *config], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    assert "REJECTED by the coordinator" in table.output and "decisions are closed" in table.output


def _last_error(store: NodeStore) -> str:
    from exchange.node.models import ErrorRow

    with store.sessions() as session:
        return str(session.execute(select(ErrorRow.message).order_by(ErrorRow.id.desc())).scalars().first())


def test_a_waiting_study_is_refused_once_the_budget_is_spent(node_dir: Path, seeded: NodeStore,
                                                             coordinator: LiveCoordinator) -> None:
    settings = _node_settings(node_dir, mode="ask", max_epsilon_per_study=5.0, total_privacy_budget=5.0)
    settings = settings.model_copy(update={"coordinator_url": coordinator.url})
    study_id = coordinator.submit(epsilon=3.0)
    daemon, link = _daemon(settings, seeded)
    try:
        daemon.step()
        assert _study_status(seeded, study_id) == "pending"
        daemon.step()  # nothing changed: not re-gated (the inputs marker is unchanged)
        assert _study_status(seeded, study_id) == "pending"
        ledger = open_ledger(seeded.engine, 5.0)  # another study spends 2.5 of the 5
        ledger.register_study("st-other", DPPlan(target_epsilon=2.5, delta=1e-5, rounds=1, steps_per_round=1,
                                                 sample_rate=0.5, noise_multiplier=1.0, batch_size=5,
                                                 n_patients=10))
        ledger.charge("st-other", 1, 2.5)
        daemon.step()
    finally:
        link.close()
    [decision] = _decisions(coordinator, study_id)
    assert decision["decision"] == "refuse"
    assert decision["reasons"] == ["epsilon 3 exceeds the privacy budget left (2.5 of 5: 2.5 spent, "
                                   "0 reserved)"]


# --- the daemon as a process -----------------------------------------------------------------

def _start(node_dir: Path, coordinator: LiveCoordinator, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "EXCHANGE_NODE_COORDINATOR_URL": coordinator.url,
                   # see _node_settings: a decision count of epsilon 1 approves 10 patients
                   "EXCHANGE_NODE_POLICY__DECISION_EPSILON": "1.0",
                   "EXCHANGE_NODE_HEALTH_PORT": "0", "EXCHANGE_NODE_POLL_INTERVAL_S": "0.2",
                   "EXCHANGE_NODE_SUPERNODE__ENABLED": "false", "EXCHANGE_NODE_POLICY__MODE": "auto-approve",
                   **env}
    return subprocess.Popen([sys.executable, "-m", "exchange.cli", "node", "run", "--config",
                             str(node_dir / "node.toml")], env=environment,
                            stdout=subprocess.DEVNULL, stderr=open(node_dir / "daemon.log", "ab"))


def _state(store: NodeStore, key: str) -> Any:
    return store.get_state(key)


def test_health_and_sigterm_stop_cleanly(node_dir: Path, seeded: NodeStore,
                                         coordinator: LiveCoordinator) -> None:
    process = _start(node_dir, coordinator)
    try:
        address = wait_for(lambda: _state(seeded, "health_address"), "the health server")
        health = wait_for(lambda: _get_json(f"http://{address}/health").get("status") == "ok"
                          and _get_json(f"http://{address}/health"), "health ok")
        assert health["hospital_id"] == "hospital-a" and health["coordinator"] == "ok"
        assert address.startswith("127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _state(seeded, "daemon")["state"] == "stopped"
    log_lines = [json.loads(line) for line in (node_dir / "daemon.log").read_text().splitlines()
                 if line.startswith("{")]
    events = [line["event"] for line in log_lines]
    assert "node_started" in events and "node_stopped" in events
    assert all("node.key" not in json.dumps(line) or "seed" not in line for line in log_lines)


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read()))
    except OSError:
        return {}


def test_kill9_and_restart_resumes_without_double_counting(node_dir: Path, seeded: NodeStore,
                                                          coordinator: LiveCoordinator) -> None:
    study_id = coordinator.submit(epsilon=3.0, rounds=2)
    process = _start(node_dir, coordinator)
    try:
        wait_for(lambda: coordinator.study(study_id)["status"] == "running", "the study to start")
        wait_for(lambda: _study_status(seeded, study_id) == "running", "the node to see it running")
        # Round 1 trained here: the ClientApp charges the node's privacy ledger (as federated does).
        settings = load_node_settings(node_dir / "node.toml")
        ledger = open_ledger(seeded.engine, settings.policy.total_privacy_budget)
        plan = DPPlan(target_epsilon=3.0, delta=1e-5, rounds=2, steps_per_round=4, sample_rate=0.25,
                      noise_multiplier=1.1, batch_size=3, n_patients=10)
        ledger.register_study(study_id, plan)
        ledger.admit(study_id, "train", {"p-1": 8.0, "p-2": None}, 20.0)
        ledger.charge(study_id, 1, 1.75, patients={"p-1", "p-2"})
        wait_for(lambda: _rounds(seeded, study_id) == 1, "round 1 in the node's rounds table")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert _state(seeded, "daemon")["state"] == "running"  # it never got to say goodbye

        # Restarted (the same round charged again by a retried ClientApp is idempotent):
        ledger.charge(study_id, 1, 1.75, patients={"p-1", "p-2"})
        process = _start(node_dir, coordinator)
        wait_for(lambda: _state(seeded, "daemon_starts") == 2, "the second start")
        wait_for(lambda: _state(seeded, "daemon")["state"] == "running", "running again")
        ledger.charge(study_id, 2, 2.9, patients={"p-1"})
        wait_for(lambda: _rounds(seeded, study_id) == 2, "round 2 recorded")
        coordinator.hold.set()  # type: ignore[attr-defined]
        wait_for(lambda: _study_status(seeded, study_id) == "completed", "the node to see completion")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    decisions = _decisions(coordinator, study_id)
    assert [d["decision"] for d in decisions] == ["approve"]
    with seeded.sessions() as session:
        assert session.execute(select(func.count()).select_from(DecisionRow)).scalar_one() == 1
        epsilons = session.execute(select(RoundRow.round, RoundRow.epsilon)
                                   .where(RoundRow.study_id == study_id)
                                   .order_by(RoundRow.round)).tuples().all()
    assert epsilons == [(1, 1.75), (2, 2.9)]
    # the study's spend is its decision count's epsilon (1.0) plus its DP-SGD epsilon
    assert ledger.training_spent(study_id) == 2.9
    assert ledger.spent(study_id) == pytest.approx(3.9) and ledger.total_spent() == pytest.approx(3.9)
    status = json.loads(CliRunner().invoke(app, ["node", "status", "--json", "--config",
                                                 str(node_dir / "node.toml")]).output)
    # the finished study was closed: its patients count the steps they took, not its target
    assert ledger.is_closed(study_id)
    spend = ledger.patient_spend()
    assert spend["p-1"].epsilon == pytest.approx(plan.epsilon_for_steps(8))
    assert spend["p-2"].epsilon == pytest.approx(plan.epsilon_for_steps(4))
    # each consented patient counted at decision time was charged the count's epsilon, once
    decision = ledger.decision(study_id)
    assert decision is not None and decision.epsilon == 1.0
    assert ledger.decision_patients(study_id) == frozenset(PSEUDONYMS[:10])
    assert all(spend[p].epsilon == pytest.approx(1.0) for p in PSEUDONYMS[:10])
    privacy = status["privacy"]
    assert privacy == {"total": 20.0, "spent": pytest.approx(3.9), "reserved": 0.0,
                       "left": pytest.approx(16.1),
                       "delta_total": 1e-4, "delta_spent": 1e-5, "delta_reserved": 0.0, "max_delta": 1e-5,
                       "patient_epsilon_sum": pytest.approx(plan.epsilon_for_steps(8)),
                       "patient_epsilon_composed": pytest.approx(plan.epsilon_for_steps(8), rel=0.01),
                       "patient_delta": pytest.approx(1e-5), "patients": privacy["patients"]}
    # counts only: no pseudonym in the report
    assert privacy["patients"]["with_spend"] == 12 and "p-1" not in json.dumps(status)
    [row] = status["studies"]
    assert (row["study_id"], row["status"], row["decision"], row["rounds"]) == (study_id, "completed",
                                                                                "approve", 2)


def _study_status(store: NodeStore, study_id: str) -> str | None:
    with store.sessions() as session:
        row = session.get(StudyRow, study_id)
        return None if row is None else row.status


def _rounds(store: NodeStore, study_id: str) -> int:
    with store.sessions() as session:
        return int(session.execute(select(func.count()).select_from(RoundRow)
                                   .where(RoundRow.study_id == study_id)).scalar_one())


def test_store_reopens_at_head(node_dir: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    store = open_store(settings.db_url)
    store.dispose()


def test_the_daemon_publishes_its_catalog_and_infeasible_studies_are_refused_at_submission(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator) -> None:
    """Issue 21, item 2, with the real coordinator: the node signs its catalog (columns,
    categories, types, public policy limits; no count) and posts it once per change; a study
    this only hospital cannot serve is then refused at submission, naming the hospital."""
    from exchange.coordinator.client import CoordinatorError

    settings = _node_settings(node_dir, mode="auto-approve", max_epsilon_per_study=2.0)
    settings = settings.model_copy(update={"coordinator_url": coordinator.url})
    daemon, link = _daemon(settings, seeded)
    try:
        daemon.step()
        daemon.step()  # unchanged: not posted again
        (listed,) = coordinator.researcher.get("/v1/catalogs")["hospitals"]
        catalog = listed["catalog"]
        assert listed["hospital_id"] == "hospital-a" and catalog["max_epsilon_per_study"] == 2.0
        assert {c["name"]: (c["category"], c["type"]) for c in catalog["columns"]} == {
            "mean_radius": ("labs", "number"), "mean_texture": ("labs", "number"),
            "label": ("outcomes", "integer")}
        assert "12" not in json.dumps(catalog) and "10" not in json.dumps(catalog)  # no count leaves
        kinds = [json.loads(line)["kind"] for line in urllib.request.urlopen(
            urllib.request.Request(f"{coordinator.url}/v1/audit/export", headers={
                "Authorization": coordinator.researcher._http.headers["Authorization"]})).read().splitlines()]
        assert kinds.count("hospital.catalog") == 1
        with pytest.raises(CoordinatorError) as refused:
            coordinator.submit(epsilon=3.0, min_hospitals=1)
        assert refused.value.status == 422
        expected = {"field": "hospitals.hospital-a",
                    "reason": "epsilon 3 exceeds the site maximum per study (2)"}
        assert expected in refused.value.problem["errors"]
        # the steward raises the cap: the next step publishes the new catalog, and the study is served
        relaxed = _node_settings(node_dir, mode="auto-approve", max_epsilon_per_study=5.0)
        daemon.settings = relaxed.model_copy(update={"coordinator_url": coordinator.url})
        daemon.step()
        assert coordinator.submit(epsilon=3.0, min_hospitals=1).startswith("st-")
    finally:
        link.close()


def test_cancelled_and_expired_studies_release_the_reservation(node_dir: Path, seeded: NodeStore,
                                                               coordinator: LiveCoordinator) -> None:
    """An approved study reserves its epsilon and is served by the SuperNode (the approvals
    file) until it ends. Cancelled by the researcher, or expired at its start deadline before
    enough hospitals joined, it ends at the coordinator; the node sees that at its next poll and
    releases both the reservation and the approval."""
    from datetime import UTC, datetime, timedelta

    from exchange.node.decisions import current_budget
    from exchange.node.site_export import site_paths

    settings = _node_settings(node_dir, mode="auto-approve").model_copy(
        update={"coordinator_url": coordinator.url})
    from tests.exchange.conftest import flower_key

    # A second registered hospital that never decides: a study needing two can then be
    # submitted (feasibility) but never starts.
    coordinator.operator.post("/v1/hospitals", {
        "id": "hospital-silent", "organisation_id": "clinics", "name": "Silent",
        "signing_public_key": Signer.generate().public_key_b64, "flower_public_key": flower_key()})
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    cancelled = coordinator.submit(min_hospitals=2, epsilon=1.25)  # never starts
    expiring = coordinator.submit(min_hospitals=2, epsilon=1.5,
                                  start_deadline=deadline.isoformat().replace("+00:00", "Z"))
    approvals = site_paths(settings)["approvals"]
    daemon, link = _daemon(settings, seeded)
    try:
        daemon.step()  # decides and posts
        daemon.step()  # sees the coordinator hold its approvals (`my_decision`)
        assert sorted(daemon.active_studies()) == sorted([cancelled, expiring])
        # each study's decision count (epsilon 1) is spent; the rest of its epsilon is reserved
        budget = current_budget(seeded, settings)
        assert budget.spent == pytest.approx(2.0) and budget.reserved == pytest.approx(0.25 + 0.5)
        assert json.loads(approvals.read_text())["approved"] == sorted([cancelled, expiring])
        coordinator.researcher.post(f"/v1/studies/{cancelled}/cancel", {"reason": "changed our mind"})
        daemon.step()
        assert daemon.active_studies() == [expiring]
        assert current_budget(seeded, settings).reserved == pytest.approx(0.5)
        wait_for(lambda: datetime.now(UTC) > deadline, "the start deadline to pass")
        daemon.step()  # the node's poll lists the study: overdue, it expires on that access
    finally:
        link.close()
    assert coordinator.study(expiring)["status"] == "expired"
    assert _study_status(seeded, cancelled) == "cancelled" and _study_status(seeded, expiring) == "expired"
    assert daemon.active_studies() == []
    assert current_budget(seeded, settings).reserved == 0.0
    assert json.loads(approvals.read_text())["approved"] == []


class _CountingLink(CoordinatorLink):
    """The real link, counting the coordinator calls a step makes (each a signed request, which
    the coordinator records as a replay-protection nonce: a write)."""

    def __init__(self, settings: NodeSettings, signer: Signer) -> None:
        super().__init__(settings, signer)
        self.calls: list[str] = []
        self.fail_studies = 0

    def me(self) -> dict[str, Any]:
        self.calls.append("me")
        return super().me()

    def studies(self) -> list[dict[str, Any]]:
        self.calls.append("studies")
        if self.fail_studies:
            self.fail_studies -= 1
            import httpx

            raise httpx.ConnectError("coordinator unreachable")
        return super().studies()


def test_a_registered_daemon_asks_who_it_is_once_not_at_every_step(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """25 hospitals polling every 0.5 s made two signed requests a step each, one of them `me`,
    and the coordinator writes a nonce for every signed request: now `me` at the first step,
    after a failed request and every REGISTRATION_RECHECK_S."""
    import exchange.node.daemon as daemon_module

    settings = _node_settings(node_dir, mode="auto-approve")
    # at every step (no back-off on an unchanged list of studies: the next test)
    settings = settings.model_copy(update={"coordinator_url": coordinator.url, "studies_poll_max_s": 0.0})
    signer = Signer.load(settings.signing_key_path)
    link = _CountingLink(settings, signer)
    daemon = NodeDaemon(settings, seeded, link, signer)
    daemon._sync_supernode = lambda: None  # type: ignore[method-assign]
    try:
        for _ in range(3):
            daemon.step()
        assert link.calls == ["me", "studies", "studies", "studies"]
        link.calls.clear()
        link.fail_studies = 1  # the coordinator stops answering once: the next step asks again
        daemon.step()
        daemon.step()
        assert link.calls == ["studies", "me", "studies"]
        link.calls.clear()
        monkeypatch.setattr(daemon_module, "REGISTRATION_RECHECK_S", 0.0)  # the recheck is due
        daemon.step()
        assert link.calls == ["me", "studies"]
    finally:
        link.close()
    assert seeded.get_state("registered") is not None


def _idle_daemon(node_dir: Path, store: NodeStore, coordinator: LiveCoordinator,
                 **changes: Any) -> tuple[NodeDaemon, _CountingLink, list[float]]:
    """A daemon stepping on a clock the test moves (its SuperNode left out)."""
    settings = _node_settings(node_dir, mode="auto-approve")
    settings = settings.model_copy(update={"coordinator_url": coordinator.url, "poll_interval_s": 0.5,
                                           **changes})
    signer = Signer.load(settings.signing_key_path)
    link = _CountingLink(settings, signer)
    daemon = NodeDaemon(settings, store, link, signer)
    daemon._sync_supernode = lambda: None  # type: ignore[method-assign]
    now = [1000.0]
    daemon._clock = lambda: now[0]
    return daemon, link, now


def test_an_idle_daemon_asks_for_the_studies_less_often_until_they_change(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator) -> None:
    """Every signed request costs the coordinator a nonce write; 25 hospitals asking twice a
    second while nothing changed were most of its load during a round (docs/benchmarks/
    scale.md). While the answer stays the same the wait doubles up to `studies_poll_max_s`;
    a new study is seen within that, and the daemon asks at every step again after it."""
    daemon, link, now = _idle_daemon(node_dir, seeded, coordinator, studies_poll_max_s=2.0)
    asked: list[float] = []
    try:
        for _ in range(16):  # 8 s of steps every 0.5 s, nothing changes
            link.calls.clear()
            daemon.step()
            if "studies" in link.calls:
                asked.append(now[0] - 1000.0)
            now[0] += 0.5
        assert asked == [0.0, 0.5, 1.0, 2.0, 4.0, 6.0]  # at every step before: 16 requests
        study_id = coordinator.submit(epsilon=3.0, min_hospitals=1)
        seen_after = None
        for step in range(8):
            daemon.step()
            if _decisions(coordinator, study_id):
                seen_after = step * 0.5
                break
            now[0] += 0.5
        assert seen_after is not None and seen_after <= 2.0, seen_after
        link.calls.clear()
        now[0] += 0.5
        daemon.step()  # the answer changed (our decision): asked again at the next step
        assert link.calls == ["studies"]
    finally:
        link.close()


def test_an_idle_step_writes_nothing_to_the_node_database(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator) -> None:
    """The step's time went to the node database at every step (an fsync on SQLite, per
    hospital, twice a second in the demo): now at most every STEP_RECORD_S, and the supervised
    children only when they change."""
    from sqlalchemy import event

    import exchange.node.daemon as daemon_module

    daemon, link, now = _idle_daemon(node_dir, seeded, coordinator)
    commits: list[int] = []
    try:
        for _ in range(4):  # registration, the first answers, the catalog
            daemon.step()
            now[0] += 0.5
        event.listen(seeded.engine, "commit", lambda _conn: commits.append(1))
        for _ in range(10):  # 5 s, less than STEP_RECORD_S
            daemon.step()
            now[0] += 0.5
        assert commits == []  # before: one `last_step_at` write per step, and the children's
        assert daemon_module.STEP_RECORD_S > 5.0
        now[0] += daemon_module.STEP_RECORD_S
        daemon.step()
        assert len(commits) == 1
        assert seeded.get_state("last_step_at") is not None
    finally:
        link.close()


def test_a_settled_daemon_reads_its_database_again_only_after_a_commit(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator, runner: CliRunner) -> None:
    """Every step re-read the studies, decisions, site files and ledger charges (16 statements,
    ~12 ms of CPU per step, twice a second per hospital: half a hospital's CPU during a round,
    docs/benchmarks/scale.md). Now a step between two answers of the coordinator reads only the
    database's change token while nothing was committed; a steward's decision, made by another
    process, is still posted at the very next step."""
    from sqlalchemy import event

    settings = _node_settings(node_dir, mode="ask")
    settings = settings.model_copy(update={"coordinator_url": coordinator.url, "poll_interval_s": 0.5,
                                           "studies_poll_max_s": 30.0})
    signer = Signer.load(settings.signing_key_path)
    link = _CountingLink(settings, signer)
    daemon = NodeDaemon(settings, seeded, link, signer)  # its site export included
    now = [1000.0]
    daemon._clock = lambda: now[0]
    study = coordinator.submit(epsilon=1.5)
    statements: list[str] = []
    event.listen(seeded.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        for _ in range(12):  # registration, the catalog, the site export; answers at 0, 1, 2, 4 s
            daemon.step()
            now[0] += 0.5
        assert _decisions(coordinator, study) == []  # waiting for the steward
        statements.clear()
        link.calls.clear()
        for _ in range(3):  # the next answer is due at 8 s
            daemon.step()
            now[0] += 0.5
        assert link.calls == []
        assert statements == []  # before: 16 statements a step
        config = ["--config", str(node_dir / "node.toml")]
        approved = runner.invoke(app, ["node", "approve", study, "--reason", "ethics board", *config])
        assert approved.exit_code == 0, approved.output
        daemon.step()  # the steward's commit moved the token: this step works on it
        assert link.calls == []
        assert [d["decision"] for d in _decisions(coordinator, study)] == ["approve"]
        assert json.loads(site_paths(settings)["approvals"].read_text())["approved"] == [study]
    finally:
        link.close()


def test_a_settled_daemon_makes_no_pass_for_an_unchanged_list_of_studies(
        node_dir: Path, seeded: NodeStore, coordinator: LiveCoordinator) -> None:
    """The studies are due every `studies_poll_max_s`, and each answer started a whole pass over
    the node database (its studies, decisions, site files and ledger: ~6.5 ms of CPU, docs/
    benchmarks/scale.md, branch nodecpu) although nothing had changed there or at the
    coordinator. Now an unchanged answer, with nothing committed since the last pass, starts
    none; a new study is still decided at the answer that brings it, and a settled daemon still
    makes a pass every SETTLED_PASS_MAX_S."""
    from sqlalchemy import event

    import exchange.node.daemon as daemon_module

    settings = _node_settings(node_dir, mode="auto-approve")
    settings = settings.model_copy(update={"coordinator_url": coordinator.url, "poll_interval_s": 0.5,
                                           "studies_poll_max_s": 1.0})
    signer = Signer.load(settings.signing_key_path)
    link = _CountingLink(settings, signer)
    daemon = NodeDaemon(settings, seeded, link, signer)
    now = [1000.0]
    daemon._clock = lambda: now[0]
    first = coordinator.submit(epsilon=3.0)
    statements: list[str] = []
    event.listen(seeded.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        for _ in range(8):  # registration, the catalog, the decision, the site export
            daemon.step()
            now[0] += 0.5
        assert [d["decision"] for d in _decisions(coordinator, first)] == ["approve"]
        statements.clear()
        link.calls.clear()
        passes = daemon.passes
        for _ in range(8):  # 4 s, the studies asked for every second, the same answer
            daemon.step()
            now[0] += 0.5
        assert link.calls.count("studies") >= 3
        assert statements == [] and daemon.passes == passes  # before: a pass per answer

        second = coordinator.submit(epsilon=3.0)
        for _ in range(3):  # the next answer (within a second) brings it: a pass decides it
            daemon.step()
            now[0] += 0.5
        assert [d["decision"] for d in _decisions(coordinator, second)] == ["approve"]

        for _ in range(6):  # settled again
            daemon.step()
            now[0] += 0.5
        passes = daemon.passes
        now[0] += daemon_module.SETTLED_PASS_MAX_S
        daemon.step()
        assert daemon.passes == passes + 1
    finally:
        link.close()
