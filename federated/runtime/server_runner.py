"""Run a study's ServerApp inside the coordinator's process, against a SuperLink started with
`--isolation process` (no `flwr run`, no `flwr-serverapp` process).

Why: the coordinator needs the ServerApp's events as Python calls (to append audit entries), and
starting a ServerApp through `flwr run` + SuperExec costs 3.4-7.6 s per run against ~0.04 s here.
How (flwr 1.42 internals, the same steps SuperExec + flwr-serverapp take):
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
from typing import Any

from federated.runtime.settings import RuntimeSettings, disable_phone_home
from federated.server_app import ServerOptions, StudyFailedError, StudyObserver, make_server_app
from federated.study_spec import StudySpec

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
    from flwr.cli.build import build_fab_from_disk

    from federated.app import APP_DIR

    fab = build_fab_from_disk(APP_DIR)
    return fab, hashlib.sha256(fab).hexdigest()


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
    disable_phone_home()
    from flwr.app import RecordDict
    from flwr.common.config import get_fused_config_from_fab
    from flwr.common.constant import SubStatus
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        fab_to_proto,
        run_from_proto,
        user_config_to_proto,
    )
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid import HttpGrid

    from federated.runtime import flwr_internals
    from federated.runtime.deployment import is_loopback

    settings = settings or RuntimeSettings()
    insecure = root_certificates is None if insecure is None else insecure
    host = superlink_address.rsplit(":", 1)[0].strip("[]")
    if insecure and not is_loopback(host):
        raise ValueError("root_certificates: TLS is required for a non-loopback SuperLink "
                         f"({superlink_address})")
    if settings.mode == "fast":
        flwr_internals.patch_grid_pull_backoff(settings.pull_backoff)
    fab_bytes, fab_hash = build_fab()
    certs = None if insecure else root_certificates
    with _one_at_a_time:
        control = ControlHttpClient.from_server_address(
            server_address=superlink_address, insecure=insecure, root_certificates=certs,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        runtime = RuntimeHttpClient.from_server_address(
            server_address=superlink_address, insecure=insecure, root_certificates=certs,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        try:
            t_submit = time.perf_counter()
            run_id = control.StartRun(StartRunRequest(
                fab=fab_to_proto(Fab(fab_hash, fab_bytes, {})),
                override_config=user_config_to_proto(spec.to_run_config()))).run_id
            deadline = time.monotonic() + acquire_timeout
            while True:
                response = runtime.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.SERVER_APP.value]))
                if response.HasField("task") and response.token:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {run_id}: no ServerApp task within {acquire_timeout:.0f} s")
                time.sleep(0.02)
            if response.task.run_id != run_id:
                raise RuntimeError(f"claimed the ServerApp task of run {response.task.run_id}, not of run "
                                   f"{run_id}: another client is submitting runs to this SuperLink")
        finally:
            control.close()
            runtime.close()
        start_s = time.perf_counter() - t_submit
        grid = HttpGrid(runtime_api_address=superlink_address, insecure=insecure,
                        root_certificates=certs, token=response.token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
        heartbeat.start()
        watcher = _ResultObserver(observer)
        options = ServerOptions(output_dir=output_dir, poll=settings.effective_server_poll,
                                hospital_keys=hospital_keys, stop_event=stop_event or threading.Event(),
                                approved_hospitals=(None if approved_hospitals is None
                                                    else frozenset(approved_hospitals)))
        app = make_server_app(lambda _ctx: watcher, lambda _ctx: options)
        sub_status, details, context = SubStatus.FAILED, "", None
        try:
            task_input = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
            # Process-global: another study in this process may overwrite it; the ServerApp stamps
            # run and task ids on its messages itself (options.task_id, context.run_id).
            TaskIdentity.task_id = task_input.task_id
            TaskIdentity.run_id = task_input.run.run_id
            TaskIdentity.node_id = task_input.context.node_id
            options.task_id = task_input.task_id
            context = context_from_proto(task_input.context)
            run = run_from_proto(task_input.run)
            grid.set_run(run)
            context.run_config = get_fused_config_from_fab(fab_bytes, run)
            app(grid=grid, context=context)
            sub_status = SubStatus.COMPLETED
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
                grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
                    context=context_to_proto(context) if context is not None else None,
                    sub_status=sub_status, details=details))
            finally:
                heartbeat.stop()
                grid.close()
    if watcher.model is not None:
        return StudyResult(run_id, "completed", watcher.model[0], watcher.model[1], start_s=start_s)
    return StudyResult(run_id, "failed", reason=watcher.failure or details, start_s=start_s)
