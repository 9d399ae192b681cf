"""Running a study's federated training behind one small interface.

The coordinator needs three things from a run: start it for the approved hospitals, hear about
each round (metrics and the hospitals' signed receipts), and hear how it ended (the model, or
why it failed). `StudyRunner.start(...)` returns a `RunHandle` that can cancel it; the
`StudyObserver` callbacks are how the run reports back (the coordinator records each one in
the database and the audit log, in one transaction).

Implementations:
- `FederatedRunner`: the real Flower deployment, through `federated`'s in-process ServerApp
  runner (`run_study`), in a background thread; no shelling out.
- `ScriptedRunner`: an in-process run for tests and demos that need no Flower: each "hospital"
  signs real `round.receipt` entries with its real key, the model is a real safetensors file.
  Everything the coordinator does with a run is exercised; only the training is scripted.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save as save_safetensors

from audit.entry import Entry
from audit.signing import Signer


@dataclass(frozen=True)
class RunHospital:
    id: str
    signing_key_id: str
    flower_public_key: str


@dataclass(frozen=True)
class RunRequest:
    """What a run needs to know: the study as submitted and who approved it."""

    study_id: str
    spec: Mapping[str, Any]
    hospitals: tuple[RunHospital, ...]
    rounds: int
    min_hospitals: int


class StudyObserver(Protocol):
    """How a run reports back. Each call may come from another thread."""

    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Entry]) -> None: ...

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None: ...

    def on_failed(self, study_id: str, reason: str) -> None: ...


class RunHandle(Protocol):
    def cancel(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StudyRunner(Protocol):
    def start(self, request: RunRequest, observer: StudyObserver) -> RunHandle: ...


class ThreadHandle:
    """A run in a daemon thread; `cancel()` sets an event the run checks between rounds."""

    def __init__(self, target: Callable[[threading.Event], None], name: str) -> None:
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=target, args=(self.cancelled,), name=name,
                                        daemon=True)

    def start(self) -> ThreadHandle:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class ScriptedRunner:
    """Deterministic in-process runs for tests: real signed receipts, real safetensors model.

    `hospital_keys` maps hospital id -> its signing key (the test plays the hospitals);
    `records` maps hospital id -> records used per round (default 100); a hospital listed in
    `fail_at_round` makes the run fail at that round; `pause` (an Event) lets a test hold a run
    in flight to cancel it.
    """

    hospital_keys: Mapping[str, Signer]
    records: Mapping[str, int] = field(default_factory=dict)
    fail_at_round: int | None = None
    pause: threading.Event | None = None
    handles: list[ThreadHandle] = field(default_factory=list)

    def start(self, request: RunRequest, observer: StudyObserver) -> RunHandle:
        def run(cancelled: threading.Event) -> None:
            try:
                self._run(request, observer, cancelled)
            except Exception as exc:  # report, never lose a run silently
                observer.on_failed(request.study_id, f"runner error: {exc}")

        handle = ThreadHandle(run, f"study-{request.study_id}").start()
        self.handles.append(handle)
        return handle

    def _run(self, request: RunRequest, observer: StudyObserver, cancelled: threading.Event) -> None:
        from exchange.coordinator.client import receipt_entry

        for round_number in range(1, request.rounds + 1):
            if self.pause is not None:
                while not self.pause.wait(0.01):
                    if cancelled.is_set():
                        return
            if cancelled.is_set():
                return
            if self.fail_at_round == round_number:
                observer.on_failed(request.study_id, f"round {round_number}: too few hospitals "
                                                     f"answered")
                return
            receipts = []
            for hospital in request.hospitals:
                signer = self.hospital_keys[hospital.id]
                used = self.records.get(hospital.id, 100)
                commitment = hashlib.sha256(f"{request.study_id}/{hospital.id}/{round_number}"
                                            .encode()).hexdigest()
                receipts.append(receipt_entry(signer, hospital.id, request.study_id,
                                              round_number=round_number, records_used=used,
                                              commitment=commitment,
                                              epsilon_spent=0.1 * round_number))
            observer.on_round(request.study_id, round_number,
                              {"loss": round(1.0 / (round_number + 1), 6),
                               "accuracy": round(0.5 + 0.1 * round_number / request.rounds, 6)},
                              receipts)
        if cancelled.is_set():
            return
        weights = {"weight": np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8),
                   "bias": np.zeros(1, dtype=np.float32)}
        observer.on_complete(request.study_id, save_safetensors(weights),
                             {"rounds": request.rounds})


class FederatedRunner:
    """The real Flower run, via `federated`'s in-process runner, in a background thread."""

    def __init__(self, superlink_address: str, **options: Any) -> None:
        self.superlink_address = superlink_address
        self.options = options

    def start(self, request: RunRequest, observer: StudyObserver) -> RunHandle:
        def run(cancelled: threading.Event) -> None:
            try:
                from federated import runner as federated_runner  # type: ignore[attr-defined]
            except ImportError:
                observer.on_failed(request.study_id, "federated runner is not installed")
                return
            try:
                federated_runner.run_study(
                    study_id=request.study_id, spec=dict(request.spec),
                    hospitals=[h.id for h in request.hospitals], rounds=request.rounds,
                    min_hospitals=request.min_hospitals, superlink=self.superlink_address,
                    observer=observer, cancelled=cancelled, **self.options)
            except Exception as exc:
                observer.on_failed(request.study_id, f"federated run failed: {exc}")

        return ThreadHandle(run, f"study-{request.study_id}").start()
