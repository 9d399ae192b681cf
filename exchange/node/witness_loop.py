"""The node daemon's witness thread: pull, cosign, monitor, report; until the daemon stops.

Why a thread of its own: the witness long-polls the coordinator for the next checkpoint
(`witness.wait_s`), so it cosigns a checkpoint within moments of its signing, while the
daemon's main loop keeps its own pace (studies, decisions, the SuperNode).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from exchange.logging import get_logger
from exchange.node.isolated import FORK_GUARD
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from exchange.node.witnessing import (
    InclusionMonitor,
    NodeWitness,
    WitnessLink,
    inclusion_report,
    inclusion_status,
)

log = get_logger("exchange.node.witness")
ERROR_BACKOFF_S = 2.0


class WitnessLoop:
    def __init__(self, settings: NodeSettings, store: NodeStore, link: WitnessLink, key_id: str,
                 *, stop: threading.Event, report: Callable[..., None],
                 on_error: Callable[[str, BaseException], None]) -> None:
        self.settings = settings
        self.store = store
        self.witness = NodeWitness(settings, link)
        self.monitor = InclusionMonitor(settings, store, link, key_id, db_guard=FORK_GUARD)
        self.stop = stop
        self._report = report
        self._on_error = on_error
        self._last_outcome: tuple[str, int, str] | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="witness", daemon=True)
        thread.start()
        return thread

    def once(self, wait_s: float = 0.0) -> None:
        """One pull (waiting up to `wait_s` for a new checkpoint), then the inclusion check.
        What uses the node's database runs under `FORK_GUARD` (the long poll and the inclusion
        check's requests do not), so the main thread never forks while this thread is inside
        SQLite (exchange/node/isolated.py), nor waits for the coordinator to fork."""
        step = self.witness.step(wait_s)
        outcome = (step.outcome, step.size, step.reason)
        with FORK_GUARD:
            if step.outcome == "refused" and outcome != self._last_outcome:
                log.warning("checkpoint_refused", size=step.size, reason=step.reason)
                self.store.record_error("witness", f"checkpoint of size {step.size} refused: {step.reason}")
            elif step.outcome == "cosigned":
                log.debug("checkpoint_cosigned", size=step.size)
            self._last_outcome = outcome
            held = self.witness.held()
        state = self.monitor.step(held) if held is not None else None  # FORK_GUARD for the database only
        with FORK_GUARD:
            inclusion = inclusion_report(state) if state is not None else inclusion_status(self.store)
            self._report(witness=self.witness.status(), inclusion=inclusion)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.once(self.settings.witness.wait_s)
            except Exception as exc:  # the coordinator down, a bad answer: retry, never stop
                with FORK_GUARD:  # `on_error` records it in the node's database
                    self._on_error("witness", exc)
                    self._report(witness=self._status_or_error(exc))
                self.stop.wait(ERROR_BACKOFF_S)

    def _status_or_error(self, exc: BaseException) -> dict[str, Any]:
        status = self.witness.status()
        status["last_error"] = f"{type(exc).__name__}: {exc}"
        return status
