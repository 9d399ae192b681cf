"""The operator's and researcher's commands against a real `exchange serve` process.

`exchange admin` works on the database directly (bootstrapping the first keys);
`exchange serve` runs uvicorn in its own process; `exchange study` talks HTTP to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from audit.cosignature import witness_vkey
from audit.signing import Signer
from exchange.cli import app
from exchange.coordinator.client import HospitalClient
from tests.exchange.conftest import flower_key as make_flower_key
from tests.exchange.conftest import study_body

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EXCHANGE_DATA_DIR": str(tmp_path / "data"),
            "EXCHANGE_OPERATOR_KEY_FILE": str(tmp_path / "data" / "operator.key"),
            "EXCHANGE_LOG_KEY_FILE": str(tmp_path / "data" / "log.key"),
            "FLWR_TELEMETRY_ENABLED": "0", "EXCHANGE_LOGGING__LEVEL": "WARNING"}


def admin(tmp_path: Path, db: str, *args: str) -> str:
    result = runner.invoke(app, ["admin", *args, "--db", db], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_admin_serve_and_study_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'coordinator.db'}"
    admin(tmp_path, db, "create-org", "acme", "--name", "Acme", "--region", "DE")
    admin(tmp_path, db, "create-org", "clinics", "--name", "Clinics", "--region", "DE")
    admin(tmp_path, db, "add-researcher", "acme", "alice", "--name", "Alice")
    key = admin(tmp_path, db, "issue-key", "--role", "researcher", "--org", "acme",
                "--researcher", "alice").strip().splitlines()[-1]
    assert key.startswith("hx_")
    hospital = Signer.generate()
    flower_key = tmp_path / "node.pub"
    flower_key.write_text(make_flower_key() + "\n")
    witness = witness_vkey("h-one.witness", Signer.generate().public_key)
    admin(tmp_path, db, "register-hospital", "h-one", "--org", "clinics", "--name", "H1",
          "--signing-key", hospital.public_key_b64, "--flower-key-file", str(flower_key),
          "--witness-vkey", str(witness))
    assert "minted 5000 into org:acme" in admin(tmp_path, db, "mint", "org:acme", "5000")
    balances = json.loads(admin(tmp_path, db, "balances"))
    assert balances["balances"]["org:acme"] == 5000
    # no study was paid out: no claim pool is due for a sweep, nothing is appended
    assert "0 claim pool(s) swept" in admin(tmp_path, db, "sweep-rewards")
    # Refusals name the field and exit non-zero.
    bad = runner.invoke(app, ["admin", "mint", "acme", "0", "--db", db], env=_env(tmp_path))
    assert bad.exit_code == 2 and "account" in bad.output and "amount" in bad.output
    # Key files are private.
    assert (tmp_path / "data" / "operator.key").stat().st_mode & 0o077 == 0

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli", "serve", "--db", db, "--port", str(port)],
        env={**_env(tmp_path), "EXCHANGE_LOGGING__LEVEL": "INFO"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        # Waits on the condition (the health answer); the cap is only there so a server that
        # never answers fails the test: on a loaded machine the start (torch's import) is slow.
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        trust = httpx.get(f"{url}/v1/audit/trust", headers={"Authorization": f"Bearer {key}"}).json()
        assert trust["witnesses"] == [str(witness)]  # registered in the log with the hospital
        docs = httpx.get(f"{url}/schema/docs")
        assert docs.status_code == 200 and "https://" not in docs.text
        assert httpx.get(f"{url}/static/swagger/swagger-ui-bundle.js").status_code == 200
        assert httpx.get(f"{url}/schema/openapi.json").json()["openapi"].startswith("3.1")

        spec = tmp_path / "study.json"
        spec.write_text(json.dumps(study_body(min_hospitals=1, token_budget=300)))
        env = {**_env(tmp_path), "EXCHANGE_API_KEY": key, "EXCHANGE_URL": url}
        submitted = runner.invoke(app, ["study", "submit", str(spec)], env=env)
        assert submitted.exit_code == 0, submitted.output
        study_id = json.loads(submitted.stdout)["id"]
        refused = tmp_path / "bad.json"
        refused.write_text(json.dumps(study_body(epsilon=0, rounds=0)))
        result = runner.invoke(app, ["study", "submit", str(refused)], env=env)
        assert result.exit_code == 1 and "epsilon" in result.output and "rounds" in result.output
        status = runner.invoke(app, ["study", "status", study_id], env=env)
        assert status.exit_code == 0 and json.loads(status.stdout)["status"] == "submitted"
        # The hospital's client helper: pending studies, a signed decision.
        with HospitalClient(url, hospital, "h-one") as client:
            assert [s["id"] for s in client.studies()["items"]] == [study_id]
            client.decide(study_id, "refuse", ["policy: no disease-specific studies"])
            assert client.studies()["items"] == []
        status = runner.invoke(app, ["study", "status", study_id], env=env)
        assert json.loads(status.stdout)["refusals"] == 1
        # Issue 21, item 6: list, watch, and status --results as ONE JSON document.
        listed = runner.invoke(app, ["study", "list", "--json"], env=env)
        assert listed.exit_code == 0 and [s["id"] for s in json.loads(listed.stdout)] == [study_id]
        table = runner.invoke(app, ["study", "list"], env=env)
        assert table.exit_code == 0 and "1 studies" in table.stdout and "submitted" in table.stdout
        both = runner.invoke(app, ["study", "status", study_id, "--results"], env=env)
        document = json.loads(both.stdout)
        assert both.exit_code == 0 and set(document) == {"study", "results", "report"}
        assert document["study"]["id"] == document["results"]["study_id"] == document["report"]["study_id"]
        assert document["report"]["exclusions"]["refused_by"] == {
            "h-one": ["policy: no disease-specific studies"]}
        report = runner.invoke(app, ["study", "report", study_id], env=env)
        assert report.exit_code == 0 and "h-one refused: policy: no disease-specific studies" in report.stdout
        waiting = runner.invoke(app, ["study", "watch", study_id, "--interval", "0.2", "--timeout", "1"],
                                env=env)
        assert waiting.exit_code == 4 and "submitted" in waiting.stdout and "h-one" in waiting.stdout
        cancelled = runner.invoke(app, ["study", "cancel", study_id], env=env)
        assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
        ended = runner.invoke(app, ["study", "watch", study_id, "--interval", "0.2"], env=env)
        assert ended.exit_code == 1 and "cancelled" in ended.stdout
        assert runner.invoke(app, ["study", "watch", "st-nope"], env=env).exit_code == 1
        download = runner.invoke(app, ["study", "download", study_id], env=env)
        assert download.exit_code == 1 and "no model" in download.output
        # Access log lines are JSON and carry no secret.
        metrics = httpx.get(f"{url}/metrics").text
        assert "exchange_requests_total" in metrics
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    log = stderr.decode()
    assert key not in log and key.split("_", 2)[2] not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_logged = [line for line in lines if line.get("event") == "http.request"]
    assert any(line["path"] == "/v1/studies" and line["status"] == 201 for line in requests_logged)
    assert all("authorization" not in json.dumps(line).lower() for line in requests_logged)
