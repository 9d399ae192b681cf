"""The operator's hospitals page shows each hospital's witness as the coordinator knows it, matched
by the witness key the hospital registered in the log (its name is "<hospital>.witness", not the
hospital id): against a real coordinator served over HTTP, with real witnesses pulling and
cosigning, one of them left behind and one in alarm."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from audit.signing import Signer
from exchange.coordinator.client import HospitalClient
from exchange.node.witnessing import NodeWitness
from tests.console.conftest import CSRF_INPUT
from tests.exchange.witness_support import HOSPITALS, Served, app_config, node_settings, populate, serve

ROW = re.compile(r'<tr><td>([a-z-]+)</td>.*?data-witness-state="([a-z]+)">([^<]*)</td></tr>', re.S)


@pytest.fixture
def hospitals() -> dict[str, Signer]:
    return {name: Signer.generate() for name in (*HOSPITALS, "w-none")}


@pytest.fixture
def served(tmp_path: Path, hospitals: dict[str, Signer]) -> Iterator[Served]:
    running = serve(app_config(f"sqlite:///{tmp_path / 'coordinator.db'}", tmp_path / "keys"), hospitals)
    witness_keys = {name: tmp_path / name / "keys" / "witness.key" for name in hospitals}
    try:
        running.keys = populate(running.runtime, hospitals, witness_keys)
        yield running
    finally:
        running.stop()


def _signed_whole_log(served: Served) -> int:
    """Wait for the checkpoint thread to sign a checkpoint of the whole log; its size."""
    checkpointing = served.runtime.checkpointing
    assert checkpointing is not None
    size = served.runtime.audit_log.size()
    deadline = time.monotonic() + 30
    while int(str(checkpointing.status()["signed_size"])) < size:
        assert time.monotonic() < deadline, "no checkpoint of the whole log"
        time.sleep(0.05)
    return size


def _cosign(witness: NodeWitness, size: int) -> None:
    step = witness.step(wait_s=10)
    while step.size < size:
        assert step.outcome != "refused", step
        step = witness.step(wait_s=10)
    assert step.outcome in ("cosigned", "unchanged"), step


def _hospitals_page(served: Served) -> dict[str, tuple[str, str]]:
    """Sign in to the console as the operator (over HTTP, loopback) and read the hospitals table:
    {hospital: (witness state, text)}."""
    with httpx.Client(base_url=served.url, follow_redirects=False) as browser:
        token = CSRF_INPUT.search(browser.get("/console/sign-in").text)
        assert token is not None
        signed = browser.post("/console/sign-in", data={"api_key": served.keys["operator"],
                                                        "_csrf_token": token.group(1)})
        assert signed.status_code == 303, signed.text
        page = browser.get("/console/hospitals")
        assert page.status_code == 200
        overview = browser.get("/console/operator").text
    # the operator overview names the witnesses registered in the log
    assert "No witnesses are pinned" not in overview
    return {h: (state, " ".join(text.split())) for h, state, text in ROW.findall(page.text)}


def test_witness_state_per_hospital_is_matched_by_its_registered_witness(
        served: Served, hospitals: dict[str, Signer], tmp_path: Path) -> None:
    clients = {name: HospitalClient(served.url, hospitals[name], name) for name in HOSPITALS}
    try:
        witnesses = {name: NodeWitness(node_settings(tmp_path, name, served.url), clients[name])
                     for name in HOSPITALS}
        first = _signed_whole_log(served)
        for witness in witnesses.values():
            _cosign(witness, first)
        rows = _hospitals_page(served)
        assert {h: state for h, (state, _text) in rows.items()} == {
            "w-one": "cosigned", "w-two": "cosigned", "w-three": "cosigned", "w-none": "none"}
        assert rows["w-one"][1] == f"w-one.witness: cosigned the latest checkpoint ({first} entries)"
        assert rows["w-none"][1] == "not a witness"

        # the log grows; only w-one follows. w-two stays where it was (behind); w-three's witness
        # says it holds more entries than the log has (it saw a history the log no longer
        # extends: a rollback or a fork), which is an alarm
        served.submit()
        grown = _signed_whole_log(served)
        assert grown > first
        _cosign(witnesses["w-one"], grown)
        clients["w-three"].witness_checkpoint(grown + 40)
        rows = _hospitals_page(served)
        latest = f"w-one.witness: cosigned the latest checkpoint ({grown} entries)"
        assert rows["w-one"] == ("cosigned", latest)
        assert rows["w-two"] == ("behind", f"w-two.witness: behind, last cosigned {first} of {grown} entries")
        state, text = rows["w-three"]
        assert state == "alarm" and text.startswith("w-three.witness: ALARM")
        assert f"holds a checkpoint of {grown + 40} entries; the log has {grown}" in text
        assert rows["w-none"] == ("none", "not a witness")

        # w-three comes back level with the log and cosigns: no longer in alarm; w-two catches up
        _cosign(witnesses["w-three"], grown)
        _cosign(witnesses["w-two"], grown)
        rows = _hospitals_page(served)
        assert {h: state for h, (state, _text) in rows.items()} == {
            "w-one": "cosigned", "w-two": "cosigned", "w-three": "cosigned", "w-none": "none"}
    finally:
        for client in clients.values():
            client.close()


def test_a_refused_cosignature_puts_the_witness_in_alarm(
        served: Served, hospitals: dict[str, Signer], tmp_path: Path) -> None:
    from exchange.coordinator.client import CoordinatorError
    from exchange.node.keys import witness_signer

    size = _signed_whole_log(served)
    with HospitalClient(served.url, hospitals["w-two"], "w-two") as client:
        # a cosignature by a key that is not the one w-two registered in the log
        stranger = witness_signer("w-two", tmp_path / "stranger.key")
        body = served.runtime.checkpointing.served_note().split("\n\n")[0] + "\n"  # type: ignore[union-attr]
        with pytest.raises(CoordinatorError):
            client.post_cosignature(size, stranger.cosign(body).line)
    state, text = _hospitals_page(served)["w-two"]
    assert state == "alarm" and "its last cosignature was refused" in text
