"""A real coordinator served over HTTP (uvicorn, loopback) with hospitals that witness its log.

Why: the witness, the monitor and `audit fetch` talk to the coordinator with real HTTP clients
(httpx, RFC 9421-signed requests, long polls); serving the app for real tests exactly that.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from audit.signing import Signer
from exchange.coordinator.app import AppConfig, Runtime, build_runtime, create_app
from exchange.coordinator.client import ApiClient, HospitalClient
from exchange.coordinator.schemas import (
    ApiKeyCreate,
    HospitalCreate,
    OrganisationCreate,
    ResearcherCreate,
)
from exchange.node.keys import witness_signer
from exchange.node.settings import NodeSettings
from exchange.node.witnessing import NodeWitness
from tests.exchange.conftest import flower_key, study_body
from tests.exchange.scripted_runner import ScriptedRunner

HOSPITALS = ("w-one", "w-two", "w-three")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """One coordinator process-part: runtime, HTTP server, URL, API keys."""

    runtime: Runtime
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    keys: dict[str, str] = field(default_factory=dict)

    def api(self, who: str = "auditor") -> ApiClient:
        return ApiClient(self.url, self.keys[who])

    def submit(self) -> dict[str, Any]:
        with self.api("alice") as api:
            return dict(api.post("/v1/studies", study_body()))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def app_config(db_url: str, keys: Path, **extra: Any) -> AppConfig:
    extra.setdefault("access_log", False)
    extra.setdefault("checkpoint_every_s", 0.2)
    return AppConfig(database_url=db_url, operator_key_file=keys / "operator.key",
                     log_key_file=keys / "log.key", coordinator_key_file=keys / "coordinator.key",
                     **extra)


def serve(config: AppConfig, hospital_keys: dict[str, Signer]) -> Served:
    runtime = build_runtime(config, ScriptedRunner(hospital_keys=hospital_keys))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.05)
    return Served(runtime, f"http://127.0.0.1:{port}", server, thread)


def populate(runtime: Runtime, hospitals: dict[str, Signer], witness_keys: dict[str, Path],
             with_witness: tuple[str, ...] = HOSPITALS) -> dict[str, str]:
    """Operator, researcher, auditor, hospitals (with their witness keys); the API keys."""
    c = runtime.lifecycle
    keys = {"operator": c.registry.issue_api_key(ApiKeyCreate(role="operator", label="root"))[1]}
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme", region="DE"))
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    keys["alice"] = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                                 researcher_id="alice"))[1]
    keys["auditor"] = c.registry.issue_api_key(ApiKeyCreate(role="auditor"))[1]
    for name, signer in hospitals.items():
        vkey = (str(witness_signer(name, witness_keys[name]).vkey) if name in with_witness else None)
        c.registry.register_hospital(HospitalCreate(id=name, organisation_id="clinics", name=name.upper(),
                                           signing_public_key=signer.public_key_b64,
                                           flower_public_key=flower_key(), witness_vkey=vkey))
    c.registry.mint("org:acme", 50_000)
    return keys


def node_settings(tmp: Path, hospital_id: str, url: str) -> NodeSettings:
    folder = tmp / hospital_id
    folder.mkdir(parents=True, exist_ok=True)
    return NodeSettings(hospital_id=hospital_id, data_dir=folder, coordinator_url=url)


@contextmanager
def node_witness(settings: NodeSettings, signer: Signer, url: str | None = None,
                 ) -> Iterator[tuple[NodeWitness, HospitalClient]]:
    with HospitalClient(url or settings.coordinator_url, signer, settings.hospital_id) as client:
        yield NodeWitness(settings, client), client
