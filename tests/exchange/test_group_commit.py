"""Study submissions through the coordinator's group commit (exchange.coordinator.group_commit).

Neighbouring submissions are first written as ONE append and one study INSERT; if that fails
for any reason, each is made on its own in its savepoint. After each commit the writer's ledger
copy becomes the shared fold and the log's key state and tree edge carry over to the next
transaction. What must hold either way: every caller gets its own answer, nothing refused or
rolled back leaves a trace, and the served balances equal the auditor's fold of the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from audit.store import verify_storage
from exchange.coordinator import problems
from exchange.coordinator.group_commit import _Job
from exchange.coordinator.schemas import StudyCreate
from exchange.study.lifecycle import StudyLifecycle, SubmittedStudy, _Submission
from tests.exchange.conftest import World, study_body
from tests.exchange.test_lifecycle import fold, log_entries, served_balances


def _submissions(world: World, who: str, budgets: list[int]) -> tuple[StudyLifecycle, list[_Submission]]:
    coordinator = world.runtime.lifecycle
    principal = coordinator.registry.authenticate_api_key(world.keys[who])
    assert principal is not None
    org = coordinator.registry.organisation(principal)
    return coordinator, [
        coordinator._prepare_submission(
            principal, StudyCreate.model_validate(study_body(token_budget=b, title=f"g{i}")), org)
        for i, b in enumerate(budgets)]


def _commit_together(coordinator: StudyLifecycle, writes: list[_Submission]) -> list[Any]:
    """One writer batch holding `writes` as neighbours of one kind (as concurrent POSTs are)."""
    jobs = [_Job(write, Future(), coordinator._submit_many_in) for write in writes]
    coordinator.journal.batcher._commit(jobs)
    return [job.future for job in jobs]


@contextmanager
def _statements(world: World) -> Iterator[list[str]]:
    """The statements the writer makes: SQLAlchemy's, and on PostgreSQL those of a group sent
    as one string (`insert_and_commit`: the audit INSERT, then the study rows' `tail`)."""
    import audit.store.log as store_log

    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    real = store_log.insert_and_commit

    def record_string(connection: Any, rows: Any, nodes: Any, **kwargs: Any) -> None:
        seen.append("INSERT INTO audit_entries (as EXECUTE audit_append_rows, one string)")
        if kwargs.get("tail"):
            seen.append(kwargs["tail"])
        real(connection, rows, nodes, **kwargs)

    engine = world.runtime.journal.write_engine
    event.listen(engine, "before_cursor_execute", record)
    store_log.insert_and_commit = record_string  # type: ignore[assignment]
    try:
        yield seen
    finally:
        store_log.insert_and_commit = real
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def _failing_commit(world: World) -> Iterator[None]:
    """Every COMMIT of the writer fails. SQLite: SQLAlchemy's commit event raises. PostgreSQL:
    the server refuses the COMMIT itself (a deferred constraint trigger on the study rows, run
    at COMMIT), also when the COMMIT goes out in a group's one string."""
    from sqlalchemy import text

    engine = world.runtime.journal.write_engine

    def fail(_connection: Any) -> None:
        raise RuntimeError("disk full at commit")

    if engine.dialect.name != "postgresql":
        event.listen(engine, "commit", fail)
        try:
            yield
        finally:
            event.remove(engine, "commit", fail)
        return
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk full at commit'; END $$"))
        connection.execute(text(
            "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON studies DEFERRABLE "
            "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit()"))
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER fail_at_commit ON studies"))
            connection.execute(text("DROP FUNCTION fail_at_commit()"))


def test_a_group_is_one_append_and_one_insert_and_each_caller_gets_its_study(world: World) -> None:
    before = served_balances(world)["balances"]["org:acme"]
    size = world.runtime.audit_log.size()
    coordinator, writes = _submissions(world, "alice", [100, 200, 300])
    with _statements(world) as statements:
        futures = _commit_together(coordinator, writes)
    studies = [f.result() for f in futures]
    assert all(isinstance(s, SubmittedStudy) for s in studies)
    assert [s.id for s in studies] == [w.study_id for w in writes]
    assert [s.submit_entry_index for s in studies] == [size, size + 2, size + 4]
    study_inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT INTO STUDIES")]
    entry_inserts = [s for s in statements if "INSERT INTO audit_entries" in s]
    assert len(study_inserts) == 1 and len(entry_inserts) == 1, statements
    entries = log_entries(world)[size:]
    assert [(e.kind, e.payload["study_id"]) for e in entries] == [
        (kind, w.study_id) for w in writes for kind in ("study.submit", "study.escrow")]
    assert served_balances(world)["balances"]["org:acme"] == before - 600
    for study in studies:  # what POST answered is what a read gives
        assert world.as_("alice", "GET", f"/v1/studies/{study.id}").json()["submitted_at"]
    assert fold(world) == served_balances(world)


def test_an_overdrawing_member_is_refused_alone(world: World) -> None:
    """globex holds 5,000: 2,000 + 2,500 fit, the 1,000 after them does not. The group fails,
    each is then made on its own: two studies, one 422 naming the budget, no trace of it."""
    size = world.runtime.audit_log.size()
    coordinator, writes = _submissions(world, "bob", [2_000, 2_500, 1_000])
    futures = _commit_together(coordinator, writes)
    assert futures[0].result().token_budget == 2_000 and futures[1].result().token_budget == 2_500
    refused = futures[2].exception()
    assert isinstance(refused, problems.ProblemError) and refused.status == 422
    assert [e["field"] for e in refused.errors] == ["token_budget"]
    assert world.runtime.audit_log.size() == size + 4
    assert world.as_("bob", "GET", f"/v1/studies/{writes[2].study_id}").status_code == 404
    assert served_balances(world)["balances"]["org:globex"] == 500
    assert fold(world) == served_balances(world)


def test_a_failed_commit_moves_nothing_forward(world: World) -> None:
    """The COMMIT itself fails: no caller is acknowledged, and neither the served balances nor
    the log's carried-over state take the transaction's appends as committed; the next group
    commits at the same indexes and everything still agrees with the auditor's fold."""
    balances = served_balances(world)
    size = world.runtime.audit_log.size()
    coordinator, writes = _submissions(world, "alice", [10, 20])
    with _failing_commit(world):
        futures = _commit_together(coordinator, writes)
    for future in futures:
        with pytest.raises(Exception, match="disk full at commit"):
            future.result()
    assert world.runtime.audit_log.size() == size
    assert served_balances(world) == balances
    _coordinator, again = _submissions(world, "alice", [30, 40])
    studies = [f.result() for f in _commit_together(coordinator, again)]
    assert [s.submit_entry_index for s in studies] == [size, size + 2]
    assert served_balances(world)["balances"]["org:acme"] == balances["balances"]["org:acme"] - 70
    assert fold(world) == served_balances(world)
    # Every stored tree node is the one the entries give (the carried-over edge was right).
    assert verify_storage(coordinator.journal.read_engine, coordinator.journal.operator.public_key) \
        == world.runtime.audit_log.root()


def test_post_answers_exactly_what_a_read_of_the_new_study_gives(world: World) -> None:
    """POST builds its answer from the row it wrote (StudyLifecycle.submitted_view)."""
    posted = world.submit(title="answered from the row")
    read = world.as_("alice", "GET", f"/v1/studies/{posted['id']}")
    assert read.status_code == 200 and read.json() == posted


# -- LoopGroupCommit: SQLite submissions from the event loop (statements on the loop) --------

def _async_submissions(world: World, who: str, budgets: list[int]) -> list[Any]:
    """Submit concurrently from one event loop; each result or exception, in order."""
    coordinator = world.runtime.lifecycle
    principal = coordinator.registry.authenticate_api_key(world.keys[who])
    assert principal is not None
    bodies = [StudyCreate.model_validate(study_body(token_budget=b, title=f"a{i}"))
              for i, b in enumerate(budgets)]
    # The organisation cached: every submission is then queued in the loop's first turn (the
    # first of an organisation otherwise reads it off the loop), so they form one batch.
    coordinator.registry.organisation(principal)

    async def main() -> list[Any]:
        return await asyncio.gather(*(coordinator.submit_study_async(principal, body)
                                      for body in bodies), return_exceptions=True)

    return asyncio.run(main())


def test_the_loop_writer_groups_concurrent_submissions(sqlite_world: World) -> None:
    world = sqlite_world
    batcher = world.runtime.journal.loop_batcher
    assert batcher is not None  # SQLite: submissions from the loop go through it
    size = world.runtime.audit_log.size()
    before = served_balances(world)["balances"]["org:acme"]
    with _statements(world) as statements:
        results = _async_submissions(world, "alice", [10, 20, 30, 40, 50])
    assert all(isinstance(r, SubmittedStudy) for r in results), results
    assert sorted(r.submit_entry_index for r in results) == list(range(size, size + 10, 2))
    # Submitted in one loop iteration: one batch, so one append and one study INSERT.
    assert len([s for s in statements if "INSERT INTO audit_entries" in s]) == 1, statements
    assert served_balances(world)["balances"]["org:acme"] == before - 150
    assert fold(world) == served_balances(world)


def test_the_loop_writer_refuses_an_overdrawing_member_alone(sqlite_world: World) -> None:
    world = sqlite_world
    # globex holds 5,000: any two of these fit, all three do not.
    results = _async_submissions(world, "bob", [2_000, 2_500, 1_000])
    accepted = [r for r in results if isinstance(r, SubmittedStudy)]
    refused = [r for r in results if isinstance(r, problems.ProblemError)]
    assert len(accepted) == 2 and len(refused) == 1, results
    assert refused[0].status == 422 and [e["field"] for e in refused[0].errors] == ["token_budget"]
    spent = sum(r.token_budget for r in accepted)
    assert served_balances(world)["balances"]["org:globex"] == 5_000 - spent
    assert fold(world) == served_balances(world)


def test_the_loop_writer_acknowledges_nothing_when_the_commit_fails(sqlite_world: World) -> None:
    world = sqlite_world
    engine = world.runtime.journal.write_engine
    balances = served_balances(world)
    size = world.runtime.audit_log.size()

    def fail(_connection: Any) -> None:
        raise RuntimeError("disk full at commit")

    event.listen(engine, "commit", fail)
    try:
        results = _async_submissions(world, "alice", [10, 20])
    finally:
        event.remove(engine, "commit", fail)
    assert all(isinstance(r, RuntimeError) and "disk full" in str(r) for r in results), results
    assert world.runtime.audit_log.size() == size and served_balances(world) == balances
    again = _async_submissions(world, "alice", [30])
    assert isinstance(again[0], SubmittedStudy) and again[0].submit_entry_index == size
    assert fold(world) == served_balances(world)
    coordinator = world.runtime.lifecycle
    assert verify_storage(coordinator.journal.read_engine, coordinator.journal.operator.public_key) \
        == world.runtime.audit_log.root()


def test_a_caller_on_another_loop_gets_its_answer_there(sqlite_world: World) -> None:
    """A batch drained by one loop settles a second loop's futures on that loop."""
    import threading

    world = sqlite_world
    coordinator = world.runtime.lifecycle
    principal = coordinator.registry.authenticate_api_key(world.keys["alice"])
    assert principal is not None
    body = StudyCreate.model_validate(study_body(token_budget=5))
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:
        async def both() -> list[Any]:
            here = coordinator.submit_study_async(principal, body)
            there = asyncio.run_coroutine_threadsafe(
                coordinator.submit_study_async(principal, body), other)
            return [await here, await asyncio.wrap_future(there)]

        first, second = asyncio.run(both())
        assert isinstance(first, SubmittedStudy) and isinstance(second, SubmittedStudy)
        assert first.id != second.id
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join(10)
        other.close()
    assert fold(world) == served_balances(world)


def test_a_failing_after_commit_hook_does_not_fail_a_durable_write(tmp_path: Any) -> None:
    """The hook runs after COMMIT returned: if it raises, the writes stand and their callers
    get their results (both writers)."""
    from sqlalchemy import text

    from exchange.coordinator.app import _write_engine
    from exchange.coordinator.group_commit import GroupCommit, LoopGroupCommit

    engine = _write_engine(f"sqlite:///{tmp_path / 'hook.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v INTEGER)"))

    def broken_hook(_connection: Any, _transaction: object) -> None:
        raise RuntimeError("hook broke")

    def insert(value: int) -> Any:
        return lambda c: c.execute(text("INSERT INTO t VALUES (:v)"), {"v": value}) and value

    threaded = GroupCommit(engine, after_commit=broken_hook)
    assert threaded.run(insert(1)) == 1
    threaded.close()
    on_loop = LoopGroupCommit(engine, after_commit=broken_hook)

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(on_loop.submit_async(insert(v)) for v in (2, 3))))

    assert asyncio.run(main()) == [2, 3]
    on_loop.close()
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT v FROM t")).scalars()) == [1, 2, 3]
    engine.dispose()


def _table_engine(url: str) -> Any:
    from sqlalchemy import text

    from exchange.coordinator.app import _write_engine

    engine = _write_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v INTEGER)"))
    return engine


def _insert_then(value: int, fail: bool = False) -> Any:
    from sqlalchemy import text

    def write(connection: Any) -> int:
        connection.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})
        if fail:
            raise ValueError(f"write {value} refused")
        return value
    return write


def test_a_failing_first_write_is_rolled_back_alone(db_url: str) -> None:
    """The transaction's first write runs without a savepoint: when it fails, the transaction
    is begun again for the others, and the failed write leaves nothing (both databases; a
    failed statement aborts a PostgreSQL transaction); a failed run made as one write is made
    one write at a time."""
    from sqlalchemy import text

    from exchange.coordinator.group_commit import GroupCommit

    engine = _table_engine(db_url)
    group = GroupCommit(engine)
    jobs = [_Job(_insert_then(1, fail=True), Future()), _Job(_insert_then(2), Future()),
            _Job(_insert_then(3), Future())]
    group._commit(jobs)
    with pytest.raises(ValueError, match="write 1 refused"):
        jobs[0].future.result()
    assert [job.future.result() for job in jobs[1:]] == [2, 3]

    def together(connection: Any, writes: list[Any]) -> list[Any]:
        raise RuntimeError("not as one")

    jobs = [_Job(_insert_then(v, fail=v == 5), Future(), together) for v in (4, 5, 6)]
    group._commit(jobs)
    assert jobs[0].future.result() == 4 and jobs[2].future.result() == 6
    with pytest.raises(ValueError, match="write 5 refused"):
        jobs[1].future.result()
    group.close()
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT v FROM t")).scalars()) == [2, 3, 4, 6]
    engine.dispose()


def test_a_failing_write_alone_in_its_transaction_is_made_once(db_url: str) -> None:
    """A batch made as one write may end its transaction with that write (`MAY_COMMIT`);
    only an append whose COMMIT the server skipped (`COMMIT_SKIPPED`) makes the batch again.
    Any other write that fails is refused after being made once, as before."""
    from exchange.coordinator.group_commit import GroupCommit

    engine = _table_engine(db_url)
    group = GroupCommit(engine)
    made: list[int] = []

    def refused(connection: Any) -> int:
        made.append(1)
        return _insert_then(7, fail=True)(connection)

    with pytest.raises(ValueError, match="write 7 refused"):
        group.run(refused)
    assert made == [1]
    assert group.run(_insert_then(8)) == 8
    group.close()
    engine.dispose()


def test_the_writer_gathers_a_group_as_large_as_the_last_one(tmp_path: Any) -> None:
    """With `gather_s`, the writer waits for as many writes as its previous transaction made
    before it begins the next one (then one transaction, one COMMIT, for all of them); a
    smaller group still goes once `gather_s` has passed, or when the group commit closes."""
    import time

    from sqlalchemy import text

    from exchange.coordinator.group_commit import GroupCommit

    engine = _table_engine(f"sqlite:///{tmp_path / 'gather.db'}")
    commits: list[int] = []
    event.listen(engine, "commit", lambda _connection: commits.append(1))

    def group_of_two(group: GroupCommit, value: int) -> None:
        """A transaction of two writes: the second is queued while the first is under way
        (a late arrival joins it)."""
        late: list[Future[Any]] = []

        def first(connection: Any) -> int:
            result: int = _insert_then(value)(connection)
            if not late:
                late.append(group.submit(_insert_then(value + 1)))
            return result

        assert group.run(first) == value and late[0].result() == value + 1

    group = GroupCommit(engine, gather_s=3600.0)  # only a full group (or close) ends a wait
    group_of_two(group, 1)
    commits.clear()
    third = group.submit(_insert_then(3))
    time.sleep(0.2)
    assert not third.done()  # the writer waits for a second write
    fourth = group.submit(_insert_then(4))
    assert third.result() == 3 and fourth.result() == 4
    assert len(commits) == 1  # one transaction for both
    fifth = group.submit(_insert_then(5))  # waited for (a group of two again) ...
    group.close()  # ... until the group commit closes: then made
    assert fifth.result() == 5

    group = GroupCommit(engine, gather_s=0.01)
    group_of_two(group, 6)
    assert group.run(_insert_then(8)) == 8  # alone: begun once gather_s has passed
    group.close()
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT v FROM t")).scalars()) == \
            [1, 2, 3, 4, 5, 6, 7, 8]
    engine.dispose()


@pytest.mark.postgres
def test_the_writer_survives_its_connection_being_dropped(postgres_url: str) -> None:
    """The writer keeps its connection between batches (no pre-ping per transaction): if the
    server drops it while idle, the next batch is made on a fresh one, and acknowledged."""
    from sqlalchemy import text

    from exchange.coordinator.group_commit import GroupCommit

    engine = _table_engine(postgres_url)
    group = GroupCommit(engine)
    assert group.run(_insert_then(1)) == 1
    pid = group.run(lambda c: c.execute(text("SELECT pg_backend_pid()")).scalar_one())
    with engine.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        other.commit()
    assert group.run(_insert_then(2)) == 2
    group.close()
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT v FROM t")).scalars()) == [1, 2]
    engine.dispose()


def test_writes_queued_during_a_transaction_join_it_and_a_refused_one_is_refused_alone(
        db_url: str) -> None:
    """Writes queued while the writer's transaction is under way are made in it, before its
    one COMMIT (they would otherwise pay a COMMIT of their own). They run without a savepoint:
    when one fails, the whole batch is made again in a new transaction, the late writes each
    in its savepoint, so the refusal goes back to its caller alone and leaves nothing."""
    from sqlalchemy import text

    from exchange.coordinator.group_commit import GroupCommit

    engine = _table_engine(db_url)
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    group = GroupCommit(engine)
    late: list[Future[Any]] = []

    def first(connection: Any) -> int:
        connection.execute(text("INSERT INTO t VALUES (1)"))
        if not late:  # made twice when the batch is made again: queue the others once
            late.extend(group.submit(_insert_then(v, fail=v == 3)) for v in (2, 3, 4))
        return 1

    assert group.run(first) == 1
    assert late[0].result() == 2 and late[2].result() == 4
    with pytest.raises(ValueError, match="write 3 refused"):
        late[1].result()
    assert len(commits) == 1  # all four in the first write's transaction

    # The same without a refusal: no redo, still one COMMIT.
    commits.clear()
    late.clear()

    def second(connection: Any) -> int:
        connection.execute(text("INSERT INTO t VALUES (5)"))
        late.extend(group.submit(_insert_then(v)) for v in (6, 7))
        return 5

    assert group.run(second) == 5
    assert [future.result() for future in late] == [6, 7]
    assert len(commits) == 1
    group.close()
    with engine.connect() as connection:
        assert sorted(connection.execute(text("SELECT v FROM t")).scalars()) == [1, 2, 4, 5, 6, 7]
    engine.dispose()


def test_late_submissions_refused_in_the_redo_leave_the_ledger_level(world: World) -> None:
    """Submissions queued while the writer's transaction is under way join it; when their run
    fails (the last overdraws), the batch is made again in a new transaction: the first and
    the fitting one are acknowledged, the overdrawing one gets its 422 alone, and the served
    balances still equal the auditor's fold of the log."""
    size = world.runtime.audit_log.size()
    coordinator, writes = _submissions(world, "bob", [2_000, 2_500, 1_000])
    batcher = coordinator.journal.batcher
    late: list[Any] = []

    def first(connection: Any) -> Any:
        if not late:  # made twice (the batch is made again): queue the others once
            late.extend(batcher.submit(w, coordinator._submit_many_in) for w in writes[1:])
        return writes[0](connection)

    assert batcher.run(first).token_budget == 2_000
    assert late[0].result().token_budget == 2_500
    refused = late[1].exception()
    assert isinstance(refused, problems.ProblemError) and refused.status == 422
    assert world.runtime.audit_log.size() == size + 4
    assert world.as_("bob", "GET", f"/v1/studies/{writes[2].study_id}").status_code == 404
    assert served_balances(world)["balances"]["org:globex"] == 500
    assert fold(world) == served_balances(world)
