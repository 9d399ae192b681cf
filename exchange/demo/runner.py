"""The demo's study runner: the coordinator's `StudyRunner` interface over federated's
in-process ServerApp runner (`federated.runtime.server_runner.run_study`).

Why the demo carries its own adapter (written while the coordinator's `FederatedRunner` could
not yet run a study; it can now, and folding the two together is open work): the
demo builds the `StudySpec` with the node's own consent request. This module is the bridge:

- `study_spec(...)` turns the coordinator's study into the `StudySpec` every ClientApp receives,
  with a consent request built by the node's own `study_request`, so the records gated at a
  hospital during training are exactly those it counted when it decided;
- `FlowerStudyRunner.start(...)` runs the study in a thread and forwards each event to the
  coordinator's observer (receipts as their signed log entries, the model as bytes).
"""

from __future__ import annotations

import threading
from base64 import b64decode
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.coordinator.runner import (
    GuardedObserver,
    RunHandle,
    RunRequest,
    StudyObserver,
    ThreadHandle,
)
from exchange.logging import get_logger

log = get_logger("exchange.demo.runner")


@dataclass(frozen=True)
class StudyOwner:
    """The submitting organisation as hospitals see it (its id and region)."""

    organisation_id: str
    region: str


def study_spec(study_id: str, spec: Mapping[str, Any], owner: StudyOwner, *,
               round_timeout_s: float = 180.0, join_timeout_s: float = 180.0) -> Any:
    """The federated `StudySpec` of a coordinator study (see the module docstring)."""
    from exchange.node.consent_store import study_request
    from exchange.node.policy import StudyView
    from federated.study_spec import StudySpec

    view = StudyView.from_json({"id": study_id, "organisation_id": owner.organisation_id,
                                "organisation_region": owner.region, "status": "running",
                                "spec": dict(spec)})
    columns = tuple(column for names in dict(spec["columns"]).values() for column in names)
    return StudySpec(study_id=study_id, template=str(spec["template"]), task=spec["task"],
                     columns=columns, label=str(spec.get("label", "label")),
                     request=study_request(view), epsilon=float(spec["epsilon"]),
                     delta=float(spec["delta"]), rounds=int(spec["rounds"]),
                     min_hospitals=int(spec["min_hospitals"]), round_timeout_s=round_timeout_s,
                     join_timeout_s=join_timeout_s)


class _Bridge:
    """federated's StudyObserver -> the coordinator's StudyObserver, for one study."""

    def __init__(self, study_id: str, inner: StudyObserver) -> None:
        self.study_id = study_id
        self.inner = inner
        self.ended = threading.Event()

    def on_round(self, round: int, metrics: Mapping[str, float], receipts: Sequence[Any]) -> None:
        self.inner.on_round(self.study_id, round, dict(metrics), [r.entry for r in receipts])

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.inner.on_complete(self.study_id, model_path.read_bytes(), {"model_sha256": sha256})
        self.ended.set()

    def on_failed(self, reason: str) -> None:
        self.inner.on_failed(self.study_id, reason)
        self.ended.set()


class FlowerStudyRunner:
    """Runs approved studies on a SuperLink (`--isolation process`), one at a time.

    `owner_of(study_id)` names the submitting organisation and its region;
    `root_certificates` is the CA bundle of a TLS SuperLink (None: loopback without TLS).
    """

    def __init__(self, superlink_address: str, output_dir: Path,
                 owner_of: Callable[[str], StudyOwner],
                 root_certificates: bytes | None = None) -> None:
        self.superlink_address = superlink_address
        self.root_certificates = root_certificates
        self.output_dir = output_dir
        self.owner_of = owner_of
        self.handles: list[ThreadHandle] = []

    def start(self, request: RunRequest, observer: StudyObserver) -> RunHandle:
        # The coordinator's guard: only approved hospitals' receipts, verified with their
        # registered keys, one per round; exactly one end of the run.
        guard = GuardedObserver(observer, request)
        approved_keys = {h.id: b64decode(h.signing_public_key) for h in request.hospitals}

        def run(cancelled: threading.Event) -> None:
            from federated.runtime.server_runner import run_study

            bridge = _Bridge(request.study_id, guard)
            try:
                spec = study_spec(request.study_id, request.spec, self.owner_of(request.study_id))
                result = run_study(self.superlink_address, spec, bridge,
                                   self.output_dir / request.study_id,
                                   root_certificates=self.root_certificates,
                                   hospital_keys=approved_keys, stop_event=cancelled,
                                   approved_hospitals=list(approved_keys))
                log.info("run_ended", study_id=request.study_id, status=result.status,
                         reason=result.reason)
            except Exception as exc:  # the coordinator must hear about every failure
                log.warning("run_failed", study_id=request.study_id, error=str(exc))
                guard.on_failed(request.study_id, f"federated run failed: {exc}")

        handle = ThreadHandle(run, f"study-{request.study_id}").start()
        self.handles.append(handle)
        return handle
