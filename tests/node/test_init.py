"""`exchange node init`: config that loads, private keys of the right kinds, registration output."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from typer.testing import CliRunner

from audit.cosignature import witness_vkey
from audit.signing import Signer
from exchange.cli import app
from exchange.node.settings import load_node_settings


def test_init_creates_private_keys_and_a_loadable_config(node_dir: Path, runner: CliRunner) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    assert settings.hospital_id == "hospital-a"
    assert settings.data_dir == node_dir.resolve()
    for key in (settings.signing_key_path, settings.flower_key_path, settings.witness_key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(node_dir.stat().st_mode) == 0o700
    signer = Signer.load(settings.signing_key_path)
    flower = serialization.load_ssh_private_key(settings.flower_key_path.read_bytes(), password=None)
    assert isinstance(flower, ec.EllipticCurvePrivateKey) and flower.curve.name == "secp256r1"
    public = settings.flower_public_key_path.read_text()
    assert public.startswith("ecdsa-sha2-nistp256 ")
    result = runner.invoke(app, ["node", "show-registration", "--config", str(node_dir / "node.toml")])
    assert result.exit_code == 0, result.output
    registration = json.loads(result.output)
    witness = Signer.load(settings.witness_key_path)
    assert registration == {"hospital_id": "hospital-a", "public_key": signer.public_key_b64,
                            "key_id": signer.key_id, "flower_public_key": public.strip(),
                            "witness_vkey": str(witness_vkey("hospital-a.witness", witness.public_key))}


def test_init_refuses_to_overwrite(node_dir: Path, runner: CliRunner) -> None:
    key_before = (node_dir / "keys" / "node.key").read_bytes()
    result = runner.invoke(app, ["node", "init", "--dir", str(node_dir)])
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert (node_dir / "keys" / "node.key").read_bytes() == key_before


def test_init_rejects_a_bad_hospital_id(tmp_path: Path, runner: CliRunner) -> None:
    result = runner.invoke(app, ["node", "init", "--dir", str(tmp_path / "n"), "--hospital-id", "bad id!"])
    assert result.exit_code == 2
    assert "hospital_id" in result.output
    assert not (tmp_path / "n" / "keys").exists()


def test_config_errors_name_the_field(node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = node_dir / "node.toml"
    text = config.read_text().replace("max_epsilon_per_study = 5.0", "max_epsilon_per_study = 50.0")
    config.write_text(text)
    with pytest.raises(ValidationError, match="max_epsilon_per_study"):
        load_node_settings(config)
    config.write_text(text.replace("max_epsilon_per_study = 50.0", "max_epsilon_per_study = 5.0")
                      .replace('mode = "ask"', 'mode = "sometimes"'))
    with pytest.raises(ValidationError, match=r"policy\.mode"):
        load_node_settings(config)
    config.write_text(text.replace("max_epsilon_per_study = 50.0", "max_epsilon_per_study = 5.0"))
    monkeypatch.setenv("EXCHANGE_NODE_POLICY__MODE", "auto-approve")
    assert load_node_settings(config).policy.mode == "auto-approve"  # the environment wins


def test_unreadable_key_permissions_are_refused(node_dir: Path) -> None:
    settings = load_node_settings(node_dir / "node.toml")
    settings.signing_key_path.chmod(0o644)
    with pytest.raises(PermissionError):
        Signer.load(settings.signing_key_path)


def test_status_of_a_fresh_node(node_dir: Path, runner: CliRunner) -> None:
    config = ["--config", str(node_dir / "node.toml")]
    table = runner.invoke(app, ["node", "status", *config])
    assert table.exit_code == 0, table.output
    assert "daemon: never started" in table.output and "left 20 of 20" in table.output
    report = json.loads(runner.invoke(app, ["node", "status", "--json", *config]).output)
    assert report["privacy"] == {
        "total": 20.0, "spent": 0.0, "reserved": 0.0, "left": 20.0, "delta_total": 1e-4, "delta_spent": 0.0,
        "delta_reserved": 0.0, "max_delta": 1e-5, "patient_epsilon_sum": 0.0, "patient_epsilon_composed": 0.0,
        "patient_delta": 0.0, "patients": {"with_spend": 0, "near_cap": 0, "at_cap": 0, "near_cap_share": 0.8,
                                           "at_cap_share": 0.99}}
    assert "0 with privacy spent here, 0 near and 0 at their lifetime cap" in " ".join(table.output.split())
    assert report["studies"] == [] and report["records"] == 0 and report["registered"] is False


def test_missing_config_is_a_clear_error(tmp_path: Path, runner: CliRunner) -> None:
    result = runner.invoke(app, ["node", "status", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1
    assert "node config not found" in " ".join(result.output.split())
