"""`exchange node run`: the hospital node daemon.

One loop, one thread of work (the /health server answers from a snapshot on its own
thread). Each step: make sure the coordinator knows this node, fetch the studies, decide on
new ones by site policy (or leave them for the steward), post every decision not yet
acknowledged, keep the Flower SuperNode and its warm executor running while an approved
study is unfinished, and copy the privacy ledger's charges into the rounds table.

Everything the daemon knows is in its database, written before it acts on it, so a restart
after SIGTERM, a crash or kill -9 resumes where it was: decided studies are never decided
again, unposted decisions are posted, the SuperNode comes back for unfinished studies, and
privacy spent lives in the ledger (idempotent per round), never in memory.

SIGTERM/SIGINT: finish the current step, stop the children (SIGTERM, then SIGKILL after a
grace period), exit 0.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select

from audit.entry import Entry
from audit.signing import Signer
from exchange.logging import get_logger
from exchange.node.catalog import publish_catalog
from exchange.node.decisions import (
    TERMINAL,
    Context,
    approved_active,
    mark_posted,
    mark_rejected,
    observe_study,
    unposted,
)
from exchange.node.models import RoundRow, StudyRow
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings
from exchange.node.site_export import approved_specs, export_site, site_paths, write_approvals
from exchange.node.store import NodeStore, open_store
from exchange.node.supervisor import ChildSpec, Supervisor
from exchange.node.witness_loop import WitnessLoop
from exchange.node.witnessing import WitnessLink

log = get_logger("exchange.node")
STUDY_PAGE = 100
#: Once the coordinator has answered `me`, a step asks it again only this often (or after a
#: failed request): every step lists the studies anyway, a signed request that fails the same
#: way for an unknown hospital, and every signed request costs the coordinator a write (its
#: replay-protection nonce) while many hospitals poll it (docs/benchmarks/scale.md, 25 hospitals)
REGISTRATION_RECHECK_S = 60.0
#: The step's time goes to the node database at most this often (the health endpoint has every
#: step's): a write, and on SQLite an fsync, at every step of every idle hospital bought nothing
STEP_RECORD_S = 10.0
#: A settled daemon (nothing committed to its database, the same answer from the coordinator)
#: still makes a whole pass this often: what a pass reads besides those two (the date a waiting
#: study's evaluation depends on, a site file removed by hand) is seen within it
SETTLED_PASS_MAX_S = 60.0
CHILD_STOP_GRACE_S = 10.0


class CoordinatorLink:
    """The coordinator as the daemon uses it, over its hospital client helper
    (`exchange.coordinator.client.HospitalClient`, RFC 9421-signed requests)."""

    def __init__(self, settings: NodeSettings, signer: Signer) -> None:
        from exchange.coordinator.client import HospitalClient

        self.client = HospitalClient(settings.coordinator_url, signer, settings.hospital_id,
                                     verify=settings.coordinator_tls())

    def me(self) -> dict[str, Any]:
        return self.client.me()

    def studies(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = self.client.studies(status="all", offset=offset, limit=STUDY_PAGE)
            items.extend(page.get("items", []))
            offset = page.get("next_offset")
        return items

    def post_decision(self, study_id: str, envelope: dict[str, Any]) -> None:
        self.client.submit_entry(Entry.from_json(envelope), path=f"/v1/hospital/studies/{study_id}/decision")

    def post_catalog(self, entry: Entry) -> None:
        self.client.submit_entry(entry, path="/v1/hospital/catalog")

    def close(self) -> None:
        self.client.close()


def explain_coordinator_error(exc: BaseException, settings: NodeSettings, key_id: str) -> tuple[str, str]:
    """(health state, message for the steward) for a failed first call to the coordinator:
    unreachable, or this hospital not registered there (and what to send the operator)."""
    import httpx

    from exchange.coordinator.client import CoordinatorError

    url = settings.coordinator_url
    if isinstance(exc, httpx.TransportError | OSError):
        return "unreachable", (f"the coordinator at {url} does not answer ({type(exc).__name__}: {exc}); "
                               "check coordinator_url in node.toml and that it runs; the node keeps trying")
    if isinstance(exc, CoordinatorError) and exc.status == 401 and "not registered" in str(exc):
        return "not registered", (
            f"this hospital ({settings.hospital_id}, signing key id {key_id}) is not registered at the "
            f"coordinator {url}: send the operator the output of `exchange node show-registration`; "
            "the node keeps polling and carries on once it is registered")
    return "error", f"{type(exc).__name__}: {exc}"


def _problem_detail(exc: BaseException) -> str:
    """The coordinator's reason (RFC 9457 `detail`, else the error text)."""
    problem = getattr(exc, "problem", None)
    if isinstance(problem, dict) and isinstance(problem.get("detail"), str) and problem["detail"]:
        return str(problem["detail"])
    return str(exc)


def supernode_specs(settings: NodeSettings) -> list[ChildSpec]:
    """The Flower side of this hospital. "warm" mode: ONE process, the SuperNode with this
    node's warm ClientApp executor in a thread (`federated.runtime.hosted_supernode`: torch and
    the ClientApp are imported before the SuperNode connects, so a run's first message never
    waits for that import; one interpreter instead of two halves what flwr and gRPC cost, docs/
    benchmarks/scale.md). "plain" mode: flwr's own SuperNode, which starts a `flwr-clientapp`
    per message. Node authentication (`--auth-supernode-private-key`) goes with TLS only: flwr
    1.42 refuses it together with `--insecure` (exit code 303). Both get the thread and
    allocator limits of `federated.runtime.process_limits` unless the operator set them."""
    from federated.runtime.process_limits import limit_env

    sn = settings.supernode
    argv = ["--superlink", sn.superlink_address, "--node-config", str(site_paths(settings)["node_config"])]
    if sn.insecure:  # loopback tests and the demo: no TLS, hence no node authentication either
        argv.append("--insecure")
    else:
        if sn.root_certificates is not None:
            argv += ["--root-certificates", str(settings.path(sn.root_certificates))]
        argv += ["--auth-supernode-private-key", str(settings.flower_key_path)]
    host, _, port = sn.clientappio_address.rpartition(":")
    env = limit_env({
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "EXCHANGE_NODE_CONFIG": str(settings.data_dir / "node.toml"),
        "FLWR_HOME": str(settings.data_dir / "flwr-home"),
        # flwr's subprocess isolation (plain mode) runs `flower-superexec` by name: it must
        # be found next to this interpreter even when the venv is not on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])})
    logs = settings.data_dir / "logs"
    if sn.executor == "warm":
        from federated.runtime.deployment import LIVENESS_FILE_ENV, READY_LINE

        env["EXCHANGE_FLOWER_MODE"] = "fast"
        liveness = settings.data_dir / "supernode.online"  # touched after each accepted heartbeat
        env[LIVENESS_FILE_ENV] = str(liveness)
        hosted = (sys.executable, "-m", "federated.runtime.hosted_supernode", *argv,
                  "--isolation", "process", "--host", host, "--port", port)
        return [ChildSpec("supernode", hosted, env=env, log_file=logs / "supernode.log",
                          ready_line=READY_LINE, liveness_file=liveness, liveness_s=sn.restart_offline_s)]
    env["EXCHANGE_FLOWER_MODE"] = "plain"
    plain = (sys.executable, "-m", "federated.runtime.supernode_main", *argv, "--host", host, "--port", port)
    return [ChildSpec("supernode", plain, env=env, log_file=logs / "supernode.log")]


class NodeDaemon:
    def __init__(self, settings: NodeSettings, store: NodeStore, link: Any, signer: Signer,
                 supervisor: Supervisor | None = None, *, witness_link: WitnessLink | None = None) -> None:
        self.settings = settings
        self.store = store
        self.link = link
        self.ctx = Context(settings=settings, signer=signer, isolate=True)
        self.supervisor = supervisor or Supervisor(
            initial_backoff_s=settings.supernode.restart_backoff_initial_s,
            max_backoff_s=settings.supernode.restart_backoff_max_s,
            after_305_s=settings.supernode.restart_after_305_s, on_event=self._child_event)
        self.stop_event = threading.Event()
        self.ledger = site_ledger(store.engine, settings.policy)
        self._health: dict[str, Any] = {"status": "starting", "hospital_id": settings.hospital_id}
        #: `time.monotonic()` of the coordinator's last answer to `me` (None: ask at the next step)
        self._registered_at: float | None = None
        #: the studies list's last answer (a digest), when to ask again, and the wait that gave it
        self._studies_digest: str | None = None
        self._studies: list[dict[str, Any]] = []
        self._studies_due_at = 0.0
        self._studies_wait_s = 0.0
        #: what the node database last got: the supervised children, and when the step was recorded
        self._children_recorded: dict[str, Any] | None = None
        self._step_recorded_at: float | None = None
        self._clock = time.monotonic
        self._step_started = 0.0
        #: `NodeStore.change_token` when the last pass over the node database began (None:
        #: none has completed without an error, so the next step makes one)
        self._settled_token: object | None = None
        self._settled_with: NodeSettings | None = None  # the settings that pass worked with
        self._settled_at = 0.0  # when that pass began (the daemon's clock)
        #: the studies (or the failed request) `_studies_unchanged` got this step, for its pass
        self._fetched: list[dict[str, Any]] | BaseException | None = None
        self._pass_failed = False
        #: passes over the node database so far (steps that found it unchanged make none)
        self.passes = 0
        #: the approved, unfinished studies the last pass found (None: no pass yet)
        self._active: list[str] | None = None
        self._health_lock = threading.Lock()
        if witness_link is None:
            witness_link = getattr(link, "client", None)
        self.witnessing = (WitnessLoop(settings, store, witness_link, signer.key_id,
                                       stop=self.stop_event, report=self._update_health,
                                       on_error=self._error)
                           if settings.witness.enabled and witness_link is not None else None)

    # -- events -------------------------------------------------------------------------------
    def _child_event(self, event: str, data: dict[str, Any]) -> None:
        log.info(event, **data)
        if event in ("child_exited", "child_start_failed", "child_killed", "child_unresponsive"):
            self.store.record_error("supervisor", f"{event}: {json.dumps(data, sort_keys=True)}")

    def _error(self, component: str, exc: BaseException) -> None:
        self._pass_failed = True  # the next step works on the database again (a retry)
        message = f"{type(exc).__name__}: {exc}"
        log.warning("step_failed", component=component, error=message)
        self.store.record_error(component, message)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> None:
        """One step. The work on this node's database (catalog, studies, decisions, site files,
        the children wanted, rounds) runs when it may find something new: when anything
        committed to the node database since the last such pass began (`NodeStore.change_token`:
        a steward's command, the Flower process charging a round, this daemon's own writes),
        after a pass that failed, when the coordinator's list of studies changed, or at least
        every `SETTLED_PASS_MAX_S`; otherwise it would re-read what it read last time. The
        studies are asked for when due (`_sync_studies`): while the database is settled, an
        answer equal to the last one starts no pass (`_studies_unchanged`). The children are
        supervised at every step."""
        self._step_started = self._clock()
        if not self._ensure_registered():
            return
        token = self.store.change_token()  # before the pass's reads: a later commit is news
        settled = (token is not None and token == self._settled_token
                   and self._settled_with is self.settings
                   and self._step_started - self._settled_at < SETTLED_PASS_MAX_S)
        due = self._step_started >= self._studies_due_at
        if not settled or (due and not self._studies_unchanged()):
            self._pass_failed = False
            self._settled_token = None
            self._publish_catalog()
            self._sync_studies()
            self._post_decisions()
            self._sync_supernode()
            self._sync_rounds()
            self.passes += 1
            if not self._pass_failed:
                self._settled_token, self._settled_with = token, self.settings
                self._settled_at = self._step_started
        self._supervise()
        if self._step_recorded_at is None or self._step_started - self._step_recorded_at >= STEP_RECORD_S:
            self.store.set_state("last_step_at", datetime.now(UTC).isoformat())
            self._step_recorded_at = self._step_started

    def _studies_unchanged(self) -> bool:
        """The studies are due and nothing was committed here since the last pass: ask the
        coordinator; True when its answer is the last one (then the pass would only re-read what
        the last one read: the list, the decisions, the site files and the ledger are as they
        were; the next request is put off as `_sync_studies` does). Else the answer (or the
        failed request) is kept for this step's pass, which asks nothing again. A waiting study's
        one input outside the database and the answer, the date (`decisions._evaluation_inputs`),
        is seen at the next pass: within `SETTLED_PASS_MAX_S`."""
        started = self._step_started
        try:
            studies = self.link.studies()
        except Exception as exc:  # the pass records it (`_sync_studies`), as when it asks itself
            self._fetched = exc
            return False
        digest = _digest(studies)
        if digest != self._studies_digest:
            self._fetched = studies
            return False
        self._studies_wait_s = self._next_studies_wait(failed=False, changed=False)
        self._studies_due_at = started + self._studies_wait_s
        return True

    def _ensure_registered(self) -> bool:
        """Whether the coordinator knows this hospital: asked (`me`) at the first step, after a
        failed request to it and every `REGISTRATION_RECHECK_S`, not at every step."""
        since = None if self._registered_at is None else time.monotonic() - self._registered_at
        if since is not None and since < REGISTRATION_RECHECK_S:
            return True
        self._registered_at = None
        try:
            me = self.link.me()
        except Exception as exc:
            state, message = explain_coordinator_error(exc, self.settings, self.ctx.signer.key_id)
            log.warning("step_failed", component="coordinator", error=message)
            self.store.record_error("coordinator", message)
            self._update_health(coordinator=state)
            return False
        if not self.store.get_state("registered"):
            log.info("registered", hospital_id=self.settings.hospital_id, key_id=self.ctx.signer.key_id)
        self.store.set_state("registered", {"at": datetime.now(UTC).isoformat(),
                                            "me": {k: v for k, v in me.items() if k != "flower_public_key"}})
        self._update_health(coordinator="ok")
        self._registered_at = time.monotonic()
        return True

    def _publish_catalog(self) -> None:
        """The public catalog (exchange/node/catalog.py), when what it is built from changed."""
        try:
            if publish_catalog(self.store, self.settings, self.ctx.signer, self.link.post_catalog):
                log.info("catalog_published", hospital_id=self.settings.hospital_id)
                self.studies_changed()  # a study refused for a missing column may be decided anew
        except Exception as exc:
            self._error("catalog", exc)

    def _observe(self, studies: list[dict[str, Any]]) -> bool:
        """Each study observed (decided when due); False if one of them failed."""
        ok = True
        for study in studies:
            try:
                row = observe_study(self.store, self.ctx, study)
            except Exception as exc:
                self._error("policy", exc)
                ok = False
                continue
            log.debug("study_seen", study_id=row.study_id, status=row.status)
        return ok

    def studies_changed(self) -> None:
        """Ask the coordinator for the studies at the next step (something here changed)."""
        self._studies_due_at = 0.0
        self._studies_wait_s = 0.0

    def _sync_studies(self) -> None:
        """The studies this hospital is asked about, each observed (decided when due). While
        the answer stays the same the next one is asked for later (`studies_poll_max_s`): the
        daemon asks at the next step, then waits twice as long each time, and asks at every step
        again once the answer changes, after a failed request, a failed observation, a posted
        decision or a published catalog."""
        started = self._step_started
        fetched, self._fetched = self._fetched, None
        if fetched is None and started < self._studies_due_at:  # the last answer, observed again:
            self._observe(self._studies)                       # what changed here (budget, data,
            return                                             # consent) is seen at every pass
        try:
            if isinstance(fetched, BaseException):
                raise fetched  # `_studies_unchanged` asked this step already
            studies = fetched if fetched is not None else self.link.studies()
        except Exception as exc:
            self._error("coordinator", exc)
            self._registered_at = None  # the next step asks `me`, which says why (health)
            self.studies_changed()
            return
        self._studies = studies
        failed = not self._observe(studies)
        digest = _digest(studies)
        self._studies_wait_s = self._next_studies_wait(failed=failed, changed=digest != self._studies_digest)
        self._studies_digest = digest
        self._studies_due_at = started + self._studies_wait_s

    def _next_studies_wait(self, *, failed: bool, changed: bool) -> float:
        """How long until the studies are asked for again: at the next step after a change or a
        failure, else twice the last wait, up to `studies_poll_max_s`."""
        cap = self.settings.studies_poll_max_s
        if failed or changed or cap <= 0:
            return 0.0
        return min(cap, max(self.settings.poll_interval_s, 2 * self._studies_wait_s))

    def _post_decisions(self) -> None:
        for decision in unposted(self.store):
            try:
                self.link.post_decision(decision.study_id, decision.envelope)
            except Exception as exc:
                status = getattr(exc, "status", None)
                if status == 409:
                    detail = _problem_detail(exc)
                    if "already decided" in detail:
                        # The coordinator holds our decision (posted before a crash): acknowledged.
                        mark_posted(self.store, decision.id)
                        continue
                    # The coordinator refused it (decisions closed: the study started before
                    # ours arrived). It does not count as taken: record why, never join.
                    mark_rejected(self.store, decision.id, status, detail)
                    log.warning("decision_rejected", study_id=decision.study_id, decision=decision.decision,
                                reason=detail)
                    self._error("coordinator", exc)
                    continue
                self._error("coordinator", exc)
                continue
            mark_posted(self.store, decision.id)
            self.studies_changed()
            if decision.decision == "approve":
                # At once, not at the step's site export: the study may start with this
                # approval, and its first round must not find it missing here (refused).
                active = self.active_studies()
                write_approvals(self.settings, active, approved_specs(self.store, active))
            log.info("decision_posted", study_id=decision.study_id, decision=decision.decision,
                     decided_by=decision.decided_by, reasons=decision.reasons)

    def active_studies(self) -> list[str]:
        """Approved studies (decision acknowledged) that have not finished."""
        return approved_active(self.store)

    def _sync_supernode(self) -> None:
        """The site files, and whether this hospital's Flower process should run (from the
        studies approved here); `_supervise` keeps it so at every step."""
        active = self.active_studies()
        self._active = active
        export_site(self.store, self.settings, active, isolate=True)
        if not self.settings.supernode.enabled:
            return
        specs = supernode_specs(self.settings)
        if active or self.settings.supernode.start == "registered":
            for spec in specs:
                self.supervisor.want(spec)
        else:
            for spec in specs:
                self.supervisor.forget(spec.name, CHILD_STOP_GRACE_S)

    def _supervise(self) -> None:
        """Start, notice and restart the wanted children; their state to the node database when
        it changed."""
        if not self.settings.supernode.enabled:
            return
        self.supervisor.tick()
        children = self.supervisor.snapshot()
        if children != self._children_recorded:  # a write per change, not per step
            self.store.set_state("children", children)
            self._children_recorded = children

    def _sync_rounds(self) -> None:
        """Copy the privacy ledger's charges (one per round trained and released here) into
        the rounds table; the ledger is idempotent per round, so this never double counts."""
        with self.store.sessions() as session:
            rows = session.execute(select(StudyRow.study_id, StudyRow.status)).tuples().all()
        studies = [study_id for study_id, _status in rows]
        for study_id, status in rows:
            # A finished study's patients count what it really spent, not its whole target.
            if status in TERMINAL and self.ledger.plan(study_id) is not None \
                    and not self.ledger.is_closed(study_id):
                self.ledger.close_study(study_id)
        for study_id in studies:
            charges = self.ledger.charges(study_id)
            if not charges:
                continue
            with self.store.transaction() as session:
                held = set(session.execute(select(RoundRow.round).where(RoundRow.study_id == study_id))
                           .scalars())
                for charge in charges:
                    if charge.round not in held:
                        plan = self.ledger.plan(study_id)
                        session.add(RoundRow(study_id=study_id, round=charge.round,
                                             records_used=plan.n_patients if plan else 0,
                                             epsilon=charge.epsilon, at=charge.created_at))

    # -- health -------------------------------------------------------------------------------
    def _update_health(self, **values: Any) -> None:
        with self._health_lock:
            self._health.update(values)

    def health(self) -> dict[str, Any]:
        """The snapshot /health serves; status "alarm" while the witness holds evidence of an
        inconsistent log or an entry of this node is missing from it."""
        with self._health_lock:
            health = dict(self._health)
        if any(isinstance(health.get(k), dict) and health[k].get("alarm") for k in ("witness", "inclusion")):
            health["status"] = "alarm"
        return health

    def serve_health(self) -> ThreadingHTTPServer:
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/health":
                    self.send_error(404)
                    return
                body = json.dumps(daemon.health(), default=str).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            server = ThreadingHTTPServer((self.settings.health_host, self.settings.health_port), Handler)
        except OSError as exc:
            raise NodeStartError(
                f"health_port {self.settings.health_port} on {self.settings.health_host} is taken "
                f"({exc.strerror}): another node (or program) on this host uses it; give this node its "
                "own health_port in node.toml (`exchange node init` picks free ports for new nodes)") from exc
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server = self.serve_health()
        host, port = server.server_address[:2]
        self.store.set_state("health_address", f"{host!s}:{port}")
        restarts = int(self.store.get_state("daemon_starts", 0)) + 1
        self.store.set_state("daemon_starts", restarts)
        self.store.set_state("daemon", {"state": "running", "started_at": datetime.now(UTC).isoformat()})
        log.info("node_started", hospital_id=self.settings.hospital_id, health=f"{host!s}:{port}",
                 start=restarts, key_id=self.ctx.signer.key_id)
        from federated.runtime.process_limits import limit_threads, trim

        # few malloc arenas, and what a step freed back to the OS: the daemon is one of a
        # hospital's processes and should hold what it uses, not its peak (docs/benchmarks/scale.md)
        limit_threads()
        witness_thread = self.witnessing.start() if self.witnessing is not None else None
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    self.step()
                except Exception as exc:  # one bad step must not end the daemon
                    self._error("daemon", exc)
                trim()
                self._update_health(status="ok", last_step_at=datetime.now(UTC).isoformat(),
                                    children=self.supervisor.snapshot(),
                                    active_studies=(self._active if self._active is not None
                                                    else self.active_studies()))
                self.stop_event.wait(max(0.0, self.settings.poll_interval_s - (time.monotonic() - started)))
        finally:
            self.stop_event.set()
            if witness_thread is not None:
                witness_thread.join(timeout=self.settings.witness.wait_s + 35)
            self.supervisor.stop_all(CHILD_STOP_GRACE_S)
            server.shutdown()
            server.server_close()
            self.store.set_state("daemon", {"state": "stopped", "stopped_at": datetime.now(UTC).isoformat()})
            log.info("node_stopped", hospital_id=self.settings.hospital_id)
        return 0


def _digest(studies: list[dict[str, Any]]) -> str:
    """What identifies one answer of the coordinator's list of studies."""
    return hashlib.sha256(json.dumps(studies, sort_keys=True, default=str).encode()).hexdigest()


class NodeStartError(RuntimeError):
    """The daemon cannot start (already running, a port taken); the message says what to do."""


@contextmanager
def run_lock(settings: NodeSettings) -> Iterator[None]:
    """Hold `node.run.lock` in the node directory while the daemon runs: a second `exchange
    node run` on the same node would post the same decisions and start a second SuperNode
    with the same Flower key. The lock is the kernel's (flock), so it goes with the process,
    also after kill -9."""
    path = settings.data_dir / "node.run.lock"
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise NodeStartError(
                f"this node ({settings.hospital_id}, {settings.data_dir}) is already running (process "
                f"{holder}); `exchange node status` shows it; stop that one first (SIGTERM) to restart it"
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def run_daemon(settings: NodeSettings) -> int:
    """Open the store (migrating it), load the key, run until signalled. Raises NodeStartError
    when the node is running already or its health port is taken."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(settings):
        store = open_store(settings.db_url)
        signer = Signer.load(settings.signing_key_path)
        link = CoordinatorLink(settings, signer)
        try:
            return NodeDaemon(settings, store, link, signer).run()
        finally:
            link.close()
            store.dispose()
