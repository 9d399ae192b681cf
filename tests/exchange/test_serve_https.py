"""`exchange serve` terminating TLS itself (`tls_certificate`/`tls_private_key`), and a node
that verifies it with `coordinator_root_certificates`: the coordinator's half of a deployment
whose hospitals are on other hosts (tests/e2e/test_across_hosts.py runs a whole study so)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from audit.signing import Signer
from exchange.coordinator.client import CoordinatorError, HospitalClient
from exchange.node.settings import NodeSettings
from federated.runtime.tls import generate_tls

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_speaks_https_and_a_node_verifies_it_with_its_ca(tmp_path: Path) -> None:
    tls = generate_tls(tmp_path / "tls")
    port = _free_port()
    data = tmp_path / "data"
    env = {**os.environ, "EXCHANGE_DATA_DIR": str(data), "EXCHANGE_OPERATOR_KEY_FILE": str(data / "op.key"),
           "EXCHANGE_LOG_KEY_FILE": str(data / "log.key"), "EXCHANGE_TLS_CERTIFICATE": str(tls.server_cert),
           "EXCHANGE_TLS_PRIVATE_KEY": str(tls.server_key), "FLWR_TELEMETRY_ENABLED": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli", "serve", "--db", f"sqlite:///{tmp_path / 'c.db'}",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    ca = ssl.create_default_context(cafile=str(tls.ca_cert))
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1, verify=ca).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        # Plain HTTP gets no API; a client that does not trust the CA gets no connection.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health", timeout=5)
        # A node with the CA pinned reaches the hospital API (an unregistered hospital: 401).
        node = NodeSettings(coordinator_url=url, coordinator_root_certificates=tls.ca_cert)
        with HospitalClient(url, Signer.generate(), "h-x", verify=node.coordinator_tls()) as client, \
                pytest.raises(CoordinatorError) as refused:
            client.me()
        assert refused.value.status == 401
    finally:
        server.terminate()
        server.wait(20)


def test_a_node_names_an_unreadable_coordinator_ca(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"^coordinator_root_certificates: cannot read"):
        NodeSettings(coordinator_root_certificates=bad).coordinator_tls()
    assert NodeSettings().coordinator_tls() is True  # the system's trust store
