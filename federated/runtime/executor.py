"""The warm ClientApp executor behind `flower-supernode --isolation process`.

Out of the box a SuperNode starts a new `flwr-clientapp` interpreter for every message, which
imports torch and reloads data each time (docs/benchmarks/flower.md). This executor is a
long-lived process that takes ClientApp tasks from the SuperNode's runtime API and runs them in
this process, torch imported once.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from federated.runtime import flwr_internals
from federated.runtime.settings import disable_phone_home

if TYPE_CHECKING:
    from flwr.app import Context, Message

disable_phone_home()

EXPECTED_CLIENTAPP_REF = "federated.client_app:app"
log = logging.getLogger("federated.executor")


@dataclass
class ExecutorStats:
    """What the executor did (read by tests and the bench)."""

    tasks: int = 0
    failed: int = 0
    task_seconds: list[float] = field(default_factory=list)


class WarmExecutor:
    """Polls one SuperNode's runtime API and runs each ClientApp task in this process."""

    def __init__(self, runtime_api_address: str, *, poll: float = 0.05, pull_backoff: float | None = 0.02,
                 expected_clientapp_ref: str = EXPECTED_CLIENTAPP_REF) -> None:
        if poll <= 0:
            raise ValueError(f"poll: must be > 0 seconds, got {poll!r}")
        self.address = runtime_api_address
        self.poll = poll
        self.expected_ref = expected_clientapp_ref
        self.stats = ExecutorStats()
        self._stop = threading.Event()
        if pull_backoff is not None:
            flwr_internals.patch_clientapp_pull_backoff(pull_backoff)
        # Import the ClientApp (and with it torch, our training code) once, up front.
        self._client_app = flwr_internals.load_client_app(self.expected_ref)

    def stop(self) -> None:
        self._stop.set()

    def run_task(self, token: str) -> None:
        """Run one ClientApp task (mirrors flwr's run_clientapp, minus process exit)."""
        from flwr.app import Error, Message

        started = time.perf_counter()
        task = flwr_internals.ClientAppTask(self.address, token)
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        completed, details = False, "ClientApp task failed"
        try:
            message, context, fab = task.pull_input()
            declared = flwr_internals.fab_clientapp_ref(fab)
            if declared != self.expected_ref:
                raise PermissionError(f"this node runs only {self.expected_ref}; the run's FAB declares "
                                      f"clientapp={declared!r}")
            # In-process execution shares global random state across runs: reseed per task.
            random.seed()
            reply = self._client_app(message=message, context=context)
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
            finally:
                try:
                    task.push_output(context, completed=completed, details=details)
                finally:
                    task.close()
        self.stats.tasks += 1
        self.stats.task_seconds.append(time.perf_counter() - started)
        log.info("task done in %.3f s (%s)", self.stats.task_seconds[-1],
                 "completed" if completed else "failed")

    def serve(self) -> None:
        """Take and run tasks until `stop()`; connection errors are retried (the SuperNode may
        still be starting or restarting)."""
        tasks = flwr_internals.TaskQueue(self.address, "clientapp")
        try:
            while not self._stop.is_set():
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
                else:
                    self._stop.wait(self.poll)
        finally:
            tasks.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Warm ClientApp executor for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's runtime API, host:port (loopback)")
    parser.add_argument("--poll", type=float, default=float(os.environ.get("EXCHANGE_EXECUTOR_POLL", "0.05")))
    parser.add_argument("--pull-backoff", type=float,
                        default=float(os.environ.get("EXCHANGE_PULL_BACKOFF", "0.02")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    executor = WarmExecutor(args.runtime_api_address, poll=args.poll, pull_backoff=args.pull_backoff)
    log.info("warm executor ready for %s", args.runtime_api_address)  # deployment.READY_LINE
    executor.serve()


if __name__ == "__main__":
    main()
