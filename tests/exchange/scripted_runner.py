"""A scripted `StudyRunner` for tests and benchmarks: no Flower, no training, but everything
the coordinator does with a run is exercised (real signed receipts, a real safetensors model,
the production `GuardedObserver`)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from audit.signing import Signer, canonical, sha256_hex
from exchange.study.runners import GuardedObserver, RunHandle, RunObserver, RunRequest, ThreadHandle


@dataclass
class ScriptedRunner:
    """Deterministic in-process runs for tests: real signed receipts, real safetensors model.

    `hospital_keys` maps hospital id -> its signing key (the test plays the hospitals);
    `records` maps hospital id -> records used per round (default 100); a hospital listed in
    `fail_at_round` makes the run fail at that round; `pause` (an Event) lets a test hold a run
    in flight to cancel it. `intruders` maps hospital id -> a key that signs an extra receipt
    for that hospital every round although the run was not started for it (a registered
    hospital that did not approve, or a wrong key for an approved one): what a misbehaving
    deployment could hand the coordinator. The run's `GuardedObserver` must drop them.
    """

    hospital_keys: Mapping[str, Signer]
    records: Mapping[str, int] = field(default_factory=dict)
    fail_at_round: int | None = None
    pause: threading.Event | None = None
    reward_accounts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: the hospitals' kept openings of each receipt's reward commitment (a test claims with them)
    openings: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    intruders: Mapping[str, Signer] = field(default_factory=dict)
    handles: list[ThreadHandle] = field(default_factory=list)

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        guard = GuardedObserver(observer, request)

        def run(cancelled: threading.Event) -> None:
            try:
                self._run(request, guard, cancelled)
            except Exception as exc:  # report, never lose a run silently
                guard.on_failed(request.study_id, f"runner error: {exc}")

        handle = ThreadHandle(run, f"study-{request.study_id}").start()
        self.handles.append(handle)
        return handle

    def _run(self, request: RunRequest, observer: RunObserver, cancelled: threading.Event) -> None:
        from audit.reward_commitment import commit
        from federated.receipts import make_receipt

        spec_sha = sha256_hex(canonical(dict(request.spec)))
        for round_number in range(1, request.rounds + 1):
            if self.pause is not None:
                while not self.pause.wait(0.01):
                    if cancelled.is_set():
                        return
            if cancelled.is_set():
                return
            if self.fail_at_round == round_number:
                observer.on_failed(request.study_id, f"round {round_number}: too few hospitals answered")
                return
            receipts = []
            signers = [(h.id, self.hospital_keys[h.id]) for h in request.hospitals]
            for hospital_id, signer in [*signers, *self.intruders.items()]:
                used = self.records.get(hospital_id, 100)
                rewards = commit(dict(self.reward_accounts.get(hospital_id) or {}))
                self.openings[(request.study_id, hospital_id, round_number)] = rewards
                commitment = hashlib.sha256(
                    f"{request.study_id}/{hospital_id}/{round_number}".encode()
                ).hexdigest()
                receipts.append(
                    make_receipt(
                        signer,
                        study_id=request.study_id,
                        round=round_number,
                        hospital_id=hospital_id,
                        records_used=used,
                        commitment=commitment,
                        epsilon_spent=0.1,
                        epsilon_total=0.1 * round_number,
                        delta=float(request.spec.get("delta", 1e-5)),
                        spec_sha256=spec_sha,
                        rewards=rewards.public(),
                        # how a hospital composes its total: a decision count's epsilon + DP-SGD's
                        accounting={"decision_epsilon": 0.05, "training_epsilon": 0.1 * round_number - 0.05,
                                    "noise_multiplier": 1.25, "sample_rate": 0.125,
                                    "steps_per_round": 10, "accountant": "prv"},
                    ).entry
                )
            observer.on_round(
                request.study_id,
                round_number,
                {
                    "loss": round(1.0 / (round_number + 1), 6),
                    "accuracy": round(0.5 + 0.1 * round_number / request.rounds, 6),
                },
                receipts,
            )
        if cancelled.is_set():
            return
        weights = {
            "weight": np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8),
            "bias": np.zeros(1, dtype=np.float32),
        }
        observer.on_complete(request.study_id, save_safetensors(weights), {"rounds": request.rounds})
