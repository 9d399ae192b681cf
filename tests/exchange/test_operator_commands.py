"""The operator's commands on the database (issue 21 items 12 and 14): `exchange admin` never
creates an exchange nobody named, `exchange db upgrade` reads EXCHANGE_DATABASE_URL, migrations
hold a lock so processes starting together on an empty database do not race (real PostgreSQL),
and a database that does not exist reads as that, not as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from exchange.cli import app
from exchange.db.engine import make_engine
from exchange.db.migrate import lock_key, upgrade
from tests.conftest import REPO_ROOT

runner = CliRunner()


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env.update(FLWR_TELEMETRY_ENABLED="0", EXCHANGE_LOGGING__LEVEL="WARNING")
    return env


def test_admin_without_config_refuses_to_create_an_exchange_here(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXCHANGE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["admin", "create-org", "acme", "--name", "Acme", "--region", "DE"])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "no exchange here: sqlite:///exchange.db does not exist" in out and "--config" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no database, no keys


def test_db_upgrade_reads_exchange_database_url(tmp_path: Path) -> None:
    db = tmp_path / "from-env.db"
    result = runner.invoke(app, ["db", "upgrade"], env={"EXCHANGE_DATABASE_URL": f"sqlite:///{db}"})
    assert result.exit_code == 0, result.output
    assert "alembic_version" in inspect(make_engine(f"sqlite:///{db}")).get_table_names()


@pytest.mark.postgres
def test_a_missing_postgres_database_is_named(postgres_url: str, tmp_path: Path) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_exchange_db"
    for args in (["db", "upgrade", "--db", missing], ["admin", "balances", "--db", missing]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        out = " ".join(result.output.split())
        assert "database 'no_such_exchange_db' does not exist on the server" in out, out
        assert "createdb no_such_exchange_db" in out and "Traceback" not in out
    served = subprocess.run([sys.executable, "-m", "exchange.cli", "serve", "--db", missing],
                            env=_clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert served.returncode == 1
    assert "does not exist on the server" in served.stderr and "Traceback" not in served.stderr


@pytest.mark.postgres
def test_upgrade_waits_for_the_migration_lock(postgres_url: str) -> None:
    """Another process holding the coordinator's migration lock: upgrade waits, then completes."""
    engine = make_engine(postgres_url)
    holder = engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_key("coordinator")})
    holder.commit()
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(postgres_url, "coordinator")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not done.wait(2.0), "upgrade ran while another process held the migration lock"
        assert "alembic_version" not in inspect(engine).get_table_names()
    finally:
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key("coordinator")})
        holder.commit()
        holder.close()
    thread.join(120)
    assert done.is_set() and errors == []
    assert "alembic_version" in inspect(engine).get_table_names()
    engine.dispose()


@pytest.mark.postgres
def test_migrations_and_admin_starting_together_on_empty_postgres(postgres_url: str, tmp_path: Path) -> None:
    """Three `exchange db upgrade` and an `exchange admin` (which migrates on start, as `exchange
    serve` does through the same build_runtime) at once on an empty database: all succeed, the
    schema is at head once. Without the lock this fails (tables created twice)."""
    env = {**_clean_env(tmp_path), "EXCHANGE_DATABASE_URL": postgres_url,
           "EXCHANGE_DATA_DIR": str(tmp_path / "data"),
           "EXCHANGE_OPERATOR_KEY_FILE": str(tmp_path / "data" / "operator.key"),
           "EXCHANGE_LOG_KEY_FILE": str(tmp_path / "data" / "log.key")}
    (tmp_path / "data").mkdir()
    commands = [[sys.executable, "-m", "exchange.cli", "db", "upgrade"] for _ in range(3)]
    commands.append([sys.executable, "-m", "exchange.cli", "admin", "create-org", "acme", "--name", "Acme",
                     "--region", "DE"])
    procs = [subprocess.Popen(c, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    results = [(p.wait(timeout=180), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results
    engine = make_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert connection.execute(text("SELECT id FROM organisations")).scalars().all() == ["acme"]
    engine.dispose()


def test_an_unreachable_coordinator_is_said_in_words() -> None:
    """Issue 21 item 14: httpx's connection errors are not OSErrors; they used to be a traceback."""
    result = runner.invoke(app, ["study", "status", "st-x", "--api-key", "hx_k", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 3
    assert "cannot reach the coordinator at http://127.0.0.1:9" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
