"""What a steward sees when a node cannot start or cannot reach the coordinator (issue 21 items
13 and 14): two nodes on one host get their own ports, a second `node run` and a taken port are
said in words, and an unreachable coordinator or an unregistered node is explained in the
node's errors with what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from audit.signing import Signer
from exchange.cli import app
from exchange.node.daemon import CoordinatorLink, NodeDaemon, NodeStartError, run_lock
from exchange.node.models import ErrorRow
from exchange.node.settings import load_node_settings
from exchange.node.store import NodeStore, open_store
from tests.node.helpers import live_coordinator


def _errors(store: NodeStore) -> list[str]:
    with store.sessions() as session:
        return list(session.execute(select(ErrorRow.message).order_by(ErrorRow.id)).scalars())


def test_two_nodes_on_one_host_get_distinct_ports(tmp_path: Path, runner: CliRunner) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = []
        for name in ("a", "b", "c"):
            result = runner.invoke(app, ["node", "init", "--dir", str(tmp_path / name), "--hospital-id",
                                         f"hospital-{name}"])
            assert result.exit_code == 0, result.output
            settings = load_node_settings(tmp_path / name / "node.toml")
            appio = int(settings.supernode.clientappio_address.rsplit(":", 1)[1])
            ports.append((settings.health_port, appio))
        flat = [p for pair in ports for p in pair]
        assert len(set(flat)) == len(flat), ports
        assert taken not in flat


def test_a_second_run_and_a_taken_port_are_refused_in_words(node_dir: Path, runner: CliRunner) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    with run_lock(settings), pytest.raises(NodeStartError, match="is already running"), run_lock(settings):
        pass
    with socket.socket() as busy:
        busy.bind((settings.health_host, 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_NODE_")}
        env.update(EXCHANGE_NODE_HEALTH_PORT=str(port), EXCHANGE_NODE_SUPERNODE__ENABLED="false",
                   EXCHANGE_NODE_COORDINATOR_URL="http://127.0.0.1:9")
        result = subprocess.run([sys.executable, "-m", "exchange.cli", "node", "run", "--config",
                                 str(node_dir / "node.toml")], env=env, capture_output=True, text=True,
                                timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    err = " ".join(result.stderr.split())
    assert f"health_port {port} on 127.0.0.1 is taken" in err and "Traceback" not in err


def test_second_node_run_process_is_refused(node_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_NODE_")}
    env.update(EXCHANGE_NODE_HEALTH_PORT="0", EXCHANGE_NODE_SUPERNODE__ENABLED="false",
               EXCHANGE_NODE_WITNESS__ENABLED="false", EXCHANGE_NODE_COORDINATOR_URL="http://127.0.0.1:9",
               EXCHANGE_NODE_POLL_INTERVAL_S="0.5")
    command = [sys.executable, "-m", "exchange.cli", "node", "run", "--config", str(node_dir / "node.toml")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        store = open_store(load_node_settings(node_dir / "node.toml").db_url)
        deadline = time.monotonic() + 90
        while store.get_state("daemon", {}).get("state") != "running":
            assert first.poll() is None and time.monotonic() < deadline, "first node run did not start"
            time.sleep(0.2)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 1
        err = " ".join(second.stderr.split())
        assert "is already running (process" in err and str(first.pid) in err and "Traceback" not in err
        # the first node explains the coordinator it cannot reach
        deadline = time.monotonic() + 30
        while not any("does not answer" in e for e in _errors(store)):
            assert time.monotonic() < deadline, _errors(store)
            time.sleep(0.2)
        assert "the coordinator at http://127.0.0.1:9 does not answer" in _errors(store)[-1]
        store.dispose()
    finally:
        first.terminate()
        first.wait(60)


def test_an_unregistered_node_is_told_what_to_send_the_operator(node_dir: Path, tmp_path: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    signer = Signer.load(settings.signing_key_path)
    stranger = Signer.generate()
    with live_coordinator(tmp_path / "c", {"hospital-z": (stranger, _flower_key(tmp_path))}) as live:
        live_settings = settings.model_copy(update={"coordinator_url": live.url})
        store = open_store(settings.db_url)
        link = CoordinatorLink(live_settings, signer)
        try:
            NodeDaemon(live_settings, store, link, signer).step()
            message = _errors(store)[-1]
        finally:
            link.close()
            store.dispose()
    assert f"this hospital (hospital-a, signing key id {signer.key_id}) is not registered" in message
    assert "exchange node show-registration" in message


def _flower_key(tmp_path: Path) -> str:
    from exchange.node.keys import create_flower_key

    return create_flower_key(tmp_path / "z" / "flower.key")
