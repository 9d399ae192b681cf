"""The warm ClientApp executor behind `flower-supernode --isolation process`.

Out of the box a SuperNode starts a new `flwr-clientapp` interpreter for every message, which
imports torch and reloads data each time (docs/benchmarks/flower.md). This executor is a
long-lived process that takes ClientApp tasks from the SuperNode's runtime API and runs them in
this process, its libraries imported once (no torch: the hospital trains with NumPy,
`federated.numpy_dp`).

What it runs: always this node's own installed `federated.client_app:app`, never code from the
FAB the run brings: no researcher code runs inside a hospital. A FAB whose declared clientapp is
anything else is answered with an error reply. This also removes FAB installation and
module-reloading between runs from the hot path.

Run it as ``python -m federated.runtime.executor --runtime-api-address 127.0.0.1:PORT``.
It uses flwr internals (the Runtime API's AcquireTask, run_clientapp's helpers), all wrapped in
`flwr_internals`; see docs/flower.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from federated.runtime import flwr_internals, timeline
from federated.runtime.process_limits import limit_threads, trim
from federated.runtime.settings import disable_phone_home

if TYPE_CHECKING:
    from flwr.app import Context, Message

disable_phone_home()

EXPECTED_CLIENTAPP_REF = "federated.client_app:app"
#: with a wake-up Event (`hosted_supernode`), the executor still polls this often: if a wake-up
#: were ever missed, the task waits at most this long
WAKE_FALLBACK_S = 2.0
#: how often the approvals file is checked for a newly approved study to calibrate ahead (one
#: `stat` when it did not change)
APPROVALS_WATCH_S = 0.2
#: after a study is approved here (and until its run registers its plan), the SuperNode in this
#: process polls for messages as it does during a study, for at most this long: the run's first
#: message (the server's hello) then waits for no idle sleep (`flwr_internals.IdlePacer`)
RUN_EXPECTED_S = 30.0
log = logging.getLogger("federated.executor")


@dataclass
class ExecutorStats:
    """What the executor did (read by tests and the bench)."""

    tasks: int = 0
    failed: int = 0
    task_seconds: list[float] = field(default_factory=list)


def prewarm(node_config_file: Path | None) -> list[str]:
    """What a study's first round would otherwise do on top of training, done before any study
    arrives (docs/benchmarks/scale.md, "First round"): import the privacy accountants (SciPy) by
    running one small accounting, read the public survival reference data, and `warm_site`.
    Returns what failed; never raises."""
    problems: list[str] = []
    try:
        from federated.accounting import epsilon_spent

        epsilon_spent(1.0, 0.01, 10, 1e-5, "rdp")
    except Exception as exc:
        problems.append(f"accounting: {type(exc).__name__}: {exc}")
    try:  # the public survival reference a survival study's every round reads (a few MB at most)
        from federated.clinical_data import SURVIVAL_DATASETS, public_rows

        for dataset in SURVIVAL_DATASETS:
            public_rows(dataset)
    except Exception as exc:
        problems.append(f"public reference: {type(exc).__name__}: {exc}")
    problems += warm_site(node_config_file)
    trim()
    return problems


def warm_site(node_config_file: Path | None) -> list[str]:
    """Load this node's site (records, consent contracts with every signature verified, key) into
    the caches, or reload what changed since (a consent import, new records); a few `stat`
    calls when nothing did. A site not provisioned yet is no error of the process (its first
    round loads it): returned as a problem, never raised."""
    if node_config_file is None:
        return []
    try:
        from federated.runtime.site import Site

        with node_config_file.open("rb") as handle:
            Site.from_node_config(tomllib.load(handle)).warm()
    except Exception as exc:
        return [f"site: {type(exc).__name__}: {exc}"]
    return []


def _file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten (mtime, size, inode: an atomic rewrite is a new
    inode even within the file system's timestamp granularity)."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


class WarmExecutor:
    """Polls one SuperNode's runtime API and runs each ClientApp task in this process."""

    def __init__(self, runtime_api_address: str, *, poll: float = 0.05, pull_backoff: float | None = 0.02,
                 expected_clientapp_ref: str = EXPECTED_CLIENTAPP_REF,
                 node_config_file: Path | None = None, rewarm_every_s: float = 2.0,
                 poll_max: float | None = None, wake: threading.Event | None = None,
                 approvals_watch_s: float = APPROVALS_WATCH_S, in_process: bool = False) -> None:
        """`poll`: the sleep after an empty poll while tasks keep coming, growing to `poll_max`
        when none came for a while (`flwr_internals.IdlePacer`; None: always `poll`). `wake`: set
        by the SuperNode in this process when it stored a task (`hosted_supernode`); the
        executor then waits on it instead of polling, and polls only every `WAKE_FALLBACK_S`
        as a safety net. `approvals_watch_s`: how often a thread checks this node's approvals
        file and calibrates a newly approved study's DP plan (`watch_approvals`). `in_process`:
        the SuperNode runs in this process (`hosted_supernode`, after
        `flwr_internals.capture_supernode_state`): claims and task calls go to its Runtime API
        handlers directly (`flwr_internals.InProcessRuntimeClient`), not over loopback HTTP."""
        if poll <= 0:
            raise ValueError(f"poll: must be > 0 seconds, got {poll!r}")
        if approvals_watch_s <= 0:
            raise ValueError(f"approvals_watch_s: must be > 0 seconds, got {approvals_watch_s!r}")
        if poll_max is not None and poll_max < poll:
            raise ValueError(f"poll_max: must be >= poll ({poll!r}), got {poll_max!r}")
        self.address = runtime_api_address
        self.poll = poll
        self.pacer = flwr_internals.IdlePacer(poll, poll_max)
        self.wake = wake
        self.wake_fallback_s = WAKE_FALLBACK_S
        self.expected_ref = expected_clientapp_ref
        self.stats = ExecutorStats()
        self._stop = threading.Event()
        # while idle, keep this node's site loaded (warm_site): files the daemon rewrote (a
        # consent import, new records) are reloaded between studies, not in a first round
        self.node_config_file = node_config_file
        self.rewarm_every_s = rewarm_every_s
        self._warmed_at = 0.0
        self.approvals_watch_s = approvals_watch_s
        self.in_process = in_process
        self._state: flwr_internals.NodeState | None = None  # the SuperNode's, once known (in_process)
        if pull_backoff is not None:
            flwr_internals.patch_clientapp_pull_backoff(pull_backoff)
        # Import the ClientApp (our training code) once, up front.
        self._client_app = flwr_internals.load_client_app(self.expected_ref)

    def stop(self) -> None:
        self._stop.set()
        if self.wake is not None:
            self.wake.set()

    def run_task(self, token: str) -> None:
        """Run one ClientApp task (mirrors flwr's run_clientapp, minus process exit)."""
        from flwr.app import Error, Message

        started = time.perf_counter()
        task = flwr_internals.ClientAppTask(self.address, token, state=self._state)
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        completed, details = False, "ClientApp task failed"
        timeline.stamp("ex.task>")
        try:
            message, context, fab = task.pull_input()
            timeline.stamp("ex.input", timeline.short(message.metadata.message_id))
            declared = flwr_internals.fab_clientapp_ref(fab)
            if declared != self.expected_ref:
                raise PermissionError(f"this node runs only {self.expected_ref}; the run's FAB declares "
                                      f"clientapp={declared!r}")
            # In-process execution shares global random state across runs: reseed per task.
            random.seed()
            reply = self._client_app(message=message, context=context)
            timeline.stamp("ex.app<")
            completed, details = True, ""
        except Exception as exc:
            details = f"{type(exc).__name__}: {exc}"
            log.exception("ClientApp task failed")
            self.stats.failed += 1
            if message is not None:
                reply = Message(Error(code=flwr_internals.ERROR_CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    task.push_reply(reply, context)
                    timeline.stamp("ex.reply")
                    # hosted: the SuperNode's loop is waiting for this reply (no-op otherwise)
                    flwr_internals.supernode_reply_stored()
            finally:
                try:
                    task.push_output(context, completed=completed, details=details)
                finally:
                    task.close()
                    # what the task freed goes back to the OS: between rounds a hospital holds
                    # what it uses, not its peak (process_limits)
                    trim()
        timeline.stamp("ex.task<")
        self.stats.tasks += 1
        self.stats.task_seconds.append(time.perf_counter() - started)
        log.info("task done in %.3f s (%s)", self.stats.task_seconds[-1],
                 "completed" if completed else "failed")

    def _idle(self) -> None:
        if self.node_config_file is None or time.monotonic() - self._warmed_at < self.rewarm_every_s:
            return
        self._warmed_at = time.monotonic()
        warm_site(self.node_config_file)

    def watch_approvals(self) -> None:
        """Until `stop()`: when this node's approvals file changes (the daemon approved a study),
        start calibrating the DP plan of each approved study it gives the spec of
        (`federated.client_app.plan_approved`), in the background. The daemon writes the file
        once it has drawn the study's decision count, seconds before the study's run starts; the
        calibration is the largest part of a first round beyond training, and in this process it
        would otherwise run beside the run's first messages and training (one interpreter lock).
        Meanwhile (at most `RUN_EXPECTED_S`) the SuperNode polls as during a study, so the run's
        first message waits for no idle sleep. An optimisation only: what fails is logged and
        the first round calibrates itself."""
        from federated.client_app import plan_approved
        from federated.runtime.site import Site

        if self.node_config_file is None:
            return
        config_seen: tuple[int, int, int] | None = None
        approvals_seen: tuple[int, int, int] | None = None
        site: Site | None = None
        expected_until = 0.0
        while not self._stop.wait(self.approvals_watch_s):
            if time.monotonic() < expected_until:
                flwr_internals.supernode_expects_message()
            try:
                stamp = _file_stamp(self.node_config_file)
                if site is None or stamp != config_seen:
                    with self.node_config_file.open("rb") as handle:
                        site = Site.from_node_config(tomllib.load(handle))
                    config_seen, approvals_seen = stamp, None
                approvals = _file_stamp(site.approvals_path)
                if approvals == approvals_seen:
                    continue
                approvals_seen = approvals
                planned = plan_approved(site)
            except Exception as exc:  # not provisioned yet, a file being replaced: next time
                log.debug("approvals watch: %s: %s", type(exc).__name__, exc)
                continue
            if planned:  # approved, decided, not started: the run's hello comes next
                log.info("calibrating ahead the DP plan of %s", ", ".join(planned))
                expected_until = time.monotonic() + RUN_EXPECTED_S
                flwr_internals.supernode_expects_message()

    def serve(self) -> None:
        """Take and run tasks until `stop()`; connection errors are retried (the SuperNode may
        still be starting or restarting). With a node config, a thread watches its approvals
        (`watch_approvals`) meanwhile."""
        if self.node_config_file is not None:
            threading.Thread(target=self.watch_approvals, name="approvals-watch", daemon=True).start()
        if self.in_process:  # the SuperNode's state exists once flwr's SuperNode has started
            while self._state is None:
                self._state = flwr_internals.supernode_state(timeout=1.0)
                if self._stop.is_set():
                    return
        tasks = flwr_internals.TaskQueue(self.address, "clientapp", state=self._state)
        try:
            while not self._stop.is_set():
                if self.wake is not None:
                    self.wake.clear()  # before the claim: a task stored after it sets it again
                try:
                    claim = tasks.acquire()
                except Exception as exc:
                    log.warning("runtime API not reachable (%s); retrying", exc)
                    self._stop.wait(1.0)
                    continue
                if claim is not None:
                    try:
                        self.run_task(claim.token)
                    except Exception:  # one broken task (e.g. a failed push) must not end the executor
                        log.exception("task could not be completed")
                    self.pacer.active()
                else:
                    self._idle()
                    if self.wake is not None:
                        self.wake.wait(self.wake_fallback_s)
                    else:
                        self._stop.wait(self.pacer.next_sleep())
        finally:
            tasks.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Warm ClientApp executor for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's runtime API, host:port (loopback)")
    parser.add_argument("--poll", type=float, default=float(os.environ.get("EXCHANGE_EXECUTOR_POLL", "0.05")))
    parser.add_argument("--poll-max", type=float,
                        default=float(os.environ.get("EXCHANGE_EXECUTOR_POLL_MAX", "0.5")),
                        help="the poll interval an idle executor grows to")
    parser.add_argument("--pull-backoff", type=float,
                        default=float(os.environ.get("EXCHANGE_PULL_BACKOFF", "0.02")))
    args = parser.parse_args(argv)
    limit_threads()  # before NumPy's BLAS (or torch) starts its thread pool (WarmExecutor)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    executor = WarmExecutor(args.runtime_api_address, poll=args.poll, pull_backoff=args.pull_backoff,
                            poll_max=max(args.poll, args.poll_max))
    log.info("warm executor ready for %s", args.runtime_api_address)  # deployment.READY_LINE
    executor.serve()


if __name__ == "__main__":
    main()
