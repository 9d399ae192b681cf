"""A study across hosts: `exchange demo --hosts netns` puts each hospital's node daemon (with its
SuperNode and executor) in a Linux network namespace of its own, with its own address on a
bridge the demo makes, and the coordinator and the SuperLink on the bridge's address. A
hospital's 127.0.0.1 is then its own, so the study can only finish if every link works across
hosts: HTTPS to the coordinator, TLS with SuperNode authentication to the SuperLink, health
endpoints on the hospital's own address. The same claims as the default demo are then checked
against the system's own records (tests/e2e/test_demo_postgres.py).

Network namespaces need root; the test says so and skips elsewhere, except under CI, where it
must run (CI runs as root)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from exchange.demo.hosts import netns_available
from tests.e2e.test_demo_postgres import (
    _our_processes,
    check_demo_completes_and_stops_everything,
    check_export_verifies_with_the_audit_cli,
    check_payout_conserves_tokens_and_matches_the_signed_receipts,
)

pytestmark = [pytest.mark.slow, pytest.mark.flower]
UNAVAILABLE = netns_available()
if UNAVAILABLE is not None and not os.environ.get("CI"):
    pytestmark.append(pytest.mark.skip(reason=f"network namespaces unavailable: {UNAVAILABLE}"))


def _namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def test_a_study_runs_with_each_hospital_on_its_own_host(tmp_path: Path) -> None:
    assert UNAVAILABLE is None, f"CI must be able to make network namespaces: {UNAVAILABLE}"
    before = _namespaces()
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "demo", "--hosts", "netns", "--out", str(out),
         "--rounds", "3", "--no-live"],
        capture_output=True, text=True, timeout=900, check=False, env={**os.environ, "COLUMNS": "160"})
    run = {"out": out, "db": None, "result": result, "leftovers": _our_processes(str(out))}
    check_demo_completes_and_stops_everything(run)
    check_payout_conserves_tokens_and_matches_the_signed_receipts(run)
    check_export_verifies_with_the_audit_cli(run)

    report = json.loads((out / "report.json").read_text())
    network = report["network"]
    assert network["placement"] == "netns"
    coordinator = urlsplit(network["coordinator"])
    server = ipaddress.ip_address(coordinator.hostname or "")
    assert coordinator.scheme == "https" and not server.is_loopback
    assert network["superlink"].rsplit(":", 1)[0] == str(server)
    addresses = {h["address"] for h in network["hospitals"].values()}
    namespaces = {h["namespace"] for h in network["hospitals"].values()}
    assert len(addresses) == len(namespaces) == len(report["hospitals"]) == 3
    assert all(not ipaddress.ip_address(a).is_loopback and a != str(server) for a in addresses)
    check = next(c for c in report["checks"] if c["check"].startswith("each hospital ran on a network host"))
    assert check["ok"], check["detail"]
    for hospital_id, where in network["hospitals"].items():
        node = tomllib.loads((out / "work" / hospital_id / "node.toml").read_text())
        assert node["coordinator_url"] == network["coordinator"]
        assert node["health_host"] == where["address"]
        assert node["supernode"]["insecure"] is False
        assert node["supernode"]["superlink_address"] == network["superlink"]
    # every hospital trained: the study needed all three links across hosts
    assert all(h["decision"] == "approve" for h in report["hospitals"] if h["id"] != "hospital-c")
    assert report["rounds"] and len(report["rounds"]) == 3
    # the demo removed what it made
    assert _namespaces() <= before


def test_an_unknown_placement_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from exchange.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--hosts", "cloud", "--out", str(out), "--no-live"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--hosts" in result.output and "loopback or netns" in result.output
    assert not (tmp_path / "out").exists()
