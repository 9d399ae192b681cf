"""A witness's long poll is woken by a new checkpoint, not by other witnesses' cosignatures.

Why: every hospital's witness long-polls the coordinator for the next checkpoint and, once it
cosigned one, waits again at its size. Each cosignature used to wake every waiting poll, which
then looked at the log again on a worker thread and went back to waiting: n * (n - 1) looks per
checkpoint with n witnesses (docs/benchmarks/scale.md, "The coordinator's CPU per round").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from audit.checkpoint import parse_checkpoint
from audit.signing import Signer
from audit.witness import AddCheckpointRequest
from exchange.coordinator.checkpointing import Checkpointing
from exchange.coordinator.client import HospitalClient
from exchange.node.witnessing import NodeWitness
from tests.exchange.witness_support import HOSPITALS, Served, app_config, node_settings, populate, serve


@pytest.fixture
def hospitals() -> dict[str, Signer]:
    return {name: Signer.generate() for name in HOSPITALS}


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path, hospitals: dict[str, Signer]) -> Iterator[Served]:
    running = serve(app_config(sqlite_url, tmp_path / "keys"), hospitals)
    witness_keys = {name: tmp_path / name / "keys" / "witness.key" for name in hospitals}
    try:
        running.keys = populate(running.runtime, hospitals, witness_keys)
        yield running
    finally:
        running.stop()


def test_a_cosignature_wakes_no_waiting_long_poll_and_a_new_checkpoint_wakes_them_all(
        served: Served, hospitals: dict[str, Signer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    checkpointing = served.runtime.checkpointing
    assert checkpointing is not None
    size = served.runtime.audit_log.size()
    deadline = time.monotonic() + 30
    while checkpointing.status()["signed_size"] != size:  # level with the log: a poll waits
        assert time.monotonic() < deadline, checkpointing.status()
        time.sleep(0.05)
    looks: list[int] = []
    real_offer = Checkpointing.offer

    def counted(self: Checkpointing, old_size: int, witness: str | None, wait_s: float = 0.0) -> Any:
        looks.append(old_size)
        return real_offer(self, old_size, witness, wait_s)

    monkeypatch.setattr(Checkpointing, "offer", counted)
    waiting, cosigning = HOSPITALS[:2], HOSPITALS[2]
    clients = {name: HospitalClient(served.url, hospitals[name], name) for name in HOSPITALS}
    try:
        with ThreadPoolExecutor(len(waiting)) as pool:
            polls = [pool.submit(clients[name].witness_checkpoint, size, 20.0) for name in waiting]
            time.sleep(1.0)  # both polls reached the coordinator, looked once and wait
            assert not any(poll.done() for poll in polls) and len(looks) == 2, looks
            # the third witness pulls (no wait: it holds nothing yet) and cosigns this checkpoint
            witness = NodeWitness(node_settings(tmp_path, cosigning, served.url), clients[cosigning])
            step = witness.step(wait_s=0)
            assert step.outcome == "cosigned" and step.size == size, step
            assert checkpointing.status()["cosigned_by"] == [f"{cosigning}.witness"]
            time.sleep(0.5)
            # the cosigning witness's own pull looked once; the waiting polls did not look again
            # (each looked a second time on the old code: woken by the cosignature)
            assert len(looks) == 3, looks
            assert not any(poll.done() for poll in polls)
            served.runtime.lifecycle.registry.mint("org:acme", 1)  # a new entry, a new checkpoint
            offers = [AddCheckpointRequest.parse(poll.result(timeout=15)[0]) for poll in polls]
    finally:
        for client in clients.values():
            client.close()
    assert all(parse_checkpoint(offer.checkpoint).size > size and offer.old_size == size for offer in offers)
