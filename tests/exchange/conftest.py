"""Fixtures for the coordinator: a real database (SQLite and PostgreSQL), real keys, the real
app through Litestar's TestClient, and a world with two organisations, researchers, an
operator, an auditor and three hospitals."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from audit.signing import Signer
from exchange.coordinator.app import AppConfig, Runtime, build_runtime, create_app
from exchange.coordinator.client import decision_entry
from exchange.coordinator.schemas import (
    ApiKeyCreate,
    HospitalCreate,
    OrganisationCreate,
    ResearcherCreate,
)
from exchange.http_signing import sign_request
from tests.conftest import PG_ADMIN_DSN, _require_pg
from tests.exchange.scripted_runner import ScriptedRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def flower_key() -> str:
    """A real SuperNode public key (ECDSA P-384, OpenSSH), as `exchange node init` makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def receipt(signer: Signer, hospital: str, study_id: str, round_number: int, records: int,
            reward_accounts: dict[str, int] | None = None, epsilon_total: float = 0.5) -> Any:
    """A hospital's signed round.receipt entry, in federated's format."""
    from audit.reward_commitment import commit
    from federated.receipts import make_receipt

    return make_receipt(signer, study_id=study_id, round=round_number, hospital_id=hospital,
                        records_used=records, commitment="ab" * 32, epsilon_spent=0.25,
                        epsilon_total=epsilon_total, delta=1e-5, spec_sha256="cd" * 32,
                        rewards=commit(reward_accounts or {}).public()).entry


def study_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": "Breast cancer risk", "purpose": "DUO:0000007", "disease": "C50",
        "commercial": False, "ethics_approval": True, "data_categories": ["labs", "diagnoses"],
        "columns": {"labs": ["mean_radius", "mean_texture"]}, "template": "logistic_regression",
        "task": "binary", "label": "label", "epsilon": 3.0, "delta": 1e-5, "rounds": 2,
        "min_hospitals": 2, "token_budget": 1000,
    }
    body.update(overrides)
    return body


@dataclass
class World:
    """The app and everyone who uses it. Keys are real; the hospitals' runs are scripted."""

    client: TestClient[Any]
    runtime: Runtime
    runner: ScriptedRunner
    keys: dict[str, str] = field(default_factory=dict)  # name -> API key
    hospitals: dict[str, Signer] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def as_(self, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if who in self.hospitals:
            return self.signed(who, method, path, **kwargs)
        headers = dict(kwargs.pop("headers", {}))
        if who != "anonymous":
            headers.update(self.headers(who))
        return self.client.request(method, path, headers=headers, **kwargs)

    def signed(self, hospital: str, method: str, path: str, *, json: Any = None,
               params: dict[str, Any] | None = None, signer: Signer | None = None,
               nonce: str | None = None, content: bytes | None = None) -> httpx.Response:
        request = self.client.build_request(method, path, json=json, params=params, content=content)
        sign_request(request, signer or self.hospitals[hospital], nonce=nonce)
        return self.client.send(request)

    def submit(self, who: str = "alice", **overrides: Any) -> dict[str, Any]:
        response = self.as_(who, "POST", "/v1/studies", json=study_body(**overrides))
        assert response.status_code == 201, response.text
        return dict(response.json())

    def decide(self, hospital: str, study_id: str, decision: str = "approve",
               reasons: list[str] | None = None) -> httpx.Response:
        entry = decision_entry(self.hospitals[hospital], hospital, study_id,
                               decision=decision,  # type: ignore[arg-type]
                               reasons=reasons if reasons is not None else ["policy: ok"],
                               eligible_records=120)
        return self.signed(hospital, "POST", f"/v1/hospital/studies/{study_id}/decision",
                           json=entry.to_json())

    def wait_runs(self) -> None:
        for handle in list(self.runner.handles):
            assert handle.wait(60), "scripted run did not finish"


def make_world(db_url: str, tmp_path: Path, **config: Any) -> Iterator[World]:
    hospitals = {name: Signer.generate() for name in ("h-one", "h-two", "h-three", "h-four")}
    runner = ScriptedRunner(hospital_keys=hospitals, records={"h-one": 120, "h-two": 90, "h-three": 13})
    config.setdefault("access_log", False)
    cfg = AppConfig(database_url=db_url, operator_key_file=tmp_path / "keys" / "operator.key",
                    log_key_file=tmp_path / "keys" / "log.key",
                    coordinator_key_file=tmp_path / "keys" / "coordinator.key", **config)
    runtime = build_runtime(cfg, runner)
    c = runtime.lifecycle
    _op, op_token = c.registry.issue_api_key(ApiKeyCreate(role="operator", label="root operator"))
    for org, region in (("acme", "DE"), ("globex", "FR"), ("clinics", "DE")):
        c.registry.create_organisation(OrganisationCreate(id=org, name=org.title(), region=region))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    c.registry.create_researcher("acme", ResearcherCreate(id="anna", name="Anna"))
    c.registry.create_researcher("globex", ResearcherCreate(id="bob", name="Bob"))
    keys = {"operator": op_token}
    for who, org in (("alice", "acme"), ("anna", "acme"), ("bob", "globex")):
        keys[who] = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id=org,
                                                 researcher_id=who))[1]
    keys["auditor"] = c.registry.issue_api_key(ApiKeyCreate(role="auditor"))[1]
    registered = {}
    for name in ("h-one", "h-two", "h-three"):
        c.registry.register_hospital(HospitalCreate(id=name, organisation_id="clinics", name=name.upper(),
                                           signing_public_key=hospitals[name].public_key_b64,
                                           flower_public_key=flower_key()))
        registered[name] = hospitals[name]
    # h-four is a key nobody registered: an impostor.
    registered["h-four"] = hospitals["h-four"]
    c.registry.mint("org:acme", 50_000)
    c.registry.mint("org:globex", 5_000)
    app = create_app(runtime)
    try:
        with TestClient(app=app, base_url="http://testserver.local") as client:
            yield World(client=client, runtime=runtime, runner=runner, keys=keys, hospitals=registered)
    finally:
        for handle in runner.handles:
            handle.cancel()
        for handle in runner.handles:
            handle.wait(30)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One world per database for a whole module, for tests whose effects are relative
    (snapshots before/after) or that only read."""
    tmp = tmp_path_factory.mktemp("world")
    if request.param == "sqlite":
        yield from make_world(f"sqlite:///{tmp / 'world.db'}", tmp)
        return
    _require_pg()
    import psycopg

    name = f"exchange_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield from make_world(PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}", tmp)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[World]:
    yield from make_world(db_url, tmp_path)


@pytest.fixture
def sqlite_world(sqlite_url: str, tmp_path: Path) -> Iterator[World]:
    yield from make_world(sqlite_url, tmp_path)
