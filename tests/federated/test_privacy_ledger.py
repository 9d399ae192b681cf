"""The hospital's persistent privacy ledger, on SQLite and PostgreSQL, schema from the migration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select

from exchange.db.engine import make_engine
from exchange.db.migrate import downgrade, upgrade
from federated.accounting import DPPlan
from federated.privacy_ledger import (
    BudgetExceededError,
    LedgerError,
    PrivacyLedger,
    privacy_charges,
)


def plan(target: float = 3.0, rounds: int = 3, sigma: float = 1.5) -> DPPlan:
    return DPPlan(target_epsilon=target, delta=1e-5, rounds=rounds, steps_per_round=10,
                  sample_rate=0.25, noise_multiplier=sigma, batch_size=32, n_patients=128)


@pytest.fixture
def engine(db_url: str) -> Engine:
    upgrade(db_url, "node")
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def test_migration_creates_the_tables_and_downgrades(db_url: str) -> None:
    upgrade(db_url, "node")
    eng = make_engine(db_url)
    names = set(inspect(eng).get_table_names())
    assert {"privacy_budget", "privacy_studies", "privacy_charges"} <= names
    eng.dispose()
    downgrade(db_url, "node", "base")
    eng = make_engine(db_url)
    assert not {"privacy_budget", "privacy_studies", "privacy_charges"} & set(inspect(eng).get_table_names())
    eng.dispose()


def test_the_migrations_create_exactly_the_ledgers_tables(db_url: str) -> None:
    """federated.privacy_ledger's tables as the node migrations (0001 and 0003) make them: no
    difference in tables, columns, types or indexes, on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from federated.privacy_ledger import metadata

    upgrade(db_url, "node")
    eng = make_engine(db_url)
    try:
        with eng.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            mine = set(metadata.tables)
            diffs = [d for d in compare_metadata(context, metadata)
                     if not (d[0] == "remove_table" and d[1].name not in mine)
                     and not (d[0] == "remove_index" and d[1].table.name not in mine)]
        assert diffs == []
    finally:
        eng.dispose()


def test_charges_are_cumulative_per_study_and_summed_across_studies(engine: Engine) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan())
    ledger.register_study("s2", plan(target=2.0))
    ledger.charge("s1", 1, 1.0)
    ledger.charge("s1", 2, 1.6)  # cumulative after round 2, not an increment
    ledger.charge("s2", 1, 0.5)
    assert ledger.spent("s1") == pytest.approx(1.6)
    assert ledger.spent("s2") == pytest.approx(0.5)
    assert ledger.spent("unknown") == 0.0
    assert ledger.total_spent() == pytest.approx(2.1)
    assert ledger.remaining() == pytest.approx(7.9)
    assert [c.increment for c in ledger.charges("s1")] == pytest.approx([1.0, 0.6])
    assert ledger.rounds_charged("s1") == 2


def test_charge_is_idempotent_per_study_and_round_across_reopen(engine: Engine, db_url: str) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan())
    first = ledger.charge("s1", 1, 1.2)
    # the node restarts: new engine, new ledger object, same database
    engine2 = make_engine(db_url)
    again = PrivacyLedger(engine2)
    assert again.total_budget() == 10.0
    assert again.plan("s1") == plan()
    repeat = again.charge("s1", 1, 1.2)
    assert repeat.created_at == first.created_at
    assert again.spent("s1") == pytest.approx(1.2)
    assert again.total_spent() == pytest.approx(1.2)
    with engine2.connect() as conn:
        assert len(conn.execute(select(privacy_charges)).all()) == 1
    with pytest.raises(LedgerError, match="already charged"):
        again.charge("s1", 1, 1.3)
    engine2.dispose()


def test_study_overspend_is_refused_and_changes_nothing(engine: Engine) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan(target=3.0))
    ledger.charge("s1", 1, 2.0)
    with pytest.raises(BudgetExceededError, match=r"above its target 3\.0000"):
        ledger.check("s1", 2, 3.1)
    with pytest.raises(BudgetExceededError, match="above its target"):
        ledger.charge("s1", 2, 3.1)
    assert ledger.spent("s1") == 2.0
    assert ledger.rounds_charged("s1") == 1
    ledger.check("s1", 2, 3.0)  # exactly the target is allowed
    assert ledger.rounds_charged("s1") == 1  # check writes nothing


def test_total_budget_overspend_is_refused(engine: Engine) -> None:
    ledger = PrivacyLedger(engine, total_budget=4.0)
    ledger.register_study("s1", plan(target=3.0))
    ledger.register_study("s2", plan(target=1.5))
    ledger.charge("s1", 1, 2.5)
    ledger.charge("s2", 1, 1.4)
    with pytest.raises(BudgetExceededError, match=r"total budget 4\.0000"):
        ledger.charge("s1", 2, 3.0)
    assert ledger.total_spent() == pytest.approx(3.9)
    ledger.charge("s1", 2, 2.6)  # what still fits is accepted
    # a new study whose target does not fit what is left is refused at registration
    with pytest.raises(BudgetExceededError, match=r"only 0\.0000"):
        ledger.register_study("s3", plan(target=1.0))
    assert ledger.plan("s3") is None
    # lowering the budget below the spend blocks further charges but undoes nothing
    ledger.set_total_budget(3.0)
    with pytest.raises(BudgetExceededError):
        ledger.charge("s1", 3, 2.7)
    assert ledger.total_spent() == pytest.approx(4.0)


def test_without_a_budget_nothing_is_spent(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    with pytest.raises(BudgetExceededError, match="not set"):
        ledger.register_study("s1", plan())


def test_registration_is_idempotent_but_a_changed_plan_is_refused(engine: Engine) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    assert ledger.register_study("s1", plan()) == plan()
    assert ledger.register_study("s1", plan()) == plan()
    with pytest.raises(LedgerError, match="different plan"):
        ledger.register_study("s1", plan(sigma=0.5))
    assert ledger.plan("s1") == plan()


@pytest.mark.parametrize(("study", "rnd", "eps", "match"), [
    ("", 1, 1.0, "study_id"),
    ("s1", 0, 1.0, "round: must be a positive integer"),
    ("s1", 4, 1.0, "round: study 's1' planned 3 rounds"),
    ("s1", 1, float("nan"), "epsilon: must be a finite number"),
    ("s1", 1, -0.1, "epsilon: must be a finite number"),
    ("nope", 1, 1.0, "not registered"),
])
def test_bad_charges_name_the_field(engine: Engine, study: str, rnd: int, eps: float, match: str) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan())
    with pytest.raises(LedgerError, match=match):
        ledger.charge(study, rnd, eps)
    assert ledger.total_spent() == 0.0


def test_cumulative_epsilon_cannot_go_down(engine: Engine) -> None:
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan())
    ledger.charge("s1", 2, 1.5)
    with pytest.raises(LedgerError, match="cumulative"):
        ledger.charge("s1", 3, 1.0)


def test_concurrent_charges_cannot_jointly_overspend(engine: Engine, db_url: str) -> None:
    """Two studies charge at the same moment from two connections; together they would pass the
    total budget, so exactly one must be refused."""
    ledger = PrivacyLedger(engine, total_budget=5.0)
    for s in ("a", "b"):
        ledger.register_study(s, plan(target=3.0))
    ledger.set_total_budget(5.0)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def worker(study: str) -> None:
        eng = make_engine(db_url)
        own = PrivacyLedger(eng)
        barrier.wait()
        try:
            own.charge(study, 1, 3.0)
            outcomes[study] = "ok"
        except BudgetExceededError:
            outcomes[study] = "refused"
        finally:
            eng.dispose()

    threads = [threading.Thread(target=worker, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes.values()) == ["ok", "refused"]
    assert ledger.total_spent() == pytest.approx(3.0)


CHARGER = """
import sys, time
from exchange.db.engine import make_engine
from federated.privacy_ledger import PrivacyLedger
ledger = PrivacyLedger(make_engine(sys.argv[1]))
ledger.charge("s1", 1, 1.25)
print("acknowledged", flush=True)
time.sleep(60)
"""


def test_acknowledged_charge_survives_kill_9(engine: Engine, db_url: str) -> None:
    """A node process killed (SIGKILL) right after `charge` returned has not lost the charge."""
    ledger = PrivacyLedger(engine, total_budget=10.0)
    ledger.register_study("s1", plan())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", CHARGER, db_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "acknowledged", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    fresh = make_engine(db_url)
    try:
        reopened = PrivacyLedger(fresh)
        assert reopened.spent("s1") == 1.25
        assert reopened.charge("s1", 1, 1.25).epsilon == 1.25  # still idempotent
        assert reopened.total_spent() == 1.25
    finally:
        fresh.dispose()
