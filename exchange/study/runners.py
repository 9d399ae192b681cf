"""Running a study's federated training behind one small interface.

The coordinator needs three things from a run: start it for the approved hospitals, hear about
each round (metrics and the hospitals' signed receipts), and hear how it ended (the model, or
why it failed). `StudyRunner.start(...)` returns a `RunHandle` that can cancel it; the
`RunObserver` callbacks are how the run reports back (the coordinator records each one in
the database and the audit log, in one transaction).

Implementations:
- `FederatedRunner`: the real Flower deployment, through `federated`'s in-process ServerApp
  runner (`run_study`), in a background thread; no shelling out.
- `InProcessFederatedRunner`: the same ServerApp and ClientApp logic over an in-process grid
  (no Flower processes), for tests and quick runs.
A scripted test double (no training) lives in tests/exchange/scripted_runner.py.

Every runner reports through a `GuardedObserver`: the coordinator hears receipts only from the
study's approved hospitals, each verified against that hospital's registered key, and exactly
one end of the run (`on_complete` or `on_failed`), never anything after it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from audit.entry import Entry
from audit.signing import b64decode
from exchange.logging import get_logger
from exchange.study.receipts import check_receipt, named_hospital
from exchange.study.spec import AcceptedStudy, study_spec
from federated.receipts import ReceiptError

log = get_logger("exchange.study.runners")


@dataclass(frozen=True)
class RunHospital:
    id: str
    signing_key_id: str
    signing_public_key: str  # base64 Ed25519: the run checks every receipt against it
    flower_public_key: str


@dataclass(frozen=True)
class RunRequest:
    """What a run needs to know: the study as submitted and who approved it."""

    study_id: str
    spec: Mapping[str, Any]
    hospitals: tuple[RunHospital, ...]
    rounds: int
    min_hospitals: int
    organisation_id: str = ""
    region: str = ""
    researcher_id: str | None = None

    def accepted(self) -> AcceptedStudy:
        """The study as accepted, with the run's rounds and quorum (the ones it was
        submitted with)."""
        return AcceptedStudy(
            study_id=self.study_id,
            spec={**self.spec, "rounds": self.rounds, "min_hospitals": self.min_hospitals},
            organisation_id=self.organisation_id,
            region=self.region,
            researcher_id=self.researcher_id,
        )


class _FederatedObserver:
    """Adapts federated's observer calls (no study id, Receipt objects, a model file) to the
    coordinator's `RunObserver` (through a `GuardedObserver`, which checks every receipt again
    and passes on one end of the run only).

    Round numbers are passed through unchanged: federated calls `on_round(r)` one exchange late
    (with round r+1's replies, which carry the evaluation of round r's model; the last round's
    after a final evaluate-only exchange), but with round r's metrics and round r's receipts, so
    round r is recorded as round r."""

    def __init__(self, inner: GuardedObserver, study_id: str) -> None:
        self.inner = inner
        self.study_id = study_id

    def on_round(self, round: int, metrics: Mapping[str, float], receipts: Any) -> None:
        finite = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        self.inner.on_round(self.study_id, round, finite, [r.entry for r in receipts])

    def on_complete(self, model_path: Path, sha256: str) -> None:
        model = Path(model_path).read_bytes()
        if hashlib.sha256(model).hexdigest() != sha256:
            self.inner.on_failed(self.study_id, f"model file {model_path} does not match its hash")
            return
        self.inner.on_complete(self.study_id, model, {"sha256": sha256})

    def on_failed(self, reason: str) -> None:
        self.inner.on_failed(self.study_id, reason)


def _hospital_keys(request: RunRequest) -> dict[str, bytes]:
    return {h.id: b64decode(h.signing_public_key) for h in request.hospitals}


class GuardedObserver:
    """The coordinator's observer as a run may call it, whatever the runner.

    - `on_round` passes on only receipts from the hospitals approved for this study (the
      `RunRequest`'s hospitals, the ones the run was started for), each verified against that
      hospital's registered signing key and for this study and this round, one per hospital and
      round. Anything else is dropped with a log line: never appended, never paid for.
    - Exactly one of `on_complete` / `on_failed` reaches the coordinator; a second end, and any
      round after the end, is dropped (federated's `run_study` reports a failure itself before
      it returns "failed", so a runner that reports it again would record it twice).

    Thread-safe: a run thread and a runner's error path may race to end the run."""

    def __init__(self, inner: RunObserver, request: RunRequest) -> None:
        self.inner = inner
        self.study_id = request.study_id
        self.keys = _hospital_keys(request)
        self._lock = threading.Lock()
        self._ended = False
        self._seen: set[tuple[int, str]] = set()

    @property
    def ended(self) -> bool:
        """Whether the coordinator has been told how the run ended."""
        with self._lock:
            return self._ended

    def _accepted(self, entry: Any, round_number: int) -> bool:
        hospital = named_hospital(entry)
        try:
            check_receipt(entry, self.keys, study_id=self.study_id, round=round_number)
        except ReceiptError as exc:
            log.warning(
                "receipt.ignored",
                study_id=self.study_id,
                round=round_number,
                hospital=str(hospital),
                reason=str(exc),
            )
            return False
        assert hospital is not None  # check_receipt found its key
        if (round_number, hospital) in self._seen:
            log.warning(
                "receipt.ignored",
                study_id=self.study_id,
                round=round_number,
                hospital=hospital,
                reason="duplicate: this hospital's receipt for this round was already passed on",
            )
            return False
        self._seen.add((round_number, hospital))
        return True

    def on_round(
        self, study_id: str, round_number: int, metrics: Mapping[str, Any], receipts: list[Entry]
    ) -> None:
        with self._lock:
            if self._ended:
                log.warning(
                    "round.ignored", study_id=study_id, round=round_number, reason="the run already ended"
                )
                return
            accepted = [entry for entry in receipts if self._accepted(entry, round_number)]
            self.inner.on_round(study_id, round_number, metrics, accepted)

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        with self._lock:
            if self._ended:
                log.warning("end.ignored", study_id=study_id, reason="the run already ended")
                return
            self._ended = True
            self.inner.on_complete(study_id, model, metrics)

    def on_failed(self, study_id: str, reason: str) -> None:
        with self._lock:
            if self._ended:
                log.info("end.ignored", study_id=study_id, reason=reason[:200])
                return
            self._ended = True
            self.inner.on_failed(study_id, reason)


class RunObserver(Protocol):
    """How a run reports back. Each call may come from another thread."""

    def on_round(
        self, study_id: str, round_number: int, metrics: Mapping[str, Any], receipts: list[Entry]
    ) -> None: ...

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None: ...

    def on_failed(self, study_id: str, reason: str) -> None: ...


class RunHandle(Protocol):
    def cancel(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StudyRunner(Protocol):
    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle: ...


class ThreadHandle:
    """A run in a daemon thread; `cancel()` sets an event the run checks between rounds."""

    def __init__(self, target: Callable[[threading.Event], None], name: str) -> None:
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=target, args=(self.cancelled,), name=name, daemon=True)

    def start(self) -> ThreadHandle:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _warm_server_side() -> None:
    """Import what a study's run submission and ServerApp need and load the public reference
    samples (seconds of CPU: flwr's CLI and grid, torch, scikit-survival) while the coordinator
    waits for its first study, not in that study's first round (docs/benchmarks/scale.md,
    "First round"). One intra-op thread for
    torch unless the operator set OMP_NUM_THREADS: the ServerApp's models are tiny, and on a
    busy machine a second thread only waits for a core."""
    import os

    # first what a submitted study's `prepare` needs (the pre-training), then what its run's
    # start needs, in the order a study needs them
    try:
        import torch

        from federated.dp import warm_public_state

        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        warm_public_state()
    except Exception:  # a warm-up only: the first study does the same work and reports failures
        logging.getLogger(__name__).warning("warm-up of the ServerApp side failed", exc_info=True)
    try:
        from federated.runtime.server_runner import warm

        warm()  # the run's submission: the flwr modules it imports, a first FAB build
    except Exception:  # a warm-up only: the first study does the same work and reports failures
        logging.getLogger(__name__).warning("warm-up of the study runner failed", exc_info=True)


class FederatedRunner:
    """The real Flower deployment: `federated.runtime.server_runner.run_study` runs the study's
    ServerApp in this process against the SuperLink (no `flwr run`, no shelling out), in a
    background thread; cancelling sets the ServerApp's stop event (it stops at the next phase).

    Only the approved hospitals' nodes get the study's messages (`approved_hospitals`), receipts
    must verify against their registered keys, and the coordinator hears the run's end once:
    `run_study` reports a failure of the study itself before it returns "failed"; the runner
    reports only what `run_study` could not (it raised, or ended without telling)."""

    def __init__(
        self,
        superlink_address: str,
        output_dir: Path,
        *,
        root_certificates: bytes | None = None,
        settings: Any = None,
        round_timeout_s: float | None = None,
        join_timeout_s: float | None = None,
        warm: bool = True,
    ) -> None:
        self.superlink_address = superlink_address
        self.output_dir = output_dir
        self.root_certificates = root_certificates
        self.settings = settings
        self.round_timeout_s = round_timeout_s
        self.join_timeout_s = join_timeout_s
        self.handles: list[ThreadHandle] = []
        if warm:
            threading.Thread(target=_warm_server_side, name="federated-warm-up", daemon=True).start()

    def prepare(self, spec: Any) -> None:
        """A study was just submitted: compute its initial model (the public pre-training,
        `federated.dp.public_initial_state`: deterministic and public) in the background, while
        the hospitals decide, so the run's first round does not wait for it."""

        def work() -> None:
            try:
                from federated.dp import public_initial_state
                from federated.templates import get_template

                public_initial_state(get_template(spec.template), spec.columns, spec.task, seed=spec.seed,
                                     n_classes=spec.classes)
            except Exception:  # the run computes it again and reports what fails
                logging.getLogger(__name__).warning("preparing study %s failed", spec.study_id, exc_info=True)

        threading.Thread(target=work, name=f"prepare-{spec.study_id}", daemon=True).start()

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        # A spec federated refuses fails the start, not the thread.
        spec = study_spec(
            request.accepted(), round_timeout_s=self.round_timeout_s, join_timeout_s=self.join_timeout_s
        )
        guard = GuardedObserver(observer, request)

        def run(cancelled: threading.Event) -> None:
            from federated.runtime.server_runner import run_study

            adapter = _FederatedObserver(guard, request.study_id)
            try:
                result = run_study(
                    self.superlink_address,
                    spec,
                    adapter,
                    self.output_dir / request.study_id,
                    root_certificates=self.root_certificates,
                    settings=self.settings,
                    hospital_keys=_hospital_keys(request),
                    stop_event=cancelled,
                    approved_hospitals=[h.id for h in request.hospitals],
                )
            except Exception as exc:
                guard.on_failed(request.study_id, f"federated run failed: {type(exc).__name__}: {exc}")
                return
            if not guard.ended:  # run_study returned without an observer end: should not happen
                guard.on_failed(
                    request.study_id,
                    result.reason or f"federated run {result.status} without reporting its end",
                )

        handle = ThreadHandle(run, f"study-{request.study_id}").start()
        self.handles.append(handle)
        return handle


class InProcessFederatedRunner:
    """The real ServerApp and ClientApp logic (consent gating, Opacus-style DP-SGD, privacy
    ledgers, signed receipts, FedAvg, safetensors model) over `federated.runtime.inprocess.
    InProcessGrid`: no Flower processes, so a whole study takes seconds. `node_configs` maps a
    hospital id to its node config (`federated.runtime.site.Site.node_config()`); as at a real
    SuperLink, every hospital listed there is connected to the grid, approved or not, and only
    the study's approved hospitals get its training messages (`approved_hospitals`)."""

    def __init__(self, node_configs: Mapping[str, Mapping[str, Any]], output_dir: Path) -> None:
        self.node_configs = node_configs
        self.output_dir = output_dir
        self.handles: list[ThreadHandle] = []

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        spec = study_spec(request.accepted())
        guard = GuardedObserver(observer, request)
        approved = [h.id for h in request.hospitals]
        missing = [h for h in approved if h not in self.node_configs]
        if missing:
            raise ValueError(f"hospitals: no node config for approved hospital(s) {missing}")

        def run(cancelled: threading.Event) -> None:
            from flwr.app import Context, RecordDict

            from federated.runtime.inprocess import InProcessGrid
            from federated.server_app import ServerOptions, run_study_rounds

            adapter = _FederatedObserver(guard, request.study_id)
            try:
                order = [*approved, *sorted(h for h in self.node_configs if h not in approved)]
                nodes = {index + 1: dict(self.node_configs[h]) for index, h in enumerate(order)}
                grid = InProcessGrid(nodes, spec.to_run_config())
                context = Context(
                    run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=spec.to_run_config()
                )
                options = ServerOptions(
                    output_dir=self.output_dir / request.study_id,
                    poll=0.005,
                    hospital_keys=_hospital_keys(request),
                    stop_event=cancelled,
                    approved_hospitals=frozenset(approved),
                )
                run_study_rounds(grid, context, adapter, options)
            except Exception as exc:  # StudyFailedError included: reported already, the guard drops it
                guard.on_failed(request.study_id, f"federated run failed: {type(exc).__name__}: {exc}")

        handle = ThreadHandle(run, f"study-{request.study_id}").start()
        self.handles.append(handle)
        return handle
