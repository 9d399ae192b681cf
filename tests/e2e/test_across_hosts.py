"""A study across hosts: `exchange demo --hosts netns` puts each hospital's node daemon (with its
SuperNode and executor) in a Linux network namespace of its own, with its own address on a
bridge the demo makes, and the coordinator and the SuperLink on the bridge's address. A
hospital's 127.0.0.1 is then its own, so the study can only finish if every link works across
hosts: HTTPS to the coordinator, TLS with SuperNode authentication to the SuperLink, health
endpoints on the hospital's own address.

The whole study runs once, in tests/e2e/test_demo_postgres.py (PostgreSQL coordinator, each
hospital on its own host): the same claims as the default demo are checked there against the
system's own records, then `check_each_hospital_ran_on_its_own_host` below. One demo run for
both saves a full study's start-up and rounds per suite run (docs/testing.md).

Network namespaces need root; elsewhere the demo run falls back to loopback and the checks of
this module are not made, except under CI, where netns must work (CI runs as root)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from exchange.demo.hosts import netns_available


def placement() -> str:
    """netns where it can run (and always under CI, which must be able to), else loopback."""
    return "netns" if netns_available() is None or os.environ.get("CI") else "loopback"


def namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def check_each_hospital_ran_on_its_own_host(demo_run: dict[str, Any], namespaces_before: set[str]) -> None:
    unavailable = netns_available()
    assert unavailable is None, f"CI must be able to make network namespaces: {unavailable}"
    out: Path = demo_run["out"]
    report = json.loads((out / "report.json").read_text())
    network = report["network"]
    assert network["placement"] == "netns"
    coordinator = urlsplit(network["coordinator"])
    server = ipaddress.ip_address(coordinator.hostname or "")
    assert coordinator.scheme == "https" and not server.is_loopback
    assert network["superlink"].rsplit(":", 1)[0] == str(server)
    addresses = {h["address"] for h in network["hospitals"].values()}
    spaces = {h["namespace"] for h in network["hospitals"].values()}
    assert len(addresses) == len(spaces) == len(report["hospitals"]) == 3
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
    assert report["rounds"] and len(report["rounds"]) == int(report["study"]["rounds_planned"])
    # the demo removed what it made
    assert namespaces() <= namespaces_before


def test_an_unknown_placement_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from exchange.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--hosts", "cloud", "--out", str(out), "--no-live"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--hosts" in result.output and "loopback or netns" in result.output
    assert not (tmp_path / "out").exists()
