"""The coordinator driving real federated training.

1. In process: the real ServerApp and ClientApp logic (consent gating, DP-SGD, privacy ledgers,
   signed receipts, FedAvg) over federated's in-process grid, three demo hospitals.
2. The real deployment: a SuperLink and three SuperNodes as separate processes on loopback,
   the ServerApp run by the coordinator in its own process (`FederatedRunner`).

Either way: hospitals decide through the signed API, the run starts by itself, every round's
receipts land in the log, the model is downloadable with the hash the log records, and the
payout the coordinator made is the one the auditor's fold recomputes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from safetensors.numpy import load as load_safetensors

from audit.ledger import Ledger
from exchange.coordinator.app import AppConfig, build_runtime, create_app
from exchange.coordinator.client import decision_entry
from exchange.coordinator.schemas import (
    ApiKeyCreate,
    HospitalCreate,
    OrganisationCreate,
    ResearcherCreate,
)
from exchange.http_signing import sign_request
from exchange.study.runners import FederatedRunner, InProcessFederatedRunner, StudyRunner
from tests.exchange.conftest import flower_key

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def _study(columns: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    return {"title": "Breast cancer, general research", "purpose": "GRU", "commercial": False,
            "ethics_approval": True, "data_categories": sorted(columns), "columns": columns,
            "template": "logistic_regression", "task": "binary", "label": "malignant",
            "epsilon": 3.0, "delta": 1e-5, "rounds": rounds, "min_hospitals": 3, "token_budget": 9000}


def _columns() -> dict[str, list[str]]:
    from federated.data import feature_specs

    out: dict[str, list[str]] = {}
    for spec in feature_specs("breast_cancer"):
        out.setdefault(spec.category, []).append(spec.name)
    return out


def _coordinator(tmp_path: Path, runner: StudyRunner,
                 sites: dict[str, Any]) -> Iterator[tuple[TestClient[Any], Any, str]]:
    keys = tmp_path / "k"
    config = AppConfig(database_url=f"sqlite:///{tmp_path / 'c.db'}", operator_key_file=keys / "op.key",
                       log_key_file=keys / "log.key", coordinator_key_file=keys / "co.key",
                       access_log=False)
    runtime = build_runtime(config, runner)
    c = runtime.lifecycle
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme", region="DE"))
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    key = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                                researcher_id="alice"))[1]
    for h in HOSPITALS:
        c.registry.register_hospital(HospitalCreate(id=h, organisation_id="clinics", name=h,
                                           signing_public_key=sites[h].signer.public_key_b64,
                                           flower_public_key=flower_key()))
    c.registry.mint("org:acme", 20_000)
    with TestClient(app=create_app(runtime)) as client:
        yield client, runtime, key


def _run_study(client: TestClient[Any], runtime: Any, key: str, sites: dict[str, Any], rounds: int,
               timeout: float) -> dict[str, Any]:
    from federated.runtime.demo_sites import approve

    headers = {"Authorization": f"Bearer {key}"}
    response = client.post("/v1/studies", json=_study(_columns(), rounds), headers=headers)
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    for h in HOSPITALS:
        approve(sites[h].site, sid)  # what the node daemon does when it approves
        entry = decision_entry(sites[h].signer, h, sid, decision="approve", reasons=["policy: ok"],
                               eligible_records=100)
        request = client.build_request("POST", f"/v1/hospital/studies/{sid}/decision", json=entry.to_json())
        sign_request(request, sites[h].signer)
        assert client.send(request).status_code == 201
    deadline = time.monotonic() + timeout
    while True:
        study = client.get(f"/v1/studies/{sid}", headers=headers).json()
        if study["status"] not in ("submitted", "running"):
            break
        assert time.monotonic() < deadline, f"study still {study['status']}"
        time.sleep(0.5)
    assert study["status"] == "completed", study
    assert study["rounds_completed"] == rounds
    model = client.get(f"/v1/studies/{sid}/model", headers=headers)
    assert hashlib.sha256(model.content).hexdigest() == study["model_sha256"]
    assert load_safetensors(model.content)
    results = client.get(f"/v1/studies/{sid}/results", headers=headers).json()
    assert {c["hospital_id"] for c in results["contributions"]} == set(HOSPITALS)
    for contribution in results["contributions"]:
        assert contribution["rounds"] == rounds and contribution["records_used"] > 0
        assert 0 < contribution["epsilon_spent"] <= 3.0 + 1e-9
    # The auditor's fold over the log agrees with what the coordinator paid.
    log = runtime.audit_log
    ledger = Ledger(runtime.journal.operator.key_id)
    ledger.apply_all(log.entries())
    served = client.get("/v1/ledger/balances", headers=headers).json()
    assert served["balances"] == {"org:acme": ledger.state.balances["org:acme"]}
    paid = sum(v for k, v in ledger.state.balances.items() if k.startswith("hospital:"))
    assert paid + ledger.state.unclaimed == 9000 and ledger.state.escrow == 0
    kinds = [e.kind for e in log.entries()]
    assert kinds.count("round.receipt") == 3 * rounds and kinds[-1] == "study.payout"
    return study


@pytest.mark.slow
def test_study_with_real_federated_logic_in_process(tmp_path: Path) -> None:
    from federated.runtime.demo_sites import provision_sites

    sites = provision_sites(tmp_path / "sites")
    runner = InProcessFederatedRunner({h: sites[h].site.node_config() for h in HOSPITALS}, tmp_path / "runs")
    for client, runtime, key in _coordinator(tmp_path, runner, sites):
        _run_study(client, runtime, key, sites, rounds=1, timeout=300)


@pytest.mark.slow
@pytest.mark.flower
def test_study_on_the_real_flower_deployment(tmp_path: Path) -> None:
    from federated.runtime.demo_sites import provision_sites
    from federated.runtime.deployment import LocalFederation

    sites = provision_sites(tmp_path / "sites")
    with LocalFederation(tmp_path / "flower", {h: sites[h].site.node_config() for h in HOSPITALS}) as fed:
        runner = FederatedRunner(fed.superlink.address, tmp_path / "runs")
        for client, runtime, key in _coordinator(tmp_path, runner, sites):
            _run_study(client, runtime, key, sites, rounds=2, timeout=400)
