"""Fixtures for the node tests: an initialised node directory (real keys, real migrated
SQLite store) and helpers to write input files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exchange.cli import app
from exchange.node.settings import NodeSettings, load_node_settings
from exchange.node.store import NodeStore, open_store


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def node_dir(tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(__import__("os").environ):
        if name.startswith("EXCHANGE_NODE_"):
            monkeypatch.delenv(name)
    directory = tmp_path / "node"
    result = runner.invoke(app, ["node", "init", "--dir", str(directory), "--hospital-id", "hospital-a"])
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture
def settings(node_dir: Path) -> NodeSettings:
    return load_node_settings(node_dir / "node.toml")


@pytest.fixture
def store(settings: NodeSettings) -> Iterator[NodeStore]:
    s = open_store(settings.db_url)
    yield s
    s.dispose()
