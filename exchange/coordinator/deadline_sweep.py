"""The deadline sweep: a background thread that ends overdue studies.

A study not started by its start deadline expires (`StudyLifecycle.expire_due`: the
`study.expire` entry, the refund, the hospitals' approvals released). Reads that show studies
check on access too, but a study nobody looks at must still give its escrow back: this thread
calls the sweep every `every_s` seconds, like the checkpointing thread signs checkpoints
without waiting for a request. It takes the sweep as a callable, so the coordinator's runtime
layer does not depend on the lifecycle's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from exchange.logging import get_logger

log = get_logger("exchange.coordinator.deadlines")


class DeadlineSweep:
    """Calls `sweep()` every `every_s` seconds on its own thread, from `start` to `close`."""

    def __init__(self, sweep: Callable[[], list[str]], *, every_s: float) -> None:
        self.sweep = sweep
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="deadline-sweep", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                expired = self.sweep()
            except Exception as exc:  # the next pass tries again; the app keeps serving
                log.warning("deadline_sweep.failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if expired:
                log.info("deadline_sweep.expired", studies=len(expired))
