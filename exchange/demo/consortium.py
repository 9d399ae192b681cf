"""A whole consortium on one machine: what `exchange demo` runs (docs/demo.md).

Processes: this one holds the coordinator (the Litestar app on a loopback port, migrating its
database first; SQLite under the work folder unless a URL is given) and runs each approved
study's ServerApp in a thread (federated's in-process runner); a Flower SuperLink
(`--isolation process`); and per hospital one node daemon (`exchange node run`), which itself
supervises that hospital's SuperNode and warm ClientApp executor once it approved a study.

Every step uses the parts' real interfaces: the operator's admin functions (the service code
`exchange admin` calls) for organisations, API keys, hospitals and tokens; the node's own
steward functions (`exchange.node.steward`: what `exchange node init`, `import-data` and
`consent import` call), in this process; the researcher's HTTP API for the study; the
`audit` CLI (`export`, `verify`) as separate processes, as an auditor would run them.

Everything started is stopped on the way out, also on Ctrl-C or SIGTERM: node daemons first
(SIGTERM: each stops its own SuperNode and executor), then the SuperLink, then the coordinator.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from audit.signing import Signer
from exchange.demo.hosts import Loopback, NetnsHosts, Placement
from exchange.demo.round_gate import GatedRunner, RoundGate
from exchange.demo.studies import DemoStudy, get_study
from exchange.node.consent_store import ConsentImportRejectedError
from exchange.node.mapping import ImportRejectedError
from exchange.node.steward import current_catalog, import_consent, import_data, init_node
from exchange.study.runners import FederatedRunner
from exchange.study.spec import AcceptedStudy, consent_request

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
MAX_HOSPITALS = 26
LABEL = "malignant"
T = TypeVar("T")
RESEARCH_ORG = "acme-research"
RESEARCH_REGION = "DE"
RESEARCHER = "alice"
#: The demo's ServerApp waits longer than the default for replies and joins: a loaded machine.
DEMO_TIMEOUT_S = 180.0
HOSPITAL_ORG = "rhine-university-hospitals"
TEMPLATE_AUTHOR = "author:exchange-templates"
ROYALTY_BPS = 500
MINTED = 1_000_000
TERMINAL = ("completed", "failed", "cancelled")


class DemoError(RuntimeError):
    """The demo could not go on; the message says which step failed and why."""


def wait_until(condition: Callable[[], Any], what: str, timeout: float, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy, and return that.

    A poll that times out (an HTTP request to a coordinator busy with many hospitals) counts as
    "not yet", not as a failure: the consortium's own deadline decides when waiting has failed,
    and its error then names what was awaited and the last timeout seen.
    """
    deadline = time.monotonic() + timeout
    last_timeout: httpx.TimeoutException | None = None
    while True:
        try:
            value = condition()
        except httpx.TimeoutException as error:
            last_timeout, value = error, None
        if value:
            return value
        if time.monotonic() > deadline:
            cause = f" (the last poll timed out: {last_timeout!r})" if last_timeout else ""
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}{cause}")
        time.sleep(interval)


@dataclass
class DemoConfig:
    """What `exchange demo` runs; every default is the documented demo."""

    out: Path
    db_url: str | None = None
    rounds: int = 5
    epsilon: float = 3.0
    delta: float = 1e-5
    token_budget: int = 100_000
    #: hospital whose site policy caps epsilon per study below the study's (it refuses)
    strict_hospital: str | None = "hospital-c"
    strict_max_epsilon: float = 2.0
    #: records revoked at each of these hospitals, right after its first round was charged
    revoke: dict[str, int] = field(default_factory=lambda: {"hospital-a": 3, "hospital-b": 2})
    seed: int = 7
    #: seconds between node daemon steps (the node's default is 2 s)
    node_poll_s: float = 0.5
    #: hospitals register witness keys and cosign the log's checkpoints (the export then
    #: verifies with the witness quorum); False: the log key alone, as before witnesses
    witnesses: bool = True
    timeout_s: float = 600.0
    #: which study (exchange.demo.studies): "breast-cancer" or "survival"
    study: str = "breast-cancer"
    #: how many hospitals (hospital-a, -b, ...; `hospital_ids`); the demo's story has three
    hospitals: int = 3
    #: the site policy's smallest eligible cohort (a split over many hospitals leaves few each)
    min_eligible_records: int = 20
    #: the study's `min_hospitals` (None: 2) and `secure_aggregation` (None: the exchange's default)
    min_hospitals: int | None = None
    secure_aggregation: bool | None = None
    #: the study asks for only its dataset's first N feature columns (None: all); fewer Cox
    #: coefficients need fewer events per hospital (tests/bench/bench_scale.py at 25 hospitals)
    features: int | None = None
    #: the study's DUO purpose (None: the demo study's own); e.g. "DUO:0000006" (HMB: health,
    #: medical or biomedical research) for the survival study, which the demo's HMB consents
    #: permit as well as its GRU ones, so more of each hospital's patients are eligible
    purpose: str | None = None
    #: "loopback": every party on 127.0.0.1; "netns": each hospital on its own network host
    #: (exchange.demo.hosts; needs root), the coordinator over HTTPS
    hosts: str = "loopback"

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def demo_study(self) -> DemoStudy:
        return get_study(self.study)

    @property
    def hospital_ids(self) -> tuple[str, ...]:
        return hospital_ids(self.hospitals)


def hospital_ids(count: int) -> tuple[str, ...]:
    """hospital-a, hospital-b, ...: the demo's hospitals (at most 26)."""
    if not 1 <= count <= MAX_HOSPITALS:
        raise ValueError(f"hospitals: between 1 and {MAX_HOSPITALS}, not {count}")
    return tuple(f"hospital-{chr(ord('a') + i)}" for i in range(count))


@dataclass
class Hospital:
    id: str
    dir: Path
    health_port: int
    issuer: Signer
    contracts: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    revoked: list[str] = field(default_factory=list)
    revoked_at: str | None = None
    revoke_imported_at: str | None = None
    witness_vkey: str | None = None  # registered in the log; cosigns checkpoints

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "daemon.log"


@dataclass
class Progress:
    """What the live display shows; written by the demo's main thread only."""

    phase: str = "starting"
    phases: dict[str, float] = field(default_factory=dict)
    study_id: str | None = None
    status: str = "-"
    round: int = 0
    rounds: int = 0
    accuracy: float | None = None
    #: what `accuracy` holds: "accuracy", or "concordance" for a survival study
    metric: str = "accuracy"
    hospitals: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s  {text}")
        del self.events[:-8]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: never outlive the demo, even on kill -9


#: where route_logs_to_file sends this process's logs (set on its first call)
_LOG_FILE: dict[str, Path] = {}


def route_logs_to_file(path: Path) -> None:
    """Send this process's log output (structlog events of the coordinator and the runner,
    stdlib loggers of Litestar, httpx and Flower) to `path`, so the terminal shows only the
    demo's own display. Called again after each phase, since libraries add console handlers
    when they are first imported or started (Litestar does at app start-up)."""
    import logging

    import structlog

    _LOG_FILE["path"] = path
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    loggers = [root, *(logger for logger in logging.root.manager.loggerDict.values()
                       if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):  # console, queue (Litestar) and Alembic handlers
            if not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        if logger is not root:
            logger.propagate = True
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
               for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        log_file = path.open("a")  # closed at exit; structlog writes JSON lines here
        structlog.configure(
            processors=[structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso", utc=True),
                        structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
            logger_factory=structlog.PrintLoggerFactory(file=log_file), cache_logger_on_first_use=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def node_step(action: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one of the node's steward functions (`exchange.node.steward`) for the demo; raises
    DemoError naming the step when it fails. Logs go back to the demo's file afterwards (the
    node store's migrations, run by Alembic, reconfigure logging to stderr)."""
    try:
        return fn(*args)
    except (OSError, ValueError, ConsentImportRejectedError, ImportRejectedError) as exc:
        raise DemoError(f"{action} failed: {exc}") from exc
    finally:
        if "path" in _LOG_FILE:
            route_logs_to_file(_LOG_FILE["path"])


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def breast_cancer_columns() -> dict[str, list[str]]:
    """Data category -> column names (spaces as underscores) of the breast cancer features."""
    from federated.data import feature_specs

    out: dict[str, list[str]] = {}
    for spec in feature_specs("breast_cancer"):
        out.setdefault(spec.category, []).append(spec.name.replace(" ", "_"))
    return out


def study_body(config: DemoConfig) -> dict[str, Any]:
    """The researcher's study request (the coordinator's StudyCreate) for the configured study."""
    body = {
        **config.demo_study.body_fields(config.features), "commercial": False, "ethics_approval": True,
        "epsilon": config.epsilon, "delta": config.delta, "rounds": config.rounds,
        "min_hospitals": config.min_hospitals or 2, "token_budget": config.token_budget,
    }
    if config.secure_aggregation is not None:
        body["secure_aggregation"] = config.secure_aggregation
    if config.purpose is not None:
        body["purpose"] = config.purpose
    return body


class Consortium:
    """Starts, drives and stops the demo's processes (see the module docstring)."""

    def __init__(self, config: DemoConfig, progress: Progress | None = None,
                 on_update: Callable[[], None] | None = None) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.on_update = on_update or (lambda: None)
        self.hospitals: dict[str, Hospital] = {}
        self.runtime: Any = None
        self.server: Any = None
        self.server_thread: threading.Thread | None = None
        self.superlink: Any = None
        self.url = ""
        self.researcher_key = ""
        self.operator_key = ""
        self.db_url = ""
        self.study_id: str | None = None
        self.runner: FederatedRunner | None = None
        #: holds the study between rounds while a revocation is imported (round_gate.py)
        self.round_gate = RoundGate()
        self._polling_api: Any = None
        self._polling_lock = threading.Lock()
        self.tls: Any = None
        self.placement: Placement = Loopback()
        #: seconds from the start of `run` to: every daemon online, every decision in
        self.milestones: dict[str, float] = {}
        self._started = time.monotonic()
        self._stopped = False

    # -- phases -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        route_logs_to_file(self.config.work / "demo.log")
        self.progress.phase = name
        self.progress.event(f"{name} ...")
        self.on_update()
        started = time.monotonic()
        yield
        self.progress.phases[name] = round(time.monotonic() - started, 2)
        route_logs_to_file(self.config.work / "demo.log")
        self.on_update()

    def run(self) -> dict[str, Any]:
        """The whole demo; returns the report (also written to DIR)."""
        cfg = self.config
        cfg.work.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        with self.phase("coordinator"):
            if cfg.hosts == "netns":
                self.placement = NetnsHosts.create(cfg.hospital_ids)
                self.progress.event(f"network: hospitals on {', '.join(self.placement.addresses.values())}, "
                                    f"coordinator and SuperLink on {self.placement.server_host}")
            elif cfg.hosts != "loopback":
                raise DemoError(f"hosts: {cfg.hosts!r} is not one of loopback, netns")
            superlink_started = self._start_superlink()
            self.start_coordinator()
        with self.phase("hospitals join"):
            self.init_hospitals()
            # keys first: each node starts its SuperNode once registered (supernode.start), and
            # the SuperLink refuses an unregistered key (Flower exit 305, then a restart later)
            superlink_started.wait()
            if self._superlink_error is not None:
                raise DemoError(f"the SuperLink did not start: {self._superlink_error}")
            self.register_flower_keys()
            self.start_daemons()  # they boot while the data is imported
        with self.phase("data import"):
            self.import_hospital_data()
            self.wait_for_catalogs()
        with self.phase("study submitted"):
            self.submit_study()
        with self.phase("hospitals decide"):
            self.wait_for_decisions()
        with self.phase("training"):
            self.follow_training()
        with self.phase("cosigned checkpoint"):
            self.wait_for_cosigned_checkpoint()
        with self.phase("audit"):
            audit = self.export_and_verify()
        with self.phase("report"):
            from exchange.demo.collect import collect_report

            report = collect_report(self, audit)
        return report

    # -- coordinator --------------------------------------------------------------------------
    _superlink_error: str | None = None

    def _start_superlink(self) -> threading.Event:
        """TLS files and the SuperLink's address now (node configs need them); the process
        itself starts in a thread while the coordinator and the hospitals are set up."""
        from federated.runtime.deployment import SuperLinkProcess
        from federated.runtime.tls import generate_tls

        # TLS and SuperNode authentication on, as in production: each hospital's Flower key is
        # registered with the SuperLink by the operator (register_flower_keys).
        # One certificate for the operator's host: the SuperLink and the coordinator's HTTPS.
        host = self.placement.server_host
        self.tls = generate_tls(self.config.work / "tls", ips=tuple(dict.fromkeys(("127.0.0.1", host))))
        self.superlink = SuperLinkProcess(self.config.work / "superlink", host=host, tls=self.tls,
                                          supernode_auth=True)
        self.superlink.workdir.mkdir(parents=True, exist_ok=True)

        started = threading.Event()

        def start() -> None:
            # Children live as long as this process (the runtime spawns them from one
            # long-lived thread), so this thread may end once the SuperLink is up.
            try:
                self.superlink.start()
            except Exception as exc:
                self._superlink_error = str(exc)
            finally:
                started.set()

        threading.Thread(target=start, name="superlink", daemon=True).start()
        return started

    @property
    def superlink_address(self) -> str:
        assert self.superlink is not None
        return str(self.superlink.address)

    def start_coordinator(self) -> None:
        import uvicorn

        from exchange.coordinator.app import AppConfig, build_runtime, create_app
        from exchange.coordinator.schemas import ApiKeyCreate, OrganisationCreate, ResearcherCreate

        work = self.config.work
        self.db_url = self.config.db_url or f"sqlite:///{work / 'coordinator.db'}"
        keys = work / "coordinator-keys"
        self._superlink_ready = threading.Event()
        # The production runner (the superlink address and CA are set once the SuperLink runs).
        self.runner = GatedRunner("", work / "models", round_timeout_s=DEMO_TIMEOUT_S,
                                  join_timeout_s=DEMO_TIMEOUT_S, gate=self.round_gate)
        self.runtime = build_runtime(AppConfig(
            database_url=self.db_url, operator_key_file=keys / "operator.key", log_key_file=keys / "log.key",
            coordinator_key_file=keys / "coordinator.key", log_origin="demo.exchange.local/log",
            royalties={self.config.demo_study.template: (TEMPLATE_AUTHOR, ROYALTY_BPS)}, access_log=False),
            self.runner)
        c = self.runtime.registry
        # The operator's admin functions (what `exchange admin ...` runs).
        _op, self.operator_key = c.issue_api_key(ApiKeyCreate(role="operator", label="demo operator"))
        c.create_organisation(OrganisationCreate(id=RESEARCH_ORG, name="Acme Research",
                                                 region=RESEARCH_REGION))
        c.create_organisation(OrganisationCreate(id=HOSPITAL_ORG, name="Rhine University Hospitals",
                                                 region="DE"))
        c.create_researcher(RESEARCH_ORG, ResearcherCreate(id=RESEARCHER, name="Alice Example"))
        _rk, self.researcher_key = c.issue_api_key(ApiKeyCreate(
            role="researcher", organisation_id=RESEARCH_ORG, researcher_id=RESEARCHER,
            label="demo researcher"))
        c.mint(f"org:{RESEARCH_ORG}", MINTED)
        host = self.placement.server_host
        port = free_port(host)
        # HTTPS when hospitals are on other hosts (plain HTTP leaves only loopback).
        https = self.placement.remote
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.runtime), host=host, port=port, log_level="warning", lifespan="on",
            ssl_certfile=str(self.tls.server_cert) if https else None,
            ssl_keyfile=str(self.tls.server_key) if https else None))
        self.server_thread = threading.Thread(target=self.server.run, name="coordinator", daemon=True)
        self.server_thread.start()
        self._wait(lambda: self.server.started, "the coordinator to listen", 60)
        self.url = f"{'https' if https else 'http'}://{host}:{port}"
        self.progress.event(f"coordinator on {self.url} ({self.db_url.split(':', 1)[0]})")

    # -- hospitals ----------------------------------------------------------------------------
    def init_hospitals(self) -> None:
        """The node's init (what `exchange node init` runs) per hospital, the steward's
        node.toml, and the operator's registration of the hospital with the identity `init`
        returned."""
        from exchange.coordinator.schemas import HospitalCreate

        registry = self.runtime.registry
        for hospital_id in self.config.hospital_ids:
            h = Hospital(hospital_id, self.config.work / hospital_id, free_port(), Signer.generate())
            self.hospitals[hospital_id] = h
            self.progress.hospitals[hospital_id] = {"state": "init"}
            self.on_update()
            identity = node_step(f"{hospital_id}: node init", init_node, h.dir, hospital_id, self.url,
                                 "127.0.0.1:9093").identity
            self._write_node_config(h)
            registry.register_hospital(HospitalCreate(
                id=hospital_id, organisation_id=HOSPITAL_ORG, name=f"Hospital {hospital_id[-1].upper()}",
                signing_public_key=identity.public_key_b64, flower_public_key=identity.flower_public_key,
                witness_vkey=identity.witness_vkey if self.config.witnesses else None))
            h.witness_vkey = identity.witness_vkey if self.config.witnesses else None
            self.progress.hospitals[hospital_id]["state"] = "registered"
        self.progress.event(f"{len(self.hospitals)} hospital nodes initialised and registered by the "
                            "operator")

    def import_hospital_data(self) -> None:
        """Each hospital imports its part of the data and its patients' consent contracts with
        the node's own steward functions."""
        parts = self.config.demo_study.parts(self.config.hospital_ids)
        for index, h in enumerate(self.hospitals.values()):
            data = parts[h.id]
            records_csv, mapping = self._write_records(h, data)
            node_step(f"{h.id}: import-data", import_data, self._settings(h), records_csv, None, mapping)
            consent_dir = self._write_contracts(h, list(data.pseudonyms), self.config.seed + index)
            node_step(f"{h.id}: consent import", import_consent, self._settings(h), consent_dir)
            self.progress.hospitals[h.id].update(records=len(data), contracts=len(h.contracts))
            self.progress.event(f"{h.id}: {len(data)} records, {len(h.contracts)} consent contracts "
                                "imported")
            self.on_update()

    def wait_for_catalogs(self) -> None:
        """Wait until the coordinator holds each hospital's catalog as it stands after the
        import: the submission's feasibility check reads the published catalogs, and a daemon
        that published before its import finished would make the study look unservable."""
        expected = {h.id: node_step(f"{h.id}: catalog", current_catalog, self._settings(h))
                    .model_dump(mode="json") for h in self.hospitals.values()}

        def published() -> bool:
            for h in self.hospitals.values():
                self._check_daemon(h)
            listing = self.polling_api().get("/v1/catalogs")
            held = {row["hospital_id"]: row["catalog"] for row in listing["hospitals"]}
            return all(held.get(hospital) == catalog for hospital, catalog in expected.items())

        self._wait(published, "every hospital's catalog to reach the coordinator",
                   90 + 6 * len(self.hospitals))  # the daemons boot meanwhile (wait_for_daemons)
        self.progress.event(f"{len(self.hospitals)} catalogs published")

    def register_flower_keys(self) -> None:
        """The operator registers each hospital's Flower public key (from `node init`) with the
        SuperLink; a SuperNode with an unregistered key is refused."""
        from federated.runtime.tls import register_supernode

        assert self.superlink is not None
        control = self.superlink.control_client()
        try:
            for h in self.hospitals.values():
                register_supernode(control, self._settings(h).flower_public_key_path, name=h.id)
        finally:
            control.close()

    def _settings(self, h: Hospital) -> Any:
        from exchange.node.settings import load_node_settings

        return load_node_settings(h.config)

    def _write_node_config(self, h: Hospital) -> None:
        """The steward's edits to node.toml: the SuperLink and ports the operator assigned, and
        the site policy (auto-approve; the strict hospital caps epsilon per study)."""
        from exchange.node.settings import render_toml

        settings = self._settings(h)
        strict = h.id == self.config.strict_hospital
        policy = settings.policy.model_copy(update={
            "mode": "auto-approve",
            "max_epsilon_per_study": self.config.strict_max_epsilon if strict else 10.0,
            "total_privacy_budget": 20.0, "min_eligible_records": self.config.min_eligible_records})
        supernode = settings.supernode.model_copy(update={
            "superlink_address": self.superlink_address if self.superlink is not None else "127.0.0.1:9092",
            "insecure": self.tls is None,
            "root_certificates": self.tls.ca_cert.resolve() if self.tls is not None else None,
            "clientappio_address": f"127.0.0.1:{free_port()}", "restart_backoff_initial_s": 0.5,
            # the consortium exists to run studies: Flower warm before the first one arrives
            "start": "registered"})
        # The coordinator's CA when it serves HTTPS (hospitals on other hosts).
        coordinator_ca = self.tls.ca_cert.resolve() if self.placement.remote else None
        witness = settings.witness.model_copy(update={"enabled": self.config.witnesses})
        updated = settings.model_copy(update={"policy": policy, "supernode": supernode,
                                              "witness": witness,
                                              "health_port": h.health_port,
                                              "health_host": self.placement.hospital_host(h.id),
                                              "coordinator_root_certificates": coordinator_ca,
                                              "poll_interval_s": self.config.node_poll_s})
        h.config.write_text(render_toml(updated))

    def _write_records(self, h: Hospital, data: Any) -> tuple[Path, Path]:
        """The hospital's part of the non-IID split as the CSV export a hospital would have,
        plus the column -> data category mapping `import-data` needs."""
        inputs = h.dir / "input"
        inputs.mkdir(parents=True, exist_ok=True)
        study = self.config.demo_study
        names = [c.replace(" ", "_") for c in data.columns]
        path = inputs / "records.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient_pseudonym", *names, study.label])
            for pseudonym, row, label in zip(data.pseudonyms, data.x.tolist(), data.y.tolist(), strict=True):
                # a survival time (days) is a number; a class label an integer
                writer.writerow([pseudonym, *(f"{v:.6g}" for v in row),
                                 f"{label:.6g}" if study.event else int(label)])
        lines = ['pseudonym_column = "patient_pseudonym"', "", "[columns]"]
        lines += [f'{name} = {{ category = "{data.categories[column]}", type = "number" }}'
                  if column == study.event else f'{name} = "{data.categories[column]}"'
                  for name, column in zip(names, data.columns, strict=True)]
        label_type = "number" if study.event else "integer"
        label_category = "diagnoses" if study.event else "outcomes"
        lines.append(f'{study.label} = {{ category = "{label_category}", type = "{label_type}" }}')
        mapping = inputs / "mapping.toml"
        mapping.write_text("\n".join(lines) + "\n")
        return path, mapping

    def _write_contracts(self, h: Hospital, pseudonyms: list[str], seed: int) -> Path:
        """A realistic mix (consent.synthetic): mostly general research use, some disease
        specific, some non-commercial only, about 40% naming a reward account; signed by the
        hospital's consent system key. No revocations yet: those come mid-study."""
        from consent.synthetic import make_signed_contracts

        signed = make_signed_contracts(pseudonyms, h.id, h.issuer, seed, revoke_fraction=0.0)
        h.contracts = {s.contract.pseudonym: s.contract for s in signed}
        folder = h.dir / "input" / "consent"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "contracts.json").write_text(json.dumps([s.to_json() for s in signed]))
        return folder

    def start_daemons(self) -> None:
        """`exchange node run` per hospital, each its own process (own session, so a Ctrl-C at
        the terminal reaches only the demo, which then stops them in order)."""
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        for h in self.hospitals.values():
            with h.log_path.open("ab") as log_file:
                h.process = subprocess.Popen(
                    [*self.placement.command_prefix(h.id), sys.executable, "-m", "exchange.cli",
                     "node", "run", "--config", str(h.config)],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
            self.progress.hospitals[h.id]["state"] = "daemon starting"
        self.on_update()

    def wait_for_daemons(self) -> None:
        def registered() -> bool:
            done = True
            for h in self.hospitals.values():
                self._check_daemon(h)
                try:
                    health = _http_json(f"http://{self.placement.hospital_host(h.id)}:{h.health_port}/health",
                                        1.0)
                except OSError:
                    done = False
                    continue
                ok = health.get("coordinator") == "ok"
                self.progress.hospitals[h.id]["state"] = "online" if ok else "daemon up"
                done = done and ok
            self.on_update()
            return done

        self._wait(registered, "every node daemon to reach the coordinator", 90 + 6 * len(self.hospitals))
        self.milestones["online"] = round(time.monotonic() - self._started, 2)
        self.progress.event(f"{len(self.hospitals)} node daemons online, registered with the coordinator")

    def _check_daemon(self, h: Hospital) -> None:
        if h.process is not None and h.process.poll() is not None:
            tail = "\n".join(h.log_path.read_text(errors="replace").splitlines()[-15:])
            raise DemoError(f"{h.id}: node daemon exited with code {h.process.returncode}; "
                            f"log {h.log_path}:\n{tail}")

    # -- the study ----------------------------------------------------------------------------
    def researcher(self) -> Any:
        from exchange.coordinator.client import ApiClient

        return ApiClient(self.url, self.researcher_key, verify=self.verify)

    def operator(self) -> Any:
        from exchange.coordinator.client import ApiClient

        return ApiClient(self.url, self.operator_key, verify=self.verify)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How this process's clients verify the coordinator (its CA when it serves HTTPS)."""
        if not self.placement.remote:
            return True
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    def submit_study(self) -> None:
        assert self.runner is not None
        self.runner.superlink_address = self.superlink_address
        self.runner.root_certificates = self.tls.root_certificates() if self.tls is not None else None
        with self.researcher() as api:
            study = api.post("/v1/studies", study_body(self.config))
        self.study_id = str(study["id"])
        self.progress.study_id = self.study_id
        self.progress.rounds = self.config.rounds
        self.progress.status = str(study["status"])
        self.progress.event(f"study {self.study_id} submitted over the API; "
                            f"{self.config.token_budget} tokens in escrow")

    def polling_api(self) -> Any:
        """The researcher's client the demo polls the coordinator with (the study's status and
        results, twice a second while it waits), made once and closed by `stop`. Why: each
        `ApiClient` builds an httpx client and with it a TLS context (the CA bundle loaded and
        parsed), tens of milliseconds of CPU in the process that also runs the coordinator and
        the ServerApp; a client per poll was 7 % of that process's samples while 25 hospitals
        trained (docs/benchmarks/scale.md)."""
        with self._polling_lock:
            if self._polling_api is None:
                self._polling_api = self.researcher()
            return self._polling_api

    def study(self) -> dict[str, Any]:
        return dict(self.polling_api().get(f"/v1/studies/{self.study_id}"))

    def accepted_study(self) -> AcceptedStudy:
        """The demo study as the coordinator accepted it (what `exchange.study.spec` turns into
        the consent request every hospital decided and trains with)."""
        assert self.study_id is not None
        return AcceptedStudy(study_id=self.study_id, spec=self.study()["spec"],
                             organisation_id=RESEARCH_ORG, region=RESEARCH_REGION,
                             researcher_id=RESEARCHER)

    def wait_for_decisions(self) -> None:
        self.wait_for_daemons()

        def decided() -> bool:
            study = self.study()
            self.progress.status = str(study["status"])
            for d in study["decisions"]:
                row = self.progress.hospitals[d["hospital_id"]]
                if row.get("decision") != d["decision"]:
                    row["decision"] = d["decision"]
                    row["state"] = "approved" if d["decision"] == "approve" else "refused"
                    reasons = "; ".join(d["reasons"])
                    self.progress.event(f"{d['hospital_id']} {d['decision']}s: {reasons}")
            for h in self.hospitals.values():
                self._check_daemon(h)
            self.on_update()
            return len(study["decisions"]) == len(self.hospitals) or study["status"] != "submitted"

        # each decision is CPU work at its hospital (eligibility, then the DP plan calibrated at
        # approval): on one machine they queue for its cores, so the wait grows with the count
        self._wait(decided, "the hospitals' decisions", 120 + 6 * len(self.hospitals))
        self.milestones["decided"] = round(time.monotonic() - self._started, 2)

    def follow_training(self) -> None:
        """Poll the coordinator (rounds, status) and the nodes' privacy ledgers (training
        progress per hospital); revoke consent mid-study when a hospital finished round 1."""
        from sqlalchemy import create_engine

        from federated.privacy_ledger import PrivacyLedger

        assert self.study_id is not None
        ledgers = {h.id: PrivacyLedger(create_engine(self._settings(h).db_url))
                   for h in self.hospitals.values()}
        try:
            def step() -> bool:
                study = self.study()
                status = str(study["status"])
                self.progress.status = status
                results = self.polling_api().get(f"/v1/studies/{self.study_id}/results")
                if results["rounds"]:
                    last = results["rounds"][-1]
                    self.progress.round = int(last["round"])
                    metric = self.config.demo_study.metric
                    accuracy = last["metrics"].get(f"ref_{metric}", last["metrics"].get(f"eval_{metric}"))
                    self.progress.accuracy = float(accuracy) if accuracy is not None else None
                for h in self.hospitals.values():
                    self._check_daemon(h)
                    charges = ledgers[h.id].charges(str(self.study_id))
                    row = self.progress.hospitals[h.id]
                    if "decision" not in row:  # decided after the study started: ask the node
                        self._late_decision(h, row)
                    if charges:
                        row["state"] = f"trained round {charges[-1].round}"
                        # the study's spend: the decision count's epsilon + DP-SGD's
                        row["epsilon"] = ledgers[h.id].spent(str(self.study_id))
                    want = self.config.revoke.get(h.id, 0)
                    if want and not h.revoked and charges and status == "running":
                        self.revoke_consent(h, want)
                for item in results["contributions"]:
                    self.progress.hospitals[item["hospital_id"]]["records_used"] = item["records_used"]
                self.on_update()
                return status in TERMINAL

            self._wait(step, "the study to finish", self.config.timeout_s, interval=0.5)
        finally:
            for ledger in ledgers.values():
                ledger.engine.dispose()
        study = self.study()
        if study["status"] != "completed":
            raise DemoError(f"study {self.study_id} ended {study['status']}: {study.get('outcome_reason')}")
        self.progress.event(f"study completed; model sha256 {str(study['model_sha256'])[:16]}...; "
                            f"escrow paid out")

    def _late_decision(self, h: Hospital, row: dict[str, Any]) -> None:
        """A decision the coordinator no longer took (decisions close when a study starts) is
        still the node's signed record; show it."""
        from exchange.demo.collect import node_decision_of

        decision = node_decision_of(self._settings(h).db_url, str(self.study_id))
        if decision is not None:
            row["decision"] = decision["decision"]
            row["state"] = "approved" if decision["decision"] == "approve" else "refused"
            self.progress.event(f"{h.id} {decision['decision']}s (after the study started): "
                                f"{'; '.join(decision['reasons'])}")

    def revoke_consent(self, h: Hospital, count: int) -> None:
        """Patients withdraw consent: new contract versions that permit nothing, signed by the
        hospital's consent system and imported with `exchange node consent import` (which
        refreshes the ClientApp's files, so the next round no longer uses these records)."""
        from consent.model import revoke, sign
        from exchange.node.site_export import node_config
        from federated.runtime.site import Site

        assert self.study_id is not None
        settings = self._settings(h)
        site = Site.from_node_config(node_config(settings))
        data, _label = site.records()
        train = data.train()
        request = consent_request(self.accepted_study())
        # Held between two rounds (round_gate.py: no hospital gates meanwhile), the revocation is
        # effective from now and imported before the run goes on: every round gates entirely
        # before it or entirely after it, and the report's recomputation of each round's gating
        # is exact (see docs/demo.md).
        self.round_gate.hold_next()
        try:
            if not self.round_gate.wait_held(self.config.timeout_s,
                                             lambda: self.study()["status"] == "running"):
                self.progress.event(f"{h.id}: the study ended before its patients could revoke consent")
                return
            now = datetime.now(UTC)
            gate = site.gate(request, train.pseudonyms, now)
            chosen = sorted(gate.eligible)[:count]
            folder = h.dir / "input" / "revocations"
            folder.mkdir(parents=True, exist_ok=True)
            documents = [sign(revoke(h.contracts[p], now), h.issuer).to_json() for p in chosen]
            (folder / "revocations.json").write_text(json.dumps(documents))
            node_step(f"{h.id}: consent import", import_consent, self._settings(h), folder)
            h.revoked = chosen
            h.revoked_at = now.isoformat()
            h.revoke_imported_at = datetime.now(UTC).isoformat()
        finally:
            self.round_gate.release()
        self.progress.event(f"{h.id}: {len(chosen)} patients revoked consent mid-study")

    # -- audit --------------------------------------------------------------------------------
    def wait_for_cosigned_checkpoint(self) -> None:
        """Wait until a checkpoint of the whole log (the completed study included) has the
        witnesses' quorum of cosignatures: the coordinator signs one within seconds by itself
        and the hospitals' witnesses cosign it as soon as they see it."""
        checkpointing = self.runtime.checkpointing
        size = self.runtime.audit_log.size()
        if not checkpointing.wait_cosigned(size, 60):
            raise DemoError(f"no checkpoint of {size} entries reached the witness quorum in 60 s: "
                            f"{checkpointing.status()}")
        status = checkpointing.status()
        who = ", ".join(status["cosigned_by"]) or "no witness (quorum 0)"
        self.progress.event(f"checkpoint of {status['cosigned_size']} entries cosigned by {who}")

    def export_and_verify(self) -> dict[str, Any]:
        """`audit fetch` from the coordinator (entries paged, the cosigned checkpoint, trust)
        and `audit verify`, as an auditor runs them: the export in DIR/audit/, checked against
        the pinned trust file (the log's keys and the hospitals' witness keys, majority quorum)."""
        from audit.cosignature import parse_witness_vkey
        from audit.export import Trust
        from exchange.coordinator.schemas import ApiKeyCreate

        keys = self.config.work / "coordinator-keys"
        trust = Trust(origin=self.runtime.config.log_origin,
                      operator_public_key=Signer.load(keys / "operator.key").public_key,
                      log_public_key=Signer.load(keys / "log.key").public_key)
        trust = trust.with_witnesses(parse_witness_vkey(h.witness_vkey)
                                     for h in self.hospitals.values() if h.witness_vkey)
        trust_path = self.config.out / "trust.json"
        trust_path.write_text(json.dumps(trust.to_json(), indent=2) + "\n")
        auditor_key = self.runtime.registry.issue_api_key(ApiKeyCreate(role="auditor"))[1]
        audit_dir = self.config.out / "audit"
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "EXCHANGE_API_KEY": auditor_key}
        if self.placement.remote:  # an auditor trusts the coordinator's CA like any HTTPS client
            env["SSL_CERT_FILE"] = str(self.tls.ca_cert)
        cli = [sys.executable, "-m", "audit.cli"]
        fetch = subprocess.run([*cli, "fetch", "--url", self.url, "--out", str(audit_dir), "--trust",
                                str(trust_path), "--force"], capture_output=True, text=True, env=env,
                               timeout=300, check=False)
        if fetch.returncode != 0:
            raise DemoError(f"audit fetch exited {fetch.returncode}: {fetch.stderr or fetch.stdout}")
        verify = subprocess.run([*cli, "verify", str(audit_dir), "--trust", str(trust_path), "--json"],
                                capture_output=True, text=True, env=env, timeout=300, check=False)
        try:
            result = json.loads(verify.stdout)
        except ValueError:
            result = {"ok": False, "problem": {"reason": verify.stdout + verify.stderr}}
        if verify.returncode != 0 or not result.get("ok"):
            raise DemoError(f"audit verify failed (exit {verify.returncode}): {result.get('problem')}")
        witnesses = result.get("witnesses") or {}
        self.progress.event(f"audit log: {result['entries']} entries fetched and verified; "
                            f"{len(witnesses.get('signed', {}) or {})} witness cosignatures "
                            f"(quorum {witnesses.get('quorum', 0)})")
        return {"entries": result["entries"], "verified": True, "root": result["root"],
                "checkpoint_size": result["entries"], "kinds": result.get("kinds", {}),
                "ledger": result.get("ledger"), "export": str(audit_dir), "trust": str(trust_path),
                "witnesses": witnesses,
                "commands": [f"audit fetch --url {self.url} --out {audit_dir} --trust {trust_path}",
                             f"audit verify {audit_dir} --trust {trust_path}"]}

    def network(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Where each party ran, for the report; across hosts also the check that each node
        daemon really ran in its own network namespace and reached the servers only over HTTPS
        (coordinator) and TLS with SuperNode authentication (SuperLink)."""
        info: dict[str, Any] = {"placement": self.config.hosts, "coordinator": self.url,
                                "superlink": self.superlink_address, "hospitals": {}}
        if not isinstance(self.placement, NetnsHosts):
            return info, []
        wrong: list[str] = []
        for h in self.hospitals.values():
            settings = self._settings(h)
            namespace = self.placement.namespace_of(h.process.pid) if h.process is not None else None
            info["hospitals"][h.id] = {"address": self.placement.hospital_host(h.id), "namespace": namespace}
            expected = self.placement.namespaces[h.id]
            if namespace != expected:
                wrong.append(f"{h.id}: daemon in namespace {namespace!r}, not {expected!r}")
            if not settings.coordinator_url.startswith("https://"):
                wrong.append(f"{h.id}: coordinator_url {settings.coordinator_url} is not HTTPS")
            if settings.supernode.insecure or settings.supernode.root_certificates is None:
                wrong.append(f"{h.id}: SuperNode without TLS")
        return info, [{"check": "each hospital ran on a network host of its own, over HTTPS and TLS",
                       "ok": not wrong, "detail": "; ".join(wrong)}]

    # -- shutdown -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything this demo started (idempotent; never raises)."""
        if self._stopped:
            return
        self._stopped = True
        for h in self.hospitals.values():
            if h.process is not None and h.process.poll() is None:
                with contextlib.suppress(OSError):
                    h.process.send_signal(signal.SIGTERM)
        for h in self.hospitals.values():
            if h.process is None:
                continue
            try:
                h.process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(h.process.pid, signal.SIGKILL)
                h.process.wait(10)
        if self.runner is not None:
            for handle in self.runner.handles:
                handle.cancel()
        if self.superlink is not None:
            with contextlib.suppress(Exception):
                self.superlink.stop()
        if self.runner is not None:
            for handle in self.runner.handles:
                handle.wait(20)
        if self.server is not None:
            self.server.should_exit = True
            if self.server_thread is not None:
                self.server_thread.join(20)
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                self.runtime.close()
        with self._polling_lock:
            if self._polling_api is not None:
                self._polling_api.close()
                self._polling_api = None
        self.placement.close()

    # -- helpers ------------------------------------------------------------------------------
    def _wait(self, condition: Callable[[], Any], what: str, timeout: float, interval: float = 0.2) -> Any:
        return wait_until(condition, what, timeout, interval)
