"""The bridge between federated's study runs and the coordinator (exchange/study/runners.py).

What the coordinator must be able to rely on, whichever runner drives the study:
1. a run's end is reported once (federated's `run_study` reports a failure itself before it
   returns "failed"; the runner must not report it again);
2. only receipts of the study's approved hospitals, verified against their registered keys,
   reach the log and the payout;
3. a hospital's epsilon in the study results is the hospital's privacy ledger for that study
   (receipts carry the round's increment in `epsilon_spent`, the cumulative in `epsilon_total`);
4. federated reports round r one exchange late (with round r+1's replies; the last round after
   an evaluate-only exchange): round r's metrics and receipts are recorded as round r.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from audit.entry import Entry
from audit.signing import Signer
from exchange.study.runners import (
    FederatedRunner,
    GuardedObserver,
    InProcessFederatedRunner,
    RunHandle,
    RunHospital,
    RunObserver,
    RunRequest,
    StudyRunner,
)
from tests.exchange.conftest import World

SPEC: dict[str, Any] = {"title": "t", "purpose": "DUO:0000042", "commercial": False, "ethics_approval": True,
                        "data_categories": ["labs"], "columns": {"labs": ["mean radius"]},
                        "template": "logistic_regression", "task": "binary", "label": "malignant",
                        "epsilon": 3.0, "delta": 1e-5}


@dataclass
class RecordingObserver:
    """The test's RunObserver: remembers every call, in order (calls come from run threads)."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Entry]) -> None:
        with self.lock:
            self.calls.append(("round", round_number, dict(metrics), list(receipts)))

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        with self.lock:
            self.calls.append(("complete", hashlib.sha256(model).hexdigest()))

    def on_failed(self, study_id: str, reason: str) -> None:
        with self.lock:
            self.calls.append(("failed", reason))

    def kinds(self) -> list[Any]:
        return [c[0] if c[0] != "round" else ("round", c[1]) for c in self.calls]


def _request(signers: Mapping[str, Signer], study_id: str = "st-bridge") -> RunRequest:
    return RunRequest(study_id, SPEC, tuple(RunHospital(h, s.key_id, s.public_key_b64, "unused")
                                            for h, s in signers.items()),
                      rounds=1, min_hospitals=1, organisation_id="acme", region="DE")


def _receipt(signer: Signer, hospital: str, study_id: str = "st-bridge", round_number: int = 1) -> Entry:
    from federated.receipts import make_receipt

    return make_receipt(signer, study_id=study_id, round=round_number, hospital_id=hospital, records_used=10,
                        commitment="ab" * 32, epsilon_spent=0.2, epsilon_total=0.2 * round_number,
                        delta=1e-5, spec_sha256="cd" * 32, rewards={"root": "ef" * 32, "size": 8}).entry


# ---------------------------------------------------------------- 1. one end per run
def test_guard_passes_on_one_end_and_nothing_after_it() -> None:
    a = Signer.generate()
    inner = RecordingObserver()
    guard = GuardedObserver(inner, _request({"h-a": a}))
    guard.on_failed("st-bridge", "round 1: too few hospitals")
    guard.on_failed("st-bridge", "round 1: too few hospitals")  # what FederatedRunner used to add
    guard.on_complete("st-bridge", b"model", {})
    guard.on_round("st-bridge", 2, {"loss": 1.0}, [_receipt(a, "h-a", round_number=2)])
    assert inner.calls == [("failed", "round 1: too few hospitals")]
    assert guard.ended


def test_guard_passes_on_a_completion_once() -> None:
    inner = RecordingObserver()
    guard = GuardedObserver(inner, _request({"h-a": Signer.generate()}))
    assert not guard.ended
    guard.on_complete("st-bridge", b"model", {})
    guard.on_failed("st-bridge", "late failure")
    assert inner.kinds() == ["complete"]


def test_federated_runner_reports_an_unreachable_superlink_once(tmp_path: Path) -> None:
    """run_study raises (no observer call was made): the runner reports it, once."""
    inner = RecordingObserver()
    handle = FederatedRunner("127.0.0.1:9", tmp_path / "runs").start(
        _request({"hospital-a": Signer.generate()}), inner)
    assert handle.wait(120)
    assert [c[0] for c in inner.calls] == ["failed"]
    assert "federated run failed" in inner.calls[0][1]


@pytest.mark.slow
@pytest.mark.flower
def test_federated_runner_reports_a_failed_study_once(tmp_path: Path) -> None:
    """A real SuperLink, the study's ServerApp run by the coordinator's FederatedRunner: the run
    is cancelled before round 1, run_study calls on_failed and returns "failed". The coordinator
    must hear it once (it used to get a second on_failed from the runner)."""
    from federated.runtime.deployment import LocalFederation

    with LocalFederation(tmp_path / "flower", {}) as federation:
        inner = RecordingObserver()
        runner = FederatedRunner(federation.superlink.address, tmp_path / "runs")
        handle = runner.start(_request({"hospital-a": Signer.generate()}), inner)
        handle.cancel()
        assert handle.wait(120)
    assert inner.calls == [("failed", "cancelled before round 1")]


# ---------------------------------------------------------------- 2. approved hospitals only
def test_guard_passes_on_only_verified_receipts_of_approved_hospitals() -> None:
    a, b, outsider = Signer.generate(), Signer.generate(), Signer.generate()
    inner = RecordingObserver()
    guard = GuardedObserver(inner, _request({"h-a": a, "h-b": b}))
    good_a = _receipt(a, "h-a")
    offered = [
        good_a,
        _receipt(outsider, "h-c"),                      # registered elsewhere, not approved here
        _receipt(Signer.generate(), "h-b"),             # approved hospital, somebody else's key
        _receipt(b, "h-b", study_id="st-other"),        # another study's receipt
        _receipt(b, "h-b", round_number=2),             # another round's receipt
        _receipt(a, "h-a"),                             # a second receipt of h-a for round 1
    ]
    guard.on_round("st-bridge", 1, {"loss": 0.5}, offered)
    ((kind, round_number, metrics, passed),) = inner.calls
    assert (kind, round_number, metrics) == ("round", 1, {"loss": 0.5})
    assert passed == [good_a]
    # The same checks for a receipt whose signature was tampered with after signing.
    signed = _receipt(b, "h-b")
    forged = Entry.from_json({**signed.to_json(), "payload": {**signed.payload, "records_used": 999}})
    guard.on_round("st-bridge", 1, {}, [forged])
    assert inner.calls[-1][3] == []


def test_coordinator_never_records_or_pays_receipts_of_unapproved_hospitals(world: World) -> None:
    """h-one and h-two approve; h-three is registered but did not approve, h-four is not
    registered, and one receipt claims h-two under another key. The run hands all of them to
    the coordinator every round: only h-one's and h-two's real receipts may be logged and paid."""
    world.runner.intruders = {"h-three": world.hospitals["h-three"], "h-four": world.hospitals["h-four"],
                              "h-two": Signer.generate()}
    study = world.submit(rounds=2, min_hospitals=2)
    sid = study["id"]
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, sid).status_code == 201
    world.wait_runs()
    done = world.as_("alice", "GET", f"/v1/studies/{sid}").json()
    assert done["status"] == "completed", done
    entries = list(world.runtime.audit_log.entries())
    receipts = [e for e in entries if e.kind == "round.receipt" and e.payload["study_id"] == sid]
    assert sorted((e.payload["round"], e.payload["hospital"]) for e in receipts) == [
        (1, "hospital:h-one"), (1, "hospital:h-two"), (2, "hospital:h-one"), (2, "hospital:h-two")]
    keys = {h: world.hospitals[h].key_id for h in ("h-one", "h-two")}
    assert all(e.key_id == keys[e.payload["hospital"].removeprefix("hospital:")] for e in receipts)
    rounds = [e for e in entries if e.kind == "study.round" and e.payload["study_id"] == sid]
    assert [r.payload["hospitals"] for r in rounds] == [["hospital:h-one", "hospital:h-two"]] * 2
    (payout,) = [e for e in entries if e.kind == "study.payout" and e.payload["study_id"] == sid]
    text = json.dumps(payout.payload)
    assert "h-three" not in text and "h-four" not in text
    results = world.as_("alice", "GET", f"/v1/studies/{sid}/results").json()
    assert [c["hospital_id"] for c in results["contributions"]] == ["h-one", "h-two"]
    balances = world.as_("operator", "GET", "/v1/ledger/balances").json()["balances"]
    assert balances.get("hospital:h-three", 0) == 0 and balances.get("hospital:h-four", 0) == 0


# ---------------------------------------------------------------- 3 and 4: real federated logic
@dataclass
class ObservedRunner:
    """A StudyRunner that hands the coordinator's observer to `inner` with a recorder in front:
    the test sees exactly what the coordinator was told, in order."""

    inner: StudyRunner
    seen: RecordingObserver = field(default_factory=RecordingObserver)

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        seen = self.seen

        class Tee:
            def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                         receipts: list[Entry]) -> None:
                seen.on_round(study_id, round_number, metrics, receipts)
                observer.on_round(study_id, round_number, metrics, receipts)

            def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
                seen.on_complete(study_id, model, metrics)
                observer.on_complete(study_id, model, metrics)

            def on_failed(self, study_id: str, reason: str) -> None:
                seen.on_failed(study_id, reason)
                observer.on_failed(study_id, reason)

        return self.inner.start(request, Tee())


def _columns() -> dict[str, list[str]]:
    from federated.data import feature_specs

    out: dict[str, list[str]] = {}
    for spec in feature_specs("breast_cancer"):
        out.setdefault(spec.category, []).append(spec.name)
    return out


def _in_process_coordinator(tmp_path: Path, runner: StudyRunner, sites: Mapping[str, Any]
                            ) -> Iterator[tuple[TestClient[Any], Any, str]]:
    from exchange.coordinator.app import AppConfig, build_runtime, create_app
    from exchange.coordinator.schemas import (
        ApiKeyCreate,
        HospitalCreate,
        OrganisationCreate,
        ResearcherCreate,
    )
    from tests.exchange.conftest import flower_key

    keys = tmp_path / "keys"
    config = AppConfig(database_url=f"sqlite:///{tmp_path / 'c.db'}", operator_key_file=keys / "op.key",
                       log_key_file=keys / "log.key", coordinator_key_file=keys / "co.key", access_log=False)
    runtime = build_runtime(config, runner)
    c = runtime.lifecycle
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme", region="DE"))
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    key = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                                researcher_id="alice"))[1]
    for h, site in sites.items():
        c.registry.register_hospital(HospitalCreate(id=h, organisation_id="clinics", name=h,
                                           signing_public_key=site.signer.public_key_b64,
                                           flower_public_key=flower_key()))
    c.registry.mint("org:acme", 20_000)
    with TestClient(app=create_app(runtime)) as client:
        yield client, runtime, key


@pytest.mark.slow
def test_in_process_study_rounds_receipts_and_epsilon_match_the_hospitals(tmp_path: Path) -> None:
    """Three registered hospitals, all connected to the grid; two approve. Real consent gating,
    DP-SGD, privacy ledgers and signed receipts (InProcessFederatedRunner)."""
    from sqlalchemy import create_engine

    from exchange.coordinator.client import decision_entry
    from exchange.http_signing import sign_request
    from federated.privacy_ledger import PrivacyLedger
    from federated.runtime.demo_sites import approve, provision_sites

    hospitals = ("hospital-a", "hospital-b", "hospital-c")
    approving = ("hospital-a", "hospital-b")
    rounds = 2
    sites = provision_sites(tmp_path / "sites", hospitals=hospitals)
    runner = ObservedRunner(InProcessFederatedRunner({h: sites[h].site.node_config() for h in hospitals},
                                                     tmp_path / "runs"))
    for client, runtime, key in _in_process_coordinator(tmp_path, runner, sites):
        headers = {"Authorization": f"Bearer {key}"}
        body = {"title": "bridge", "purpose": "GRU", "commercial": False, "ethics_approval": True,
                "data_categories": sorted(_columns()), "columns": _columns(),
                "template": "logistic_regression", "task": "binary", "label": "malignant",
                "epsilon": 3.0, "delta": 1e-5, "rounds": rounds, "min_hospitals": 2, "token_budget": 6000}
        response = client.post("/v1/studies", json=body, headers=headers)
        assert response.status_code == 201, response.text
        sid = response.json()["id"]
        for h in approving:
            approve(sites[h].site, sid)  # what the node daemon does when it approves
            entry = decision_entry(sites[h].signer, h, sid, decision="approve", reasons=["policy: ok"],
                                   eligible_records=100)
            request = client.build_request("POST", f"/v1/hospital/studies/{sid}/decision",
                                           json=entry.to_json())
            sign_request(request, sites[h].signer)
            assert client.send(request).status_code == 201
        deadline = time.monotonic() + 300
        while (study := client.get(f"/v1/studies/{sid}", headers=headers).json())["status"] == "running":
            assert time.monotonic() < deadline, "the study is still running"
            time.sleep(0.2)
        assert study["status"] == "completed", study
        results = client.get(f"/v1/studies/{sid}/results", headers=headers).json()
        entries = [e for e in runtime.audit_log.entries() if e.payload.get("study_id") == sid]

    # 4. What the coordinator was told, in order: round 1, round 2, the model; nothing else.
    assert runner.seen.kinds() == [("round", 1), ("round", 2), "complete"]
    # Round r's metrics carry the evaluation of round r's model; the last round's came from the
    # final evaluate-only exchange and is recorded as round `rounds`, not as a round of its own.
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert r["metrics"]["contributors"] == 2.0
        # hold-out evaluation as noised sums (their ratio may be undefined when noise dominates);
        # the exact learning curve comes from the public reference sample
        assert r["metrics"]["eval_hospitals"] == 2 and "ref_accuracy" in r["metrics"]
    assert [("final_eval_wall_s" in r["metrics"]) for r in results["rounds"]] == [False, True]
    # Each study.round entry follows exactly the receipts of its own round.
    current: list[Entry] = []
    for e in entries:
        if e.kind == "round.receipt":
            current.append(e)
        elif e.kind == "study.round":
            assert {c.payload["round"] for c in current} == {e.payload["round"]}
            assert sorted(c.payload["hospital"] for c in current) == [f"hospital:{h}" for h in approving]
            current = []
    assert current == []
    # 2. The hospital that did not approve took no part: no receipt, no charge in its ledger.
    assert [c["hospital_id"] for c in results["contributions"]] == list(approving)
    # 3. Per hospital, the epsilon the results show is what its privacy ledger charged the study
    #    (the cumulative epsilon_total of its last receipt, not a per-round epsilon_spent).
    for h in hospitals:
        engine = create_engine(sites[h].site.ledger_url)
        try:
            ledger = PrivacyLedger(engine)
            spent, charged = ledger.spent(sid), ledger.rounds_charged(sid)
        finally:
            engine.dispose()
        if h not in approving:
            assert (spent, charged) == (0.0, 0)
            continue
        (contribution,) = [c for c in results["contributions"] if c["hospital_id"] == h]
        assert charged == rounds == contribution["rounds"]
        assert contribution["epsilon_spent"] == pytest.approx(spent, rel=1e-12)
        increments = [e.payload["epsilon_spent"] for e in entries
                      if e.kind == "round.receipt" and e.payload["hospital"] == f"hospital:{h}"]
        assert sum(increments) == pytest.approx(spent, rel=1e-9)
        assert max(increments) < spent  # so "max of epsilon_spent" would understate the spend

