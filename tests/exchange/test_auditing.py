"""The coordinator appends its entries with `AuditLog.append_in`, in its own transactions.

What is checked here is the coordinator's side of that contract: its write engine gives
append_in what it needs (SQLite: BEGIN IMMEDIATE), an entry and the state change it records
commit together or not at all, plain transactions that append interleave with the group
commit's, and a refusal by the log becomes a problem answer with nothing written."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from audit.entry import sign_entry
from audit.signing import Signer
from audit.store import AuditLog, verify_storage
from exchange.coordinator import problems
from exchange.coordinator.app import _write_engine
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade
from tests.exchange.conftest import World

INSERT_ORG = text("INSERT INTO organisations (id, name, region, created_at) "
                  "VALUES (:id, :id, 'DE', CURRENT_TIMESTAMP)")


@pytest.fixture
def setup(db_url: str) -> Iterator[tuple[Engine, Engine, AuditLog, Signer]]:
    upgrade(db_url, "coordinator")
    operator, log_key = Signer.generate(), Signer.generate()
    read, write = make_engine(db_url), _write_engine(db_url)
    log = AuditLog(read, log_key, "test.example/log", operator.public_key)
    try:
        yield read, write, log, operator
    finally:
        read.dispose()
        write.dispose()


def _orgs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM organisations")).scalar_one())


def test_entry_and_state_commit_together_or_not_at_all(setup: tuple) -> None:
    read, write, log, operator = setup
    with write.begin() as connection:
        connection.execute(INSERT_ORG, {"id": "org-a"})
        assert log.append_in(connection, [sign_entry(operator, "org.register", {"id": "a"})]) == [0]
    assert log.size() == 1 and _orgs(read) == 1
    with pytest.raises(RuntimeError), write.begin() as connection:
        connection.execute(INSERT_ORG, {"id": "org-b"})
        log.append_in(connection, [sign_entry(operator, "org.register", {"id": "b"})])
        raise RuntimeError("crash after the append, before the commit")
    assert log.size() == 1 and _orgs(read) == 1  # neither the entry nor the row


def test_the_write_engine_serializes_concurrent_appends(setup: tuple) -> None:
    """Threads appending in their own transactions on the coordinator's write engine and its
    group commit's writer at once: every append succeeds (no lock-upgrade or next-index
    failure) and the stored log verifies. On SQLite this holds only because the write engine
    begins with BEGIN IMMEDIATE."""
    read, write, log, operator = setup
    errors: list[BaseException] = []

    def coordinator_side(worker: int) -> None:
        try:
            for i in range(8):
                with write.begin() as connection:
                    connection.execute(INSERT_ORG, {"id": f"org-{worker}-{i}"})
                    log.append_in(connection, [sign_entry(operator, "org.register", {"w": worker, "i": i})])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=coordinator_side, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    from exchange.coordinator.group_commit import GroupCommit

    group = GroupCommit(write, after_commit=log.after_commit)
    for i in range(8):
        entry = sign_entry(operator, "note", {"store": i})
        group.run(lambda connection, entry=entry: log.append_in(connection, [entry]))
    group.close()
    for thread in threads:
        thread.join()
    assert errors == []
    assert log.size() == 3 * 8 + 8 and _orgs(read) == 3 * 8
    verify_storage(read, operator.public_key)


def test_a_refused_entry_is_a_problem_and_writes_nothing(sqlite_world: World) -> None:
    coordinator = sqlite_world.runtime.lifecycle
    size = sqlite_world.runtime.audit_log.size()
    stranger = Signer.generate()
    with pytest.raises(problems.ProblemError) as refused, coordinator.journal.write() as session:
        session.execute(INSERT_ORG, {"id": "org-stranger"})
        coordinator.journal.append(session, sign_entry(stranger, "org.register", {"x": 1}))
    assert refused.value.status == 422 and "not registered" in str(refused.value)
    entry = coordinator.journal.sign("org.register", {"x": 2})
    with coordinator.journal.write() as session:
        coordinator.journal.append(session, entry)
    with pytest.raises(problems.ProblemError) as duplicate, coordinator.journal.write() as session:
        coordinator.journal.append(session, entry)
    assert duplicate.value.status == 409
    assert sqlite_world.runtime.audit_log.size() == size + 1
    assert _orgs(coordinator.journal.read_engine) == 3  # the world's organisations, not org-stranger


def test_the_coordinator_records_its_trust_anchors_and_export_needs_no_trust_file(
        db_url: str, tmp_path: Path) -> None:
    """First start writes origin, operator and log public keys into the database; `audit export
    --db URL --out DIR` then works without --trust and verifies; a start with another log key
    or origin is refused, naming what differs."""
    import dataclasses

    from typer.testing import CliRunner

    from audit.cli import app as audit_cli
    from audit.export import read_trust
    from audit.store import TrustMismatchError, read_stored_trust
    from exchange.coordinator.app import AppConfig, build_runtime
    from tests.exchange.scripted_runner import ScriptedRunner

    config = AppConfig(database_url=db_url, operator_key_file=tmp_path / "op.key",
                       log_key_file=tmp_path / "log.key", coordinator_key_file=tmp_path / "co.key",
                       log_origin="exchange.test/coordinator-log", access_log=False)
    runtime = build_runtime(config, ScriptedRunner(hospital_keys={}))
    try:
        runtime.registry.mint("org:acme", 10)
        runtime.audit_log.checkpoint()
        trust = runtime.trust
    finally:
        runtime.close()
    assert read_stored_trust(db_url) == trust
    out = tmp_path / "export"
    result = CliRunner().invoke(audit_cli, ["export", "--db", db_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_trust(out / "trust.json") == trust
    verified = CliRunner().invoke(audit_cli, ["verify", str(out)])
    assert verified.exit_code == 0 and "OK 2 entries" in verified.stdout, verified.output
    with pytest.raises(TrustMismatchError, match=r"^log_public_key: differ"):
        build_runtime(dataclasses.replace(config, log_key_file=tmp_path / "another-log.key"),
                      ScriptedRunner(hospital_keys={}))
    with pytest.raises(TrustMismatchError, match=r"^origin: differ"):
        build_runtime(dataclasses.replace(config, log_origin="elsewhere.test/log"),
                      ScriptedRunner(hospital_keys={}))
    assert read_stored_trust(db_url) == trust


def test_a_ledger_fork_is_independent_of_the_shared_fold(sqlite_world: World) -> None:
    """The per-transaction copy shares Study objects with the shared fold (cheap fork); folding a
    receipt into either must never show in the other (copy-on-write of the named study)."""
    from audit.ledger import LedgerError
    from exchange.coordinator.auditing import LedgerFoldError, _fold, _fork
    from tests.exchange.conftest import receipt

    world = sqlite_world
    sid = world.submit(token_budget=500)["id"]
    view = world.runtime.journal.ledger
    with world.runtime.journal.read_engine.connect() as connection:
        size = view.refresh(connection)
    shared = view._ledger
    fork = _fork(shared)
    assert fork.studies[sid] is shared.studies[sid]  # shared until written
    _fold(fork, [(size, receipt(world.hospitals["h-one"], "h-one", sid, 1, 40))])
    assert fork.studies[sid].receipt_count == 1 and shared.studies[sid].receipt_count == 0
    _fold(shared, [(size, receipt(world.hospitals["h-two"], "h-two", sid, 1, 30))])
    assert [r.hospital for r in fork.studies[sid].receipts] == ["hospital:h-one"]
    assert [r.hospital for r in shared.studies[sid].receipts] == ["hospital:h-two"]
    fork.state.balances["org:acme"] = -1
    assert shared.balance("org:acme") == 50_000 - 500
    with pytest.raises(LedgerFoldError) as refused:  # a ledger rule, named with its index
        _fold(fork, [(size + 1, receipt(world.hospitals["h-one"], "h-one", sid, 1, 40))])
    assert isinstance(refused.value.error, LedgerError) and "already has a receipt" in str(refused.value)


def test_a_rolled_back_savepoint_leaves_no_trace_in_the_transactions_ledger(
        sqlite_world: World) -> None:
    """Group commit: submission A appends its escrow, then fails inside its savepoint; B, in the
    same transaction, appends as many entries at the same indexes. B's balance check and escrow
    fold must see the log as it is (B's escrow, not A's): a rolled-back savepoint drops the
    transaction's ledger copy."""
    from concurrent.futures import Future

    from exchange.coordinator.schemas import StudyCreate
    from tests.exchange.conftest import study_body

    world = sqlite_world
    coordinator = world.runtime.lifecycle
    principal = coordinator.registry.authenticate_api_key(world.keys["bob"])  # globex: 5,000 tokens
    assert principal is not None
    org = coordinator.registry.organisation(principal)
    write_a = coordinator._prepare_submission(
        principal, StudyCreate.model_validate(study_body(token_budget=1_000)), org)
    write_b = coordinator._prepare_submission(
        principal, StudyCreate.model_validate(study_body(token_budget=4_500)), org)

    def failing_after_append(session: object) -> object:
        write_a(session)  # type: ignore[arg-type]
        raise RuntimeError("disk trouble after the append")

    size = world.runtime.audit_log.size()
    a: Future[object] = Future()
    b: Future[object] = Future()
    from exchange.coordinator.group_commit import _Job

    coordinator.journal.batcher._commit([_Job(failing_after_append, a), _Job(write_b, b)])
    with pytest.raises(RuntimeError, match="disk trouble"):
        a.result()
    study_b = b.result()  # 4,500 <= 5,000: A's rolled-back 1,000 must not count
    assert world.runtime.audit_log.size() == size + 2
    with coordinator.journal.read_engine.connect() as connection:  # the committed fold: B's escrow
        assert coordinator.journal.ledger.balance(connection, "org:globex") == 500
    response = world.as_("bob", "GET", f"/v1/studies/{study_b.id}")  # type: ignore[attr-defined]
    assert response.status_code == 200


def test_rows_re_appended_after_a_savepoint_rollback_are_folded(sqlite_world: World) -> None:
    """The same indexes, other rows: after a savepoint rollback the transaction's ledger copy is
    rebuilt, not trusted by its size."""
    coordinator = sqlite_world.runtime.lifecycle
    before = coordinator.registry.balances(["org:clinics"])["balances"].get("org:clinics", 0)
    with coordinator.journal.write() as session:
        try:
            with session.begin_nested():
                coordinator.journal.append(session, coordinator.journal.sign(
                    "token.mint", {"account": "org:clinics", "amount": 7}, operator=True))
                raise RuntimeError("roll this savepoint back")
        except RuntimeError:
            pass
        coordinator.journal.append(session, coordinator.journal.sign(
            "token.mint", {"account": "org:clinics", "amount": 11}, operator=True))
        ledger = coordinator.journal.ledger.in_transaction(session.connection())
        assert ledger.balance("org:clinics") == before + 11
    assert coordinator.registry.balances(["org:clinics"])["balances"]["org:clinics"] == before + 11


def test_group_commit_close_finishes_queued_writes_then_refuses(tmp_path: Path) -> None:
    from sqlalchemy import text as sql

    from exchange.coordinator.group_commit import GroupCommit

    engine = _write_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    with engine.begin() as connection:
        connection.execute(sql("CREATE TABLE t (v INTEGER)"))
    batcher = GroupCommit(engine)
    futures = [batcher.submit(lambda c, v=v: c.execute(sql("INSERT INTO t VALUES (:v)"), {"v": v}))
               for v in range(20)]
    batcher.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with engine.connect() as connection:
        assert connection.execute(sql("SELECT count(*) FROM t")).scalar_one() == 20
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(lambda c: None)
    engine.dispose()
