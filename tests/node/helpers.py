"""Helpers for node tests: a real coordinator (the Litestar app over uvicorn on loopback,
with the ScriptedRunner so no Flower is needed), records and consent contracts written as
files and imported through the real CLI code paths."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from audit.signing import Signer
from consent import duo
from consent.model import Contract, Provision, revoke
from exchange.coordinator.app import AppConfig, build_runtime, create_app
from exchange.coordinator.client import ApiClient
from exchange.coordinator.schemas import ApiKeyCreate, HospitalCreate, OrganisationCreate, ResearcherCreate
from exchange.node.consent_store import import_consent_folder
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.policy import StudyView
from exchange.node.store import NodeStore
from tests.exchange.scripted_runner import ScriptedRunner

ISSUED = datetime(2025, 1, 1, tzinfo=UTC)
COLUMNS = ["mean_radius", "mean_texture"]


def study_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": "Breast cancer risk", "purpose": "DUO:0000042", "commercial": False,
        "ethics_approval": True, "data_categories": ["labs"], "columns": {"labs": COLUMNS},
        "template": "logistic_regression", "task": "binary", "label": "label", "epsilon": 3.0,
        "delta": 1e-5, "rounds": 2, "min_hospitals": 1, "token_budget": 1000,
    }
    body.update(overrides)
    return body


def study_view(study_id: str, **spec: Any) -> StudyView:
    """A submitted study as the node sees it (acme, DE): a one-round, one-hospital binary study on
    `COLUMNS` with label `label` unless `spec` says otherwise."""
    body: dict[str, Any] = {"title": "t", "purpose": "DUO:0000042", "data_categories": ["labs"],
                            "columns": {"labs": list(COLUMNS)}, "template": "logistic_regression",
                            "task": "binary", "label": "label", "epsilon": 3.0, "delta": 1e-5, "rounds": 1,
                            "min_hospitals": 1, **spec}
    return StudyView.from_json({"id": study_id, "organisation_id": "acme", "organisation_region": "DE",
                                "status": "submitted", "spec": body})


@dataclass
class LiveCoordinator:
    url: str
    researcher: ApiClient
    operator: ApiClient
    runner: ScriptedRunner

    def submit(self, **overrides: Any) -> str:
        return str(self.researcher.post("/v1/studies", study_body(**overrides))["id"])

    def study(self, study_id: str) -> dict[str, Any]:
        return dict(self.researcher.get(f"/v1/studies/{study_id}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_coordinator(tmp_path: Path, hospitals: dict[str, tuple[Signer, str]],
                     pause: threading.Event | None = None) -> Iterator[LiveCoordinator]:
    """The real coordinator app on a loopback port; `hospitals` maps id -> (signing key,
    Flower public key) to register. Runs are scripted (ScriptedRunner), held while `pause`
    is unset."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    runner = ScriptedRunner(hospital_keys={h: s for h, (s, _) in hospitals.items()}, pause=pause)
    keys = tmp_path / "coordinator-keys"
    runtime = build_runtime(AppConfig(database_url=f"sqlite:///{tmp_path / 'coordinator.db'}",
                                      operator_key_file=keys / "operator.key", log_key_file=keys / "log.key",
                                      coordinator_key_file=keys / "coordinator.key", access_log=False),
                            runner)
    c = runtime.lifecycle
    _op, operator_key = c.registry.issue_api_key(ApiKeyCreate(role="operator", label="operator"))
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme Research", region="DE"))
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    _rk, researcher_key = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                                       researcher_id="alice"))
    for hospital_id, (signer, flower_key) in hospitals.items():
        c.registry.register_hospital(HospitalCreate(id=hospital_id, organisation_id="clinics",
                                                    name=hospital_id,
                                                    signing_public_key=signer.public_key_b64,
                                                    flower_public_key=flower_key))
    c.registry.mint("org:acme", 100_000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "coordinator to start")
    url = f"http://127.0.0.1:{port}"
    researcher, operator = ApiClient(url, researcher_key), ApiClient(url, operator_key)
    try:
        yield LiveCoordinator(url=url, researcher=researcher, operator=operator, runner=runner)
    finally:
        if pause is not None:
            pause.set()
        for handle in runner.handles:
            handle.cancel()
            handle.wait(10)
        researcher.close()
        operator.close()
        server.should_exit = True
        thread.join(30)
        runtime.close()


def wait_for(condition: Callable[[], Any], what: str, deadline_s: float = 60.0) -> Any:
    """Poll `condition` until it is truthy. The deadline only keeps a broken test from hanging;
    nothing here measures time."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def seed_records(store: NodeStore, tmp_path: Path, pseudonyms: list[str]) -> None:
    lines = ["pid,mean_radius,mean_texture,label"]
    lines += [f"{p},{10 + i % 7},{15 + i % 5},{i % 2}" for i, p in enumerate(pseudonyms)]
    path = tmp_path / f"records-{len(pseudonyms)}-{pseudonyms[0]}.csv"
    path.write_text("\n".join(lines) + "\n")
    mapping = parse_mapping({"pseudonym_column": "pid",
                             "columns": {"mean_radius": "labs", "mean_texture": "labs",
                                         "label": {"category": "outcomes", "type": "integer"}}})
    with store.transaction() as session:
        import_records(session, path, "csv", mapping)


def gru_contract(pseudonym: str, hospital_id: str) -> Contract:
    return Contract(contract_id=f"{hospital_id}:{pseudonym}", pseudonym=pseudonym, hospital=hospital_id,
                    version=1, issued=ISSUED, provision=Provision(type="permit", purposes=(duo.GRU,)))


def seed_consent(store: NodeStore, folder: Path, contracts: list[Contract], hospital_id: str,
                 signer: Signer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for contract in contracts:
        (folder / f"{contract.pseudonym}-v{contract.version}.json").write_text(json.dumps(contract.to_json()))
    with store.transaction() as session:
        import_consent_folder(session, folder, hospital_id, signer)


__all__ = ["LiveCoordinator", "gru_contract", "live_coordinator", "revoke", "seed_consent", "seed_records",
           "study_body", "wait_for"]


class ExactNoise:
    """A decision-count noise source that adds nothing, for tests that check what the count is
    compared with or what follows a decision (the mechanism's noise is tested in
    tests/node/test_decision_count.py): `monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)`
    makes every decision the node draws deterministic."""

    def __init__(self, *_args: object) -> None:
        pass

    def discrete_laplace(self, epsilon: float) -> int:
        return 0
