"""deploy/: the compose file and the Kubernetes manifests validate against their schemas
offline (check-jsonschema's vendored compose-spec, kubernetes-validate's bundled OpenAPI
schemas, strict), the systemd units pass `systemd-analyze verify`, the configuration they
carry loads into our settings models, and make_certs.py makes a working CA chain with
private keys 0600. Each validator is also shown a broken copy, so a validator that checks
nothing cannot pass these tests."""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from exchange.node.settings import NodeSettings
from exchange.settings import load_coordinator_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
BIN = Path(sys.executable).parent


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    compose = DEPLOY / "compose.yaml"
    ok = _check_compose(compose)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    data = yaml.safe_load(compose.read_text())
    assert {"postgres", "coordinator", "superlink", "node-a", "node-b", "node-c"} <= set(data["services"])
    broken = copy.deepcopy(data)
    broken["services"]["coordinator"]["restart"] = ["always"]  # must be a string
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert _check_compose(tmp_path / "compose.yaml").returncode != 0


def test_compose_settings_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The EXCHANGE_NODE_* variables the compose file sets name real node settings."""
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = data["services"]["node-a"]["environment"]
    for name, value in env.items():
        if name.startswith("EXCHANGE_NODE_"):
            monkeypatch.setenv(name, str(value))
    settings = NodeSettings()
    assert settings.supernode.insecure is False
    assert settings.supernode.root_certificates == Path("/certs/ca.pem")
    assert settings.policy.mode == "ask"


def _k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in K8S:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_manifests_validate_strictly() -> None:
    docs = _k8s_documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "coordinator"), ("Deployment", "superlink"), ("StatefulSet", "postgres"),
            ("Service", "superlink"), ("Ingress", "coordinator")} <= kinds
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


def test_coordinator_configmap_loads_into_the_settings(tmp_path: Path) -> None:
    configmap = next(d for d in _k8s_documents() if d["kind"] == "ConfigMap")
    path = tmp_path / "coordinator.toml"
    path.write_text(configmap["data"]["coordinator.toml"])
    tomllib.loads(path.read_text())
    settings = load_coordinator_settings(path)
    assert settings.superlink_address == "superlink:9093"
    assert settings.host == "0.0.0.0"
    # A remote SuperLink needs TLS, or `exchange serve` refuses to start (superlink_tls()).
    assert settings.superlink_root_certificates == Path("/etc/exchange-superlink-ca/ca.pem")
    assert not settings.superlink_insecure
    volumes = {m["mountPath"] for d in _k8s_documents() if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "coordinator"
               for m in d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/exchange-superlink-ca" in volumes


def test_compose_coordinator_verifies_the_superlink(monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, value in data["services"]["coordinator"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = load_coordinator_settings()
    assert settings.superlink_address == "superlink:9093"
    assert settings.superlink_root_certificates == Path("/certs/ca.pem")
    with pytest.raises(ValueError, match="superlink_root_certificates"):
        settings.superlink_tls()  # the CA file only exists inside the container


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """Verified with the install prefix pointed at this checkout, so ExecStart is checked
    against real executables; any warning (unknown key, bad value) fails the test."""
    assert {u.name for u in UNITS} == {"exchange-coordinator.service", "exchange-superlink.service",
                                       "exchange-node.service"}
    copies = []
    for unit in UNITS:
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace("/opt/health-exchange/.venv/bin/", f"{BIN}/"))
        copies.append(str(target))

    def verify(paths: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True,
                              timeout=120, check=False, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})

    result = verify(copies)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    bad = tmp_path / "bad.service"
    bad.write_text(Path(copies[0]).read_text().replace("[Service]", "[Service]\nRestartt=always"))
    assert "Unknown key" in verify([str(bad)]).stderr


def test_make_certs_makes_a_working_chain(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    cmd = [sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(out), "--superlink-host",
           "superlink.example.org", "--coordinator-host", "exchange.example.org", "--ip", "10.0.0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for private in ("ca.key", "superlink.key", "coordinator.key", "postgres_password"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((out / "superlink.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    key_before = (out / "ca.key").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert (out / "ca.key").read_bytes() == key_before
