"""The real deployment: a SuperLink and three SuperNodes (each with its warm executor) as separate
processes on loopback, with TLS and SuperNode authentication on, and the study's ServerApp run
in-process by `run_study` as the coordinator runs it.

One federation serves the whole module (starting it costs ~20 s on 2 cores); each test runs its
own study on it. The sites are set up so that every scenario is independent of the others:
hospital-c's patients consented to "labs" only, hospital-b's total privacy budget is 10 (the
studies of epsilon 3 fit, one of 12 never does).
The dropout test kills hospital-c and therefore runs last.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine

from federated.privacy_ledger import PrivacyLedger
from federated.receipts import verify_receipt
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
from federated.runtime.deployment import LocalFederation, free_port, write_node_config
from federated.runtime.server_runner import StudyResult, run_study
from federated.runtime.settings import RuntimeSettings, flower_env
from federated.runtime.superlink_delivery import UNAVAILABLE_PREFIX
from federated.runtime.superlink_main import COUNTS_ENV
from federated.runtime.tls import generate_node_keys, generate_tls
from federated.study_spec import StudySpec

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(300)]

LABS = ["mean radius", "mean texture", "mean perimeter", "mean area", "mean smoothness", "mean compactness",
        "mean concavity", "mean concave points", "mean symmetry", "mean fractal dimension"]
LABS_AND_IMAGING = [*LABS, "worst radius", "worst texture", "worst concave points"]


class RecordingObserver:
    def __init__(self, hook: Any = None) -> None:
        self.rounds: list[tuple[int, dict[str, float], list[Any]]] = []
        self.round_ends: list[float] = []  # time.monotonic() at each on_round
        self.completed: tuple[Path, str] | None = None
        self.failed: list[str] = []
        self.hook = hook

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append((round, dict(metrics), list(receipts)))
        self.round_ends.append(time.monotonic())
        if self.hook is not None:
            self.hook(round)

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


@dataclass
class Deployment:
    federation: LocalFederation
    sites: dict[str, DemoSite]
    root: Path

    def run(self, spec: StudySpec, observer: RecordingObserver, *, approve_first: bool = True,
            approved: set[str] | None = None) -> StudyResult:
        if approve_first:
            for demo in self.sites.values():
                approve(demo.site, spec.study_id)
        tls = self.federation.superlink.tls
        assert tls is not None
        return run_study(self.federation.superlink.address, spec, observer, self.root / "models",
                         root_certificates=tls.root_certificates(), settings=self.federation.settings,
                         hospital_keys={h: d.signer.public_key for h, d in self.sites.items()},
                         approved_hospitals=approved)

    def ledger(self, hospital: str) -> PrivacyLedger:
        return PrivacyLedger(create_engine(self.sites[hospital].site.ledger_url))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("flower")
    sites = provision_sites(root / "sites", categories_by_hospital={"hospital-c": ["labs"]},
                            budgets={"hospital-b": 10.0})
    tls = generate_tls(root / "tls")
    keys = {h: generate_node_keys(root / "node-keys", h) for h in sites}
    federation = LocalFederation(root / "fed", {h: d.site.node_config() for h, d in sites.items()},
                                 settings=RuntimeSettings(superlink_deliver_complete=True), tls=tls,
                                 supernode_auth=True, node_keys=keys)
    with pytest.MonkeyPatch.context() as env:
        # the SuperLink (started below, it inherits this) counts its requests into this file
        env.setenv(COUNTS_ENV, str(root / "superlink-requests.json"))
        federation.start()
    try:
        yield Deployment(federation, sites, root)
    finally:
        federation.stop()
    # teardown ran even if a test failed: nothing of ours may be left running
    assert all(not p.alive() for p in federation.processes())


def test_dp_study_end_to_end_with_a_hospital_without_consented_records(deployment: Deployment) -> None:
    """A 3-round DP study (PRV accountant) over labs and imaging columns. hospital-c's patients
    consented to "labs" only, so it has no consented records: its decision count is 0 (drawn here
    without noise) and it answers "no data" every round,
    is not a contribution and spends no privacy; the other two carry the study."""
    from federated.data import public_reference
    from federated.templates import get_template
    from federated.weights import sha256_file

    spec = demo_spec("e2e", columns=LABS_AND_IMAGING, epsilon=3.0, rounds=3, min_hospitals=2,
                     round_timeout_s=120)
    # hospital-c's decision count, drawn as its node daemon would, without noise here: it counts
    # nobody, so hospital-c answers "no data" by that (noised) count every round
    from tests.federated.test_flower_inprocess import decide_exactly

    c = deployment.sites["hospital-c"]
    approve(c.site, spec.study_id)
    decide_exactly(c, spec)
    observer = RecordingObserver()
    result = deployment.run(spec, observer)
    assert result.status == "completed", (result.reason, observer.failed)
    assert observer.failed == []
    assert [r for r, _, _ in observer.rounds] == [1, 2, 3]
    contributors = ["hospital-a", "hospital-b"]
    for round_, metrics, receipts in observer.rounds:
        assert metrics["contributors"] == 2 and metrics["no_data"] == 1 and metrics["dropped"] == 0
        assert sorted(r.hospital.removeprefix("hospital:") for r in receipts) == contributors
        for r in receipts:  # signed by each hospital's own key, for this study and round
            key = deployment.sites[r.hospital.removeprefix("hospital:")].signer.public_key
            verify_receipt(r.to_bytes(), key, study_id="e2e", round=round_)
    assert deployment.ledger("hospital-c").plan("e2e") is None  # the no-data hospital spent nothing
    # the model file is what the observer was told
    assert result.model_path is not None and observer.completed == (result.model_path, result.sha256)
    assert sha256_file(result.model_path) == result.sha256
    # privacy: each contributor's ledger holds what its last receipt says, within the study's target
    last = {r.hospital.removeprefix("hospital:"): r for r in observer.rounds[-1][2]}
    for h in contributors:
        spent = deployment.ledger(h).spent("e2e")
        assert spent == pytest.approx(last[h].epsilon_total)
        assert 0.9 * spec.epsilon <= spent <= spec.epsilon
    # utility: better than always predicting the majority class, on the public reference sample
    parts = [deployment.sites[h].site.records()[0] for h in contributors]
    y_train = np.concatenate([p.train().y for p in parts])
    reference = public_reference(spec.columns, spec.task)
    assert reference is not None
    baseline = get_template(spec.template).trivial_baseline(y_train, reference[0], reference[1])
    final = observer.rounds[-1][1]
    assert final["ref_accuracy"] > baseline["accuracy"] + 0.1, (final, baseline)
    # the contributors' hold-out evaluation: noised sums, charged once per round, within the target
    assert final["eval_hospitals"] == 2 and 0 < final["eval_epsilon"] <= spec.epsilon
    for h in contributors:
        assert len(deployment.ledger(h).evaluations("e2e")) == spec.rounds
    # every message reached its hospital with all its objects pushed (superlink_deliver_complete):
    # no object pull of a SuperNode was answered "found, not yet available" and retried
    counts = _request_counts(deployment, "/v1/fleet/pull-object")
    assert counts.get(UNAVAILABLE_PREFIX + "/v1/fleet/pull-object", 0) == 0, counts
    # the per-round time breakdown is recorded
    assert all(m["round_wall_s"] >= m["train_compute_max_s"] > 0 for _, m, _ in observer.rounds)
    # each hospital's Flower process (SuperNode and executor: hosted_supernode) trained, scored and
    # accounted without torch (the NumPy engine, federated.numpy_dp) nor scikit-learn or pandas:
    # none of their shared libraries is mapped in it, while NumPy's is (the check can see one)
    for name, node in deployment.federation.nodes.items():
        assert node.is_hosted and node.supernode is not None and node.supernode.alive()
        maps = Path(f"/proc/{node.supernode.pid}/maps").read_text()
        assert "/numpy/" in maps, name
        loaded = [lib for lib in ("/torch/", "/sklearn/", "/sksurv/", "/pandas/") if lib in maps]
        assert loaded == [], (name, loaded)


def _request_counts(deployment: Deployment, path: str) -> dict[str, int]:
    """The SuperLink's request counts (`superlink_main.COUNTS_ENV`, rewritten within 0.2 s of a
    change), once they include `path`."""
    import json

    file = deployment.root / "superlink-requests.json"
    for _ in range(600):  # a hang guard: the file is written within 0.2 s
        counts = json.loads(file.read_text()) if file.exists() else {}
        if counts.get(path):
            return {k: int(v) for k, v in counts.items()}
        time.sleep(0.1)
    raise AssertionError(f"no {path} in the SuperLink's request counts")


def test_study_that_would_overspend_is_refused(deployment: Deployment) -> None:
    before = deployment.ledger("hospital-b").total_spent()
    spec = demo_spec("overspend", columns=LABS, epsilon=12.0, rounds=2, min_hospitals=3, accountant="rdp",
                     round_timeout_s=120)
    observer = RecordingObserver()
    result = deployment.run(spec, observer)
    assert result.status == "failed" and observer.completed is None
    assert observer.failed == [result.reason]
    assert result.reason.startswith("round 1: 2 hospital(s) contributed, the study needs 3")
    assert "hospital-b: refused (privacy budget" in result.reason
    assert deployment.ledger("hospital-b").total_spent() == before
    assert deployment.ledger("hospital-b").plan("overspend") is None


def test_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    """With SuperNode authentication on, a node whose key was not registered cannot join."""
    root = deployment.root / "intruder"
    keys = generate_node_keys(root, "intruder")
    tls = deployment.federation.superlink.tls
    assert tls is not None
    config = write_node_config(root / "node.toml", deployment.sites["hospital-a"].site.node_config())
    proc = subprocess.run(
        [sys.executable, "-m", "federated.runtime.supernode_main", "--superlink",
         deployment.federation.superlink.address, "--root-certificates", str(tls.ca_cert),
         "--auth-supernode-private-key", str(keys.private_key), "--isolation", "process",
         "--port", str(free_port()), "--node-config", str(config), "--max-retries", "0"],
        env=flower_env(root / "home"), capture_output=True, timeout=120, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 1, output[-2000:]
    assert "Exit Code: 305" in output  # Flower: could not activate the SuperNode at the SuperLink
    assert len(deployment.federation.superlink.online_node_ids()) == 3


# Enough rounds that the second study starts (claim, pull) before the first ends on a quiet
# machine: with 2 rounds of ~0.6 s one study finished 12 ms before the other's first round.
ROUNDS = 4


def test_two_studies_at_once_from_one_coordinator_process(deployment: Deployment) -> None:
    """The coordinator runs each study's ServerApp in its own thread: two runs share the SuperLink,
    the SuperNodes and the warm executors, and each message carries its own run's ids."""
    import threading

    specs = [demo_spec(f"parallel-{i}", columns=LABS, epsilon=1.0, rounds=ROUNDS, min_hospitals=3,
                       accountant="rdp", round_timeout_s=120) for i in range(2)]
    observers = {s.study_id: RecordingObserver() for s in specs}
    results: dict[str, StudyResult] = {}

    for demo in deployment.sites.values():  # before the threads: approvals are read-modify-write
        approve(demo.site, *(s.study_id for s in specs))
    totals_before = {h: deployment.ledger(h).total_spent() for h in deployment.sites}

    def run(spec: StudySpec) -> None:
        results[spec.study_id] = deployment.run(spec, observers[spec.study_id], approve_first=False)

    threads = [threading.Thread(target=run, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    statuses = {k: r.status for k, r in results.items()}
    assert statuses == {"parallel-0": "completed", "parallel-1": "completed"}, \
        {k: r.reason for k, r in results.items()}
    assert results["parallel-0"].run_id != results["parallel-1"].run_id
    # at once, not one after the other: each study ended a round before the other's last round
    ends = [observers[s.study_id].round_ends for s in specs]
    assert max(e[0] for e in ends) < min(e[-1] for e in ends), ends
    for study_id, observer in observers.items():
        assert [r for r, _, _ in observer.rounds] == list(range(1, ROUNDS + 1))
        assert all(m["contributors"] == 3 for _, m, _ in observer.rounds)
        assert {rc.study_id for _, _, rcs in observer.rounds for rc in rcs} == {study_id}
    # Budgets (issue 20 item 2): each hospital's ledger holds, per study, exactly the cumulative
    # epsilon its receipts of that study state, round by round (neither study charged to the
    # other, none twice), and its total grew by the sum of the two studies' spends.
    for h in deployment.sites:
        ledger = deployment.ledger(h)
        grew = 0.0
        for spec in specs:
            said = {rc.round: rc.epsilon_total for _, _, rcs in observers[spec.study_id].rounds
                    for rc in rcs if rc.hospital.removeprefix("hospital:") == h}
            # a receipt's epsilon_total is the decision count's epsilon + DP-SGD so far; the
            # charges hold the DP-SGD part alone
            decided = ledger.decision(spec.study_id)
            count_epsilon = decided.epsilon if decided is not None else 0.0
            assert {c.round: c.epsilon + count_epsilon
                    for c in ledger.charges(spec.study_id)} == pytest.approx(said)
            assert ledger.spent(spec.study_id) == pytest.approx(said[ROUNDS]) and said[ROUNDS] <= spec.epsilon
            assert ledger.study_spent(spec.study_id) == pytest.approx(
                count_epsilon + max(said[ROUNDS] - count_epsilon, ledger.evaluation_spent(spec.study_id)))
            grew += ledger.study_spent(spec.study_id)
        assert ledger.total_spent() - totals_before[h] == pytest.approx(grew)


def test_only_approved_hospitals_nodes_take_part(deployment: Deployment) -> None:
    """hospital-a is online and approved the study locally, but the coordinator's approved set is
    b and c: hospital-a gets no model message, spends nothing, and the study runs on b and c."""
    spec = demo_spec("approved-set", columns=LABS, epsilon=1.0, rounds=1, min_hospitals=2, accountant="rdp",
                     round_timeout_s=120)
    observer = RecordingObserver()
    result = deployment.run(spec, observer, approved={"hospital-b", "hospital-c"})
    assert result.status == "completed", result.reason
    (_, metrics, receipts), = observer.rounds
    assert metrics["contributors"] == 2 and metrics["dropped"] == 0
    assert sorted(r.hospital for r in receipts) == ["hospital:hospital-b", "hospital:hospital-c"]
    assert metrics["eval_hospitals"] == 2
    assert deployment.ledger("hospital-a").plan("approved-set") is None


def test_hospital_restarting_mid_study_is_sent_its_message_again(deployment: Deployment) -> None:
    """hospital-c's SuperNode and executor are killed (SIGKILL) after round 2's exchange and
    restarted from a short-lived thread (the children must outlive it). With SuperNode
    authentication the restarted node can only activate once the SuperLink has marked the old
    session offline (2 x the 10 s heartbeat), and it comes back under the SAME node id; round 3's
    message to it gets Flower's NODE_UNAVAILABLE meanwhile. The server says hello again when the id
    is listed again and re-sends round 3 within the round timeout: all three contribute in every
    round (the study needs three)."""
    import threading

    node_c = deployment.federation.nodes["hospital-c"]
    superlink = deployment.federation.superlink
    restarted = threading.Event()

    def restart_c(old_ids: list[int]) -> None:
        deadline = time.monotonic() + 90
        while set(old_ids) <= set(superlink.online_node_ids()) and time.monotonic() < deadline:
            time.sleep(0.5)  # the old session must be offline first (else Flower exit 305)
        node_c.start()
        node_c.wait_ready()
        restarted.set()

    def kill_and_restart_c(round_: int) -> None:  # on_round(1) arrives with round 2's replies
        if round_ == 1:
            before = superlink.online_node_ids()
            node_c.kill()
            threading.Thread(target=restart_c, args=(before,)).start()

    spec = demo_spec("restart", columns=LABS, epsilon=1.0, rounds=3, min_hospitals=3, accountant="rdp",
                     round_timeout_s=90)
    observer = RecordingObserver(kill_and_restart_c)
    result = deployment.run(spec, observer)
    assert restarted.is_set()
    assert result.status == "completed", result.reason
    for _, metrics, receipts in observer.rounds:
        assert metrics["contributors"] == 3, metrics
        assert "hospital:hospital-c" in {r.hospital for r in receipts}
    assert all(p.alive() for p in node_c.processes())  # survived the thread that started them


def test_hospital_dropping_out_mid_study(deployment: Deployment) -> None:
    """hospital-c's SuperNode and executor are killed (SIGKILL) during the study: the SuperLink
    still lists the node for ~40 s, so its messages time out and it counts as dropped."""
    node_c = deployment.federation.nodes["hospital-c"]

    def kill_c(round_: int) -> None:  # on_round(1) arrives with round 2's replies
        if round_ == 1:
            node_c.kill()

    # the timeout must cover round 1, where each hospital also calibrates its noise
    spec = demo_spec("dropout", columns=LABS, rounds=3, min_hospitals=2, accountant="rdp",
                     round_timeout_s=15)
    observer = RecordingObserver(kill_c)
    result = deployment.run(spec, observer)
    assert result.status == "completed", result.reason
    by_round = {r: (m, rc) for r, m, rc in observer.rounds}
    assert by_round[1][0]["contributors"] == 3
    metrics, receipts = by_round[3]
    assert metrics["contributors"] == 2 and metrics["dropped"] >= 1
    assert "hospital:hospital-c" not in {r.hospital for r in receipts}
    assert not any(p.alive() for p in node_c.processes())
