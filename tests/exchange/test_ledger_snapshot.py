"""The ledger snapshot: start-up from it equals the full fold, and a tampered, foreign or stale
snapshot is refused (and the whole log folded instead)."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import pytest
from sqlalchemy import update

from audit.ledger import Ledger
from audit.signing import b64encode
from exchange.coordinator import ledger_snapshot
from exchange.coordinator.app import build_runtime
from exchange.coordinator.auditing import LedgerView
from exchange.coordinator.models import LedgerSnapshot
from tests.exchange.conftest import World
from tests.exchange.scripted_runner import ScriptedRunner


def _completed_study(world: World) -> None:
    """Escrow, receipts, payouts and claim pools in the log: most of what the fold holds."""
    sid = world.submit(token_budget=10_000, rounds=2, min_hospitals=3)["id"]
    for hospital in ("h-one", "h-two", "h-three"):
        assert world.decide(hospital, sid).status_code == 201
    world.wait_runs()
    assert world.as_("alice", "GET", f"/v1/studies/{sid}").json()["status"] == "completed"


def _observable(fold: Ledger) -> dict[str, Any]:
    """Everything the fold answers with: totals, balances, escrows, claim pools, key roles."""
    return {"state": fold.state.to_json(),
            "studies": {k: (v.to_json(), [r for r in v.receipts], sorted(v.seen), v.members)
                        for k, v in fold.studies.items()},
            "pools": fold.claim_pools_json(), "keys": dict(fold._keys),
            "hospitals": dict(fold._hospitals), "applied": fold._applied}


def _full_fold(world: World) -> Ledger:
    view = LedgerView(world.runtime.journal.operator.key_id)
    with world.runtime.read_engine.connect() as connection:
        view.refresh(connection)
    return view.committed_fold()[0]


def _from_snapshot(world: World) -> tuple[Ledger, int]:
    journal = world.runtime.journal
    loaded = ledger_snapshot.load(world.runtime.read_engine, world.runtime.audit_log,
                                  journal.coordinator.public_key)
    assert loaded is not None
    view = LedgerView(journal.operator.key_id)
    view.seed(loaded.ledger, loaded.size)
    with world.runtime.read_engine.connect() as connection:
        view.refresh(connection)
    return view.committed_fold()[0], loaded.size


def _restart(world: World) -> Any:
    """A second coordinator on the same database and keys (a restart), not migrating again."""
    config = world.runtime.config
    config.migrate = False
    return build_runtime(config, ScriptedRunner(hospital_keys={}))


def test_snapshot_then_extension_equals_the_full_fold(world: World) -> None:
    _completed_study(world)
    journal = world.runtime.journal
    assert journal.save_ledger_snapshot(at_least=0)
    size = journal.ledger_snapshot_base  # the committed fold's size: up to the log's
    assert 0 < size <= world.runtime.audit_log.size()
    seeded, base = _from_snapshot(world)
    assert base == size
    assert _observable(seeded) == _observable(_full_fold(world))
    # entries after the snapshot are folded on top of it
    world.runtime.registry.mint("org:globex", 777)
    _completed_study(world)
    seeded, base = _from_snapshot(world)
    assert base == size < world.runtime.audit_log.size()
    assert _observable(seeded) == _observable(_full_fold(world))
    assert seeded.balance("org:globex") == 5_777


def test_start_up_takes_the_snapshot_and_serves_the_same_balances(world: World) -> None:
    _completed_study(world)
    assert world.runtime.journal.save_ledger_snapshot(at_least=0)
    stored = world.runtime.journal.ledger_snapshot_base
    world.runtime.registry.mint("org:globex", 5)  # one entry after the snapshot
    restarted = _restart(world)
    try:
        assert restarted.journal.ledger_snapshot_base == stored  # seeded from it
        assert restarted.registry.balances() == world.runtime.registry.balances()
        assert _observable(restarted.journal.ledger.committed_fold()[0]) == \
            _observable(_full_fold(world))
    finally:
        restarted.close()


def _tamper(world: World, **values: Any) -> None:
    with world.runtime.write_engine.begin() as connection:
        connection.execute(update(LedgerSnapshot).values(**values))


def _refused(world: World, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """`load` refuses the stored snapshot for `reason`; a restart folds the whole log and
    serves the right balances."""
    runtime = world.runtime
    with caplog.at_level(logging.WARNING, logger="exchange.coordinator.ledger_snapshot"):
        assert ledger_snapshot.load(runtime.read_engine, runtime.audit_log,
                                    runtime.journal.coordinator.public_key) is None
    assert reason in caplog.text
    restarted = _restart(world)
    try:
        assert restarted.registry.balances() == runtime.registry.balances()
        assert _observable(restarted.journal.ledger.committed_fold()[0]) == \
            _observable(_full_fold(world))
    finally:
        restarted.close()


def test_tampered_state_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    _completed_study(world)
    runtime = world.runtime
    assert runtime.journal.save_ledger_snapshot(at_least=0)
    fold, _size = runtime.journal.ledger.committed_fold()
    fold.state.balances["org:acme"] += 1_000_000  # a richer acme, same signature
    fold.state.minted += 1_000_000
    _tamper(world, state=pickle.dumps(fold))
    _refused(world, caplog, "signature does not verify")


def test_snapshot_of_another_log_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Signed by the coordinator key, but its root is not this log's at its size (a snapshot
    from another database, or from a log that was replaced)."""
    _completed_study(world)
    runtime = world.runtime
    assert runtime.journal.save_ledger_snapshot(at_least=0)
    fold, size = runtime.journal.ledger.committed_fold()
    state, root = pickle.dumps(fold), bytes(32)
    fmt = ledger_snapshot.fold_format()
    signature = runtime.journal.coordinator.sign(ledger_snapshot._message(size, root, fmt, state))
    _tamper(world, root_hash=root, state=state, signature=b64encode(signature))
    _refused(world, caplog, "root at its size differs")


def test_snapshot_beyond_the_log_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    _completed_study(world)
    runtime = world.runtime
    assert runtime.journal.save_ledger_snapshot(at_least=0)
    fold, size = runtime.journal.ledger.committed_fold()
    state, root = pickle.dumps(fold), runtime.audit_log.root(size)
    fmt = ledger_snapshot.fold_format()
    signature = runtime.journal.coordinator.sign(
        ledger_snapshot._message(size + 5, root, fmt, state))
    _tamper(world, size=size + 5, state=state, signature=b64encode(signature))
    _refused(world, caplog, "log is shorter")


def test_snapshot_of_another_fold_version_is_refused(world: World, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _completed_study(world)
    assert world.runtime.journal.save_ledger_snapshot(at_least=0)
    monkeypatch.setattr(ledger_snapshot, "fold_format", lambda: "0" * 64)
    _refused(world, caplog, "another version of the fold")


def test_no_new_snapshot_below_the_threshold(world: World) -> None:
    journal = world.runtime.journal
    assert journal.save_ledger_snapshot(at_least=0)
    base = journal.ledger_snapshot_base
    world.runtime.registry.mint("org:globex", 1)
    assert not journal.save_ledger_snapshot(at_least=10)
    assert journal.ledger_snapshot_base == base
    world.runtime.registry.balances()  # a read brings the shared fold level with the log
    assert journal.save_ledger_snapshot(at_least=1)
    assert journal.ledger_snapshot_base == world.runtime.audit_log.size()
