"""Run a study's ServerApp inside the coordinator's process, against a SuperLink started with
`--isolation process` (no `flwr run`, no `flwr-serverapp` process).

Why: the coordinator needs the ServerApp's events as Python calls (to append audit entries), and
starting a ServerApp through `flwr run` + SuperExec costs far more per run than this
(docs/benchmarks/flower.md).
How (the same steps SuperExec + flwr-serverapp take; the flwr internals they need are wrapped in
`flwr_internals`):
1. build the FAB from `federated/app` and submit the run over the Control API (`StartRun`) with
   the study as run config;
2. claim the run's ServerApp task over the Runtime API (`AcquireTask`), which yields a token;
3. build an `HttpGrid` with that token, pull the task input (context, run), fuse the run config,
   keep a task heartbeat running;
4. call the ServerApp, then push the task output (COMPLETED or FAILED with the reason).

Only one study at a time may be claimed per SuperLink by this runner (`AcquireTask` hands out any
pending ServerApp task); a module lock serialises `run_study` calls in one process.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federated.runtime import flwr_internals
from federated.runtime.settings import RuntimeSettings, disable_phone_home
from federated.server_app import ServerOptions, StudyFailedError, StudyObserver, make_server_app
from federated.study_spec import StudySpec

if TYPE_CHECKING:
    from flwr.app import Context

log = logging.getLogger("federated.runner")
_one_at_a_time = threading.Lock()


@dataclass(frozen=True)
class StudyResult:
    """How a study run ended."""

    run_id: int
    status: str  # "completed" | "failed"
    model_path: Path | None = None
    sha256: str | None = None
    reason: str = ""
    #: seconds from submitting the run to holding its ServerApp task
    start_s: float = 0.0


class _ResultObserver:
    """Forwards to the coordinator's observer and remembers the outcome."""

    def __init__(self, inner: StudyObserver) -> None:
        self.inner = inner
        self.model: tuple[Path, str] | None = None
        self.failure: str | None = None

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.inner.on_round(round, metrics, receipts)

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.model = (model_path, sha256)
        self.inner.on_complete(model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failure = reason
        self.inner.on_failed(reason)


def build_fab() -> tuple[bytes, str]:
    """The study FAB (`federated/app`) and its SHA-256."""
    from federated.app import APP_DIR

    fab = flwr_internals.build_fab(APP_DIR)
    return fab, hashlib.sha256(fab).hexdigest()


def warm() -> None:
    """What a coordinator's first `run_study` would otherwise pay for on top of its later ones:
    the flwr modules a run's submission and task claim import (`flwr_internals.
    import_server_run_modules`) and a first FAB build. Run by the coordinator's warm-up
    (`exchange.study.runners.FederatedRunner`) before any study is submitted."""
    flwr_internals.import_server_run_modules()
    build_fab()


def _claim_serverapp_task(superlink_address: str, spec: StudySpec, fab: tuple[bytes, str], *, insecure: bool,
                          certs: bytes | None, acquire_timeout: float) -> flwr_internals.TaskClaim:
    """Submit the run and claim its ServerApp task (what `flwr run` and then SuperExec do)."""
    control = flwr_internals.ControlApi(superlink_address, insecure=insecure, root_certificates=certs)
    try:
        tasks = flwr_internals.TaskQueue(superlink_address, "serverapp", insecure=insecure,
                                         root_certificates=certs)
    except BaseException:
        control.close()
        raise
    try:
        run_id = control.start_run(fab[0], fab[1], spec.to_run_config())
        deadline = time.monotonic() + acquire_timeout
        while (claim := tasks.acquire()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id}: no ServerApp task within {acquire_timeout:.0f} s")
            time.sleep(0.02)
        if claim.run_id != run_id:
            raise RuntimeError(f"claimed the ServerApp task of run {claim.run_id}, not of run "
                               f"{run_id}: another client is submitting runs to this SuperLink")
        return claim
    finally:
        control.close()
        tasks.close()


def run_study(superlink_address: str, spec: StudySpec, observer: StudyObserver, output_dir: Path, *,
              root_certificates: bytes | None = None, insecure: bool | None = None,
              settings: RuntimeSettings | None = None, hospital_keys: Mapping[str, bytes] | None = None,
              stop_event: threading.Event | None = None, acquire_timeout: float = 60.0,
              approved_hospitals: Collection[str] | None = None) -> StudyResult:
    """Submit `spec` as a Flower run and execute its ServerApp here; returns when it ended.

    TLS: pass the CA bundle in `root_certificates`; `insecure` defaults to "no certificates given"
    and is refused for a non-loopback address. Failures of the study itself (too few hospitals,
    cancellation) come back as status "failed" after `observer.on_failed`; problems reaching the
    SuperLink raise.

    `approved_hospitals`: the hospital ids that approved the study. Only nodes whose signed hello
    names one of them get the study's messages (the model never reaches another node), and a
    receipt from any other hospital is ignored. None: every node that says hello takes part.
    """
    submitted_at = time.perf_counter()
    disable_phone_home()
    from flwr.app import RecordDict

    from federated.runtime.deployment import is_loopback

    settings = settings or RuntimeSettings()
    insecure = root_certificates is None if insecure is None else insecure
    host = superlink_address.rsplit(":", 1)[0].strip("[]")
    if insecure and not is_loopback(host):
        raise ValueError("root_certificates: TLS is required for a non-loopback SuperLink "
                         f"({superlink_address})")
    if settings.mode == "fast":
        flwr_internals.patch_grid_pull_backoff(settings.pull_backoff)
        flwr_internals.patch_grid_reply_pulls(settings.server_reply_pulls)
    fab = build_fab()
    certs = None if insecure else root_certificates
    # One submission at a time: a run is submitted and its ServerApp task claimed as a pair (the
    # claim check above refuses another client's run), and `pull_input` sets the process-global
    # task identity. The study itself runs outside the lock, so several studies of one
    # coordinator process run at once (their rounds interleave; each message carries its own
    # run and task ids, stamped by the ServerApp).
    with _one_at_a_time:
        t_submit = time.perf_counter()
        claim = _claim_serverapp_task(superlink_address, spec, fab, insecure=insecure, certs=certs,
                                      acquire_timeout=acquire_timeout)
        start_s = time.perf_counter() - t_submit
        # A SuperLink gone for longer than a round's timeout fails the study (never a hang).
        task = flwr_internals.ServerAppTask(superlink_address, claim, insecure=insecure,
                                            root_certificates=certs, reconnect_s=spec.round_timeout_s)
        watcher = _ResultObserver(observer)
        options = ServerOptions(output_dir=output_dir, poll=settings.effective_server_poll,
                                hospital_keys=hospital_keys, stop_event=stop_event or threading.Event(),
                                approved_hospitals=(None if approved_hospitals is None
                                                    else frozenset(approved_hospitals)),
                                submitted_at=submitted_at, pack_messages=settings.message_packing)
        context: Context | None = None
        pulled: Exception | None = None
        try:
            options.task_id, context = task.pull_input(fab[0])
        except Exception as exc:  # reported below, as a failure of the ServerApp
            pulled = exc
    app = make_server_app(lambda _ctx: watcher, lambda _ctx: options)
    completed, details = False, ""
    try:
        if pulled is not None:
            raise pulled
        assert context is not None
        app(grid=task.grid, context=context)
        completed = True
        context.state = RecordDict()
    except StudyFailedError as exc:
        details = str(exc)
    except Exception as exc:
        details = f"ServerApp raised {type(exc).__name__}: {exc}"
        if watcher.failure is None:
            watcher.on_failed(details)
        log.exception("study %s: ServerApp failed", spec.study_id)
    finally:
        try:
            task.push_output(context, completed=completed, details=details)
        finally:
            task.close()
    if watcher.model is not None:
        return StudyResult(claim.run_id, "completed", watcher.model[0], watcher.model[1], start_s=start_s)
    return StudyResult(claim.run_id, "failed", reason=watcher.failure or details, start_s=start_s)
