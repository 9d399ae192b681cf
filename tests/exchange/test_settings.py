"""Coordinator settings (exchange.settings.CoordinatorSettings): every value `exchange serve`
uses comes from the TOML file or EXCHANGE_* variables, and a SuperLink connection that would
send plaintext off the machine is refused, naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from exchange.cli import app
from exchange.coordinator.app import app_config_from_settings, build_runtime, runner_from_settings
from exchange.settings import load_coordinator_settings
from exchange.study.runners import FederatedRunner
from tests.exchange.scripted_runner import ScriptedRunner

TOML = """
database_url = "sqlite:///{db}"
data_dir = "{data}"
operator_key_file = "{data}/op.key"
log_key_file = "{data}/log.key"
coordinator_key_file = "{data}/keys/coordinator-2.key"
rate_limit_per_minute = 42
forward_bps = 2500
claim_window_s = 604800
unclaimed_rewards_account = "operator:consortium"
superlink_address = "127.0.0.1:9093"

[royalties.logistic_regression]
account = "org:template-authors"
bps = 700

[royalties.mlp]
account = "org:mlp-lab"
bps = 100
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("EXCHANGE_CONFIG", "EXCHANGE_FORWARD_BPS", "EXCHANGE_ROYALTIES",
                 "EXCHANGE_RATE_LIMIT_PER_MINUTE", "EXCHANGE_SUPERLINK_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "coordinator.toml"
    path.write_text(TOML.format(db=tmp_path / "c.db", data=tmp_path / "data"))
    return path


def test_toml_values_reach_the_app_config_and_the_coordinator(config: Path, tmp_path: Path) -> None:
    settings = load_coordinator_settings(config)
    app_config = app_config_from_settings(settings)
    assert app_config.coordinator_key_file == tmp_path / "data" / "keys" / "coordinator-2.key"
    assert app_config.rate_limit_per_minute == 42 and app_config.forward_bps == 2500
    assert app_config.royalties == {"logistic_regression": ("org:template-authors", 700),
                                    "mlp": ("org:mlp-lab", 100)}
    runtime = build_runtime(app_config, ScriptedRunner(hospital_keys={}))
    try:
        assert runtime.lifecycle.terms.forward_bps == 2500
        assert (runtime.lifecycle.terms.claim_window_s,
                runtime.lifecycle.terms.unclaimed_to) == (604800, "operator:consortium")
        assert runtime.lifecycle.terms.royalties == app_config.royalties
        assert app_config.coordinator_key_file.is_file()  # the key went where the file said
    finally:
        runtime.close()


def test_environment_beats_the_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGE_FORWARD_BPS", "0")
    monkeypatch.setenv("EXCHANGE_RATE_LIMIT_PER_MINUTE", "7")
    monkeypatch.setenv("EXCHANGE_ROYALTIES", '{"logistic_regression": {"account": "org:x", "bps": 5}}')
    app_config = app_config_from_settings(load_coordinator_settings(config))
    assert (app_config.forward_bps, app_config.rate_limit_per_minute) == (0, 7)
    # pydantic-settings merges a mapping from several sources key by key: the variable replaces
    # the file's entry for logistic_regression and leaves the file's mlp entry in place.
    assert app_config.royalties == {"logistic_regression": ("org:x", 5), "mlp": ("org:mlp-lab", 100)}


def test_the_coordinator_key_defaults_to_the_data_dir(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXCHANGE_CONFIG", raising=False)
    settings = load_coordinator_settings(data_dir=tmp_path / "d")
    assert app_config_from_settings(settings).coordinator_key_file == tmp_path / "d" / "coordinator.key"


def test_every_key_follows_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, finding 10: with EXCHANGE_DATA_DIR set, `exchange admin` writes all three private
    keys there and creates nothing in the directory it runs in."""
    for name in ("EXCHANGE_CONFIG", "EXCHANGE_OPERATOR_KEY_FILE", "EXCHANGE_LOG_KEY_FILE",
                 "EXCHANGE_COORDINATOR_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    data, cwd = tmp_path / "data", tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("EXCHANGE_DATA_DIR", str(data))
    monkeypatch.setenv("EXCHANGE_DATABASE_URL", f"sqlite:///{tmp_path / 'c.db'}")
    result = CliRunner().invoke(app, ["admin", "issue-key", "--role", "auditor"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in data.iterdir()) == ["coordinator.key", "log.key", "operator.key"]
    assert list(cwd.iterdir()) == []
    # an explicit path still wins
    settings = load_coordinator_settings(operator_key_file=tmp_path / "op.key")
    assert app_config_from_settings(settings).operator_key_file == tmp_path / "op.key"
    assert app_config_from_settings(settings).log_key_file == data / "log.key"


@pytest.mark.parametrize(("line", "field"), [
    ("forward_bps = 10001", "forward_bps"),
    ("rate_limit_per_minute = 0", "rate_limit_per_minute"),
    ('[royalties.lr]\naccount = "no-colon"\nbps = 1', "royalties.lr.account"),
    ('[royalties.lr]\naccount = "org:a"\nbps = -1', "royalties.lr.bps"),
    ('[royalties.lr]\naccount = "org:a"\nbps = 1\nshare = 2', "royalties.lr.share"),
    ("checkpoint_every_s = 6", "checkpoint_every_s"),  # at most 5 s between checkpoints
    ("checkpoint_every_entries = -1", "checkpoint_every_entries"),
    ("claim_window_s = 0", "claim_window_s"),
    ('unclaimed_rewards_account = "reward:alice"', "unclaimed_rewards_account"),  # a patient's
    ('unclaimed_rewards_account = "consortium"', "unclaimed_rewards_account"),
])
def test_bad_values_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str,
                                   field: str) -> None:
    monkeypatch.delenv("EXCHANGE_CONFIG", raising=False)
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValidationError) as refused:
        load_coordinator_settings(path)
    assert field in str(refused.value)


def test_superlink_plaintext_only_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from federated.runtime.tls import generate_tls

    monkeypatch.delenv("EXCHANGE_CONFIG", raising=False)
    for address in ("127.0.0.1:9093", "localhost:9093", "[::1]:9093"):
        assert load_coordinator_settings(superlink_address=address).superlink_tls() is None
    remote = load_coordinator_settings(superlink_address="superlink.example.org:9093")
    with pytest.raises(ValueError, match=r"^superlink_insecure: .*superlink\.example\.org"):
        remote.superlink_tls()
    with pytest.raises(ValueError, match=r"^superlink_insecure"):
        load_coordinator_settings(superlink_address="10.0.0.5:9093", superlink_insecure=True).superlink_tls()
    tls = generate_tls(tmp_path / "tls", hostnames=("superlink.example.org",))
    secured = load_coordinator_settings(superlink_address="superlink.example.org:9093",
                                        superlink_root_certificates=tls.ca_cert,
                                        superlink_certificate=tls.server_cert,
                                        superlink_private_key=tls.server_key)
    assert secured.superlink_tls() == tls.ca_cert.read_bytes()
    runner = runner_from_settings(secured)
    assert isinstance(runner, FederatedRunner) and runner.root_certificates == tls.ca_cert.read_bytes()
    for overrides, field in (
            ({"superlink_root_certificates": tls.ca_cert, "superlink_insecure": True}, "superlink_insecure"),
            ({"superlink_insecure": False}, "superlink_root_certificates"),
            ({"superlink_root_certificates": tmp_path / "missing.pem"}, "superlink_root_certificates"),
            ({"superlink_root_certificates": tls.ca_cert, "superlink_certificate": tls.server_cert},
             "superlink_private_key")):
        settings = load_coordinator_settings(superlink_address="superlink.example.org:9093", **overrides)
        with pytest.raises(ValueError, match=rf"^{field}:"):
            settings.superlink_tls()


def test_serve_refuses_plaintext_to_a_remote_superlink(config: Path, tmp_path: Path) -> None:
    config.write_text(config.read_text().replace('"127.0.0.1:9093"', '"superlink.example.org:9093"'))
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "superlink_insecure" in result.output and "loopback" in result.output
    assert not (tmp_path / "c.db").exists()  # refused before anything was created


def test_https_needs_both_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from federated.runtime.tls import generate_tls

    monkeypatch.delenv("EXCHANGE_CONFIG", raising=False)
    assert load_coordinator_settings().https() is None  # plain HTTP: loopback or behind a proxy
    tls = generate_tls(tmp_path / "tls")
    both = load_coordinator_settings(tls_certificate=tls.server_cert, tls_private_key=tls.server_key)
    assert both.https() == (tls.server_cert, tls.server_key)
    for overrides, field in (({"tls_certificate": tls.server_cert}, "tls_private_key"),
                             ({"tls_private_key": tls.server_key}, "tls_private_key"),
                             ({"tls_certificate": tmp_path / "none.pem", "tls_private_key": tls.server_key},
                              "tls_certificate")):
        with pytest.raises(ValueError, match=rf"^{field}:"):
            load_coordinator_settings(**overrides).https()


def test_serve_refuses_half_a_tls_pair(config: Path, tmp_path: Path) -> None:
    config.write_text(f'tls_certificate = "{tmp_path / "cert.pem"}"\n' + config.read_text())
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2 and "tls_private_key" in result.output
    assert not (tmp_path / "c.db").exists()
