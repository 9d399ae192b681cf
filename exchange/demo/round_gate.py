"""Hold the demo's study between two rounds while a hospital's consent changes.

Why: the demo revokes some patients' consent mid-study and then proves, from the signed
receipts, that no round trained after the revocation used those records. That proof recomputes
each round's consent gate at the receipt's instant from the node's final contract files, which
is exact only if no round gated between the revocation's effective time and the end of its
import (the ClientApp reads the files the import rewrites). A revocation effective "a moment
after signing" cannot promise that: an import slower than the guessed lead (a loaded machine)
left a round gating in between. Instead the run is held where nothing gates: the ServerApp
reports round r (`on_round`) once round r+1's replies are in and before it sends round r+2's
training messages (under SecAgg+ the next round's key exchange is done by then, its training
is not), so while the gate holds it no hospital is gating; the revocation is signed effective
at that moment and imported, then the run goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from exchange.study.runners import FederatedRunner, RunHandle, RunObserver, RunRequest

#: the longest a run is ever held; past it the run goes on (a demo bug must not stall a study)
MAX_HOLD_S = 600.0


class RoundGate:
    """`hold_next()` asks the run to stop at its next round boundary; `wait_held()` returns once
    it did; `release()` lets it go on."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._requested = False
        self._held = False

    def hold_next(self) -> None:
        with self._changed:
            self._requested = True

    def wait_held(self, timeout_s: float, running: Callable[[], bool]) -> bool:
        """True once the run waits at a round boundary; False if it ended (`running()` false)
        or `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._held:
                left = deadline - time.monotonic()
                if left <= 0 or not running():
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def release(self) -> None:
        with self._changed:
            self._requested = self._held = False
            self._changed.notify_all()

    def at_round_boundary(self) -> None:
        """Called by the run's thread after each recorded round: waits while a hold is asked."""
        deadline = time.monotonic() + MAX_HOLD_S
        with self._changed:
            if not self._requested:
                return
            self._held = True
            self._changed.notify_all()
            while self._requested and time.monotonic() < deadline:
                self._changed.wait(0.5)
            self._held = False


class _GatedObserver:
    def __init__(self, inner: RunObserver, gate: RoundGate) -> None:
        self.inner, self.gate = inner, gate

    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Any]) -> None:
        self.inner.on_round(study_id, round_number, metrics, receipts)
        self.gate.at_round_boundary()

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        self.inner.on_complete(study_id, model, metrics)

    def on_failed(self, study_id: str, reason: str) -> None:
        self.inner.on_failed(study_id, reason)


class GatedRunner(FederatedRunner):
    """The production runner, whose runs pass every round boundary through `gate`."""

    def __init__(self, *args: Any, gate: RoundGate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        return super().start(request, _GatedObserver(observer, self.gate))
