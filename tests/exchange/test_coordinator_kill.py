"""kill -9 of the coordinator (a real `exchange serve` process) while hospitals post signed
decisions and signed round receipts (for studies already running) and a researcher submits
studies (escrow): after a restart on the same database, nothing the coordinator acknowledged is
lost or doubled (an acknowledged receipt posted again is refused as a duplicate), the exported
log verifies with the audit CLI, and the token ledger conserves (minted = escrow + balances).

Issue 19, "Faults". SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from audit.cli import app as audit_cli
from exchange.coordinator.client import CoordinatorError, HospitalClient
from tests.exchange.conftest import make_world, receipt, study_body

pytestmark = pytest.mark.slow
#: rounds of receipts each hospital may post per running study (the kill lands well before)
RECEIPT_ROUNDS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _total(amount: int | dict[str, int]) -> int:
    """Escrow comes as one total or per study."""
    return amount if isinstance(amount, int) else sum(amount.values())


def _serve(db_url: str, keys: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EXCHANGE_DATA_DIR": str(keys),
           "EXCHANGE_OPERATOR_KEY_FILE": str(keys / "operator.key"),
           "EXCHANGE_LOG_KEY_FILE": str(keys / "log.key"),
           "EXCHANGE_COORDINATOR_KEY_FILE": str(keys / "coordinator.key"), "FLWR_TELEMETRY_ENABLED": "0"}
    command = [sys.executable, "-m", "exchange.cli", "serve", "--db", db_url, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_kill_9_of_the_coordinator_loses_nothing_acknowledged(db_url: str, tmp_path: Path) -> None:
    # The world (organisations, keys, hospitals, minted tokens, pending studies) made in process,
    # then the process's runtime closed: from here on only `exchange serve` touches the database.
    worlds = make_world(db_url, tmp_path)
    world = next(worlds)
    # Three hospitals needed, two decide: approvals never start a study (no SuperLink).
    studies = [world.submit(min_hospitals=3, token_budget=100)["id"] for _ in range(12)]
    # Running studies for the receipts: approved by h-one and h-two, their scripted runs held
    # (and cancelled with the world, without an end): they stay "running" in the database.
    world.runner.pause = threading.Event()
    running = [world.submit(min_hospitals=2, rounds=RECEIPT_ROUNDS, token_budget=100)["id"] for _ in range(2)]
    for sid in running:
        for name in ("h-one", "h-two"):
            assert world.decide(name, sid).status_code == 201
    statuses = {world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] for sid in running}
    assert statuses == {"running"}
    keys, hospitals = dict(world.keys), dict(world.hospitals)
    runtime = world.runtime
    assert next(worlds, None) is None  # leaves the TestClient and waits for the scripted runs
    runtime.close()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(db_url, tmp_path / "keys", port)
    acked_decisions: list[tuple[str, str]] = []
    acked_receipts: list[tuple[str, str, int]] = []
    acked_studies: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hospital(name: str) -> None:
        with HospitalClient(url, hospitals[name], name, timeout=httpx.Timeout(10.0, connect=2.0)) as client:
            for sid in studies:
                if stop.is_set():
                    return
                try:
                    client.decide(sid, "approve", ["policy: ok"], eligible_records=50)
                except httpx.TransportError:
                    return  # the coordinator died under the request: not acknowledged
                except CoordinatorError as exc:
                    with lock:
                        refused.append(f"{name} {sid}: {exc}")
                    return
                with lock:
                    acked_decisions.append((name, sid))

    def receipts(name: str) -> None:
        """The hospital delivers its own signed receipts, round after round, for the running studies."""
        with HospitalClient(url, hospitals[name], name, timeout=httpx.Timeout(10.0, connect=2.0)) as client:
            for round_number in range(1, RECEIPT_ROUNDS + 1):
                for sid in running:
                    if stop.is_set():
                        return
                    entry = receipt(hospitals[name], name, sid, round_number, 40 + round_number)
                    try:
                        client.submit_entry(entry)
                    except httpx.TransportError:
                        return
                    except CoordinatorError as exc:
                        with lock:
                            refused.append(f"{name} {sid} round {round_number}: {exc}")
                        return
                    with lock:
                        acked_receipts.append((name, sid, round_number))

    def researcher() -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, connect=2.0),
                          headers={"Authorization": f"Bearer {keys['alice']}"}) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/studies", json=study_body(min_hospitals=3, token_budget=7))
                except httpx.TransportError:
                    return
                if response.status_code != 201:
                    return
                with lock:
                    acked_studies.append(response.json()["id"])

    threads = [threading.Thread(target=hospital, args=(n,)) for n in ("h-one", "h-two")]
    threads += [threading.Thread(target=receipts, args=(n,)) for n in ("h-one", "h-two")]
    threads.append(threading.Thread(target=researcher))
    try:
        for t in threads:
            t.start()
        # The kill lands at a random moment once some requests were acknowledged.
        wanted, deadline = random.randint(6, 30), time.monotonic() + 60

        def acked() -> int:
            return len(acked_decisions) + len(acked_studies) + len(acked_receipts)

        # (and once at least one receipt was acknowledged: its threads may start last)
        while (acked() < wanted or not acked_receipts) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.2))
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        assert acked_decisions or acked_studies, f"nothing acknowledged before the kill: {refused}"
        assert acked_receipts, f"no receipt acknowledged before the kill: {refused}"
        assert refused == []
        server = _serve(db_url, tmp_path / "keys", port)

        # Every acknowledged request is there after the restart.
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {keys['auditor']}"}) as auditor:
            export = auditor.get("/v1/audit/export", params={"limit": 100_000})
            assert export.status_code == 200, export.text
            entries = [json.loads(line) for line in export.text.splitlines()]
            decisions = {(e["payload"]["hospital"].removeprefix("hospital:"), e["payload"]["study_id"])
                         for e in entries if e["kind"] == "study.decision"}
            assert set(acked_decisions) <= decisions
            escrowed = {e["payload"]["study_id"] for e in entries if e["kind"] == "study.escrow"}
            assert set(acked_studies) | set(studies) <= escrowed
            logged = [(e["payload"]["hospital"].removeprefix("hospital:"), e["payload"]["study_id"],
                       e["payload"]["round"]) for e in entries if e["kind"] == "round.receipt"]
            assert set(acked_receipts) <= set(logged)
            assert len(logged) == len(set(logged))  # none recorded twice
            # The restarted coordinator knows them: an acknowledged receipt sent again is a duplicate.
            name, sid, round_number = acked_receipts[-1]
            with HospitalClient(url, hospitals[name], name, timeout=30) as client, \
                    pytest.raises(CoordinatorError) as duplicate:
                client.submit_entry(receipt(hospitals[name], name, sid, round_number, 1))
            assert duplicate.value.status == 409, duplicate.value
            ledger: dict[str, Any] = auditor.get("/v1/ledger/balances").json()
        # The ledger conserves: every minted token is escrowed or in a balance.
        assert ledger["minted"] == _total(ledger["escrow"]) + sum(ledger["balances"].values())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    # The database the killed process left behind exports and verifies with the audit CLI,
    # and the auditor's fold of it agrees with the coordinator's ledger.
    out = tmp_path / "export"
    exported = CliRunner().invoke(audit_cli, ["export", "--db", db_url, "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    verified = CliRunner().invoke(audit_cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    folded = CliRunner().invoke(audit_cli, ["rewards", str(out)])
    assert folded.exit_code == 0, folded.output
    fold = json.loads(folded.stdout)
    assert fold["minted"] == ledger["minted"]
    assert fold["minted"] == _total(fold["escrow"]) + sum(fold["balances"].values())
