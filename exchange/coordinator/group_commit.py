"""Group commit: concurrent writes share one transaction and one fsync.

SQLite with synchronous=FULL pays one fsync per commit; under concurrent submissions that, not
the work, bounds throughput. Both writers here make every write waiting when they get to it in
one transaction, each in its own savepoint (a refusal rolls back that one alone and goes back to
its caller), then commit once; every caller gets its result only after that commit.

- `GroupCommit`: one long-lived writer thread; for threads (`run`, `submit`) and, on
  PostgreSQL, for the event loop (`submit_async`).
- `LoopGroupCommit`: SQLite callers on an event loop; the statements run on the loop, the lock
  wait and the fsync on a helper thread.

This is also the audit log's one write path: every entry is appended by
`audit.store.AuditLog.append_in` inside one of these writes, and `AuditLog.after_commit` is
part of the after-commit hook (docs/audit-store.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from audit.store.errors import CommitOutcomeUnknownError
from audit.store.log import COMMIT_SKIPPED, COMMITTED, MAY_COMMIT
from exchange.logging import get_logger

log = get_logger("exchange.coordinator.group_commit")

#: How long the writer may wait, on PostgreSQL, for a group as large as its previous one
#: (`GroupCommit(gather_s=)`): there a transaction of one write may end in its first round trip,
#: so late arrivals cannot join it. Off: with few callers and spare CPU, the wait holds every
#: caller back until all are queued, so none prepares its next write while a COMMIT is out
#: (the groups alternate in halves without it, each half preparing while the other commits).
#: Chosen by measurement: docs/benchmarks/audit-append.md.
PG_GATHER_S = 0.0

Write = Callable[[Connection], Any]
# Writes of one kind that can be made in one go: (connection, writes) -> their results, in
# order; raises if any one of them cannot be made (then each is made on its own).
Together = Callable[[Connection, list[Any]], list[Any]]


@dataclass
class _Job:
    write: Write
    # A thread's future, or (with `loop`) an asyncio future of that loop (`submit_async`).
    future: Future[Any] | asyncio.Future[Any]
    together: Together | None = None
    loop: asyncio.AbstractEventLoop | None = None


_Outcome = tuple[_Job, Any, BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    """Give each job its result or error. An asyncio caller's futures are settled on their own
    loop, all of one batch in ONE call_soon_threadsafe (one wake-up of the loop, one write to
    its self-pipe) rather than one per future as `asyncio.wrap_future` does."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        job, result, error = outcome
        if job.loop is not None:
            by_loop.setdefault(job.loop, []).append(outcome)
        elif not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle_on_loop, settled)


def _settle_on_loop(outcomes: list[_Outcome]) -> None:
    for job, result, error in outcomes:
        if job.future.done():  # cancelled: the request went away (the write stands)
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


def _after_commit(hook: Callable[[Connection, object], None], connection: Connection,
                  transaction: object) -> None:
    """Run the after-commit hook; its failure must not turn a durable write into a reported
    failure (the next transaction then reads what the hook would have carried over)."""
    try:
        hook(connection, transaction)
    except Exception as exc:
        log.error("group_commit.after_commit_failed", error=f"{type(exc).__name__}: {exc}")


def _invalidate(connection: Connection) -> None:
    with contextlib.suppress(Exception):
        connection.invalidate()
    with contextlib.suppress(Exception):
        connection.close()


def _settle_here(outcomes: list[_Outcome], loop: asyncio.AbstractEventLoop) -> None:
    """Settle on `loop`, which is running this: its own futures at once, others' (a caller on
    another loop, as a second test client would be) through their loops."""
    _settle_on_loop([o for o in outcomes if o[0].loop is loop])
    _settle([o for o in outcomes if o[0].loop is not loop])


class _Batcher:
    """What both writers share: the queue of pending writes, its cut into batches of at most
    `max_batch`, and the hook run on the connection right after each successful COMMIT (the
    ledger view and the audit log carry the committed state over: Journal.after_commit)."""

    def __init__(self, engine: Engine, max_batch: int = 64,
                 after_commit: Callable[[Connection, object], None] = lambda _c, _t: None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.after_commit = after_commit
        self._pending: list[_Job] = []
        self._closed = False

    def _take(self) -> list[_Job]:
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        return batch


class GroupCommit(_Batcher):
    """Runs write functions in shared transactions, each in a SAVEPOINT, on one writer thread.

    SQLite with synchronous=FULL pays one fsync per commit; under concurrent submissions that,
    not the work, bounds throughput. The writer thread runs every function waiting when it
    gets to them in one transaction, each in its own savepoint (a refusal rolls back that one
    alone and goes back to its caller), takes in the writes queued meanwhile (`_late_arrivals`),
    then commits once; every caller gets its result only after that commit. One long-lived
    thread rather than "the first caller writes": an asyncio
    caller (`submit_async`) then needs no thread of its own while it waits, which keeps the
    number of threads contending for the GIL at two (event loop and writer) instead of one per
    request in flight (measured: docs/benchmarks/api.md). On SQLite, event-loop callers use
    LoopGroupCommit instead (no writer thread at all).

    `gather_s`: how long the writer may wait for a group as large as the previous one before
    it starts a transaction (`_gather`); off by default.

    Writes submitted with the same `together` function and queued next to each other are first
    tried as ONE write (`together(connection, writes)`, in one savepoint): a group of study
    submissions then costs one append (one size and duplicate look-up, one INSERT per table)
    and one study INSERT instead of six statements each. If that raises, for whatever reason,
    its savepoint is rolled back and each write is made on its own, exactly as without it: a
    refusal still goes back to its own caller alone, with its own reason.
    """

    def __init__(self, engine: Engine, max_batch: int = 64,
                 after_commit: Callable[[Connection, object], None] = lambda _c, _t: None,
                 *, gather_s: float = 0.0) -> None:
        super().__init__(engine, max_batch, after_commit)
        self.gather_s = gather_s  # see _gather; 0: start on what is queued at once
        self._last_size = 0  # writes made by the previous transaction
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None  # the writer thread's, kept between batches

    def submit(self, fn: Write, together: Together | None = None) -> Future[Any]:
        """Queue `fn(connection)`; the future gives its result once the shared commit is durable."""
        future: Future[Any] = Future()
        self._queue(_Job(fn, future, together))
        return future

    def _queue(self, job: _Job) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("group commit: closed")
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="coordinator-writer",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def run(self, fn: Write, together: Together | None = None) -> Any:
        return self.submit(fn, together).result()

    def submit_async(self, fn: Write, together: Together | None = None) -> asyncio.Future[Any]:
        """`submit` for a coroutine on the running loop: an asyncio future settled on it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue(_Job(fn, future, together, loop))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the writer thread."""
        with self._wake:
            self._closed = True
            thread = self._thread
            self._wake.notify()
        if thread is not None:
            thread.join()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return  # closed and drained
                self._gather()
                batch = self._take()
            try:
                self._commit(batch)
                self._last_size = len(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                _settle([(job, None, exc) for job in batch])

    def _gather(self) -> None:
        """With `gather_s`: wait (on the condition: woken by each write queued) until as many
        writes are queued as the previous transaction made, `gather_s` has passed, or the
        group commit closes. Called with `_wake` held.

        Why: the callers that the previous COMMIT acknowledged queue their next writes a
        moment later (each prepares its entry first). A transaction that ends in the same
        round trip as it begins (an audit append made with `last=True`: `MAY_COMMIT`) cannot
        take them in later as late arrivals, so without this the writer starts on the first
        one or two, the rest form the next transaction, and the groups settle into halves
        that alternate, each paying a COMMIT and its WAL flush. The wait ends as soon as the
        group is as large as the last one, and after one short wait a smaller group is
        remembered as the size to wait for."""
        target = min(self._last_size, self.max_batch)
        if self.gather_s <= 0 or len(self._pending) >= target:
            return
        deadline = time.monotonic() + self.gather_s
        while len(self._pending) < target and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)

    def _commit(self, batch: list[_Job]) -> None:
        """One transaction for `batch`, on the writer's long-lived connection.

        The connection is kept from batch to batch (a fresh checkout would pre-ping the server:
        a round trip per transaction on PostgreSQL) and discarded after any failure; if the
        server dropped it while it was idle (a restart), the batch is made again on a fresh
        one, as the pre-ping would have done. The transaction's first write runs without a
        savepoint: if it fails, the transaction is rolled back and begun again for the rest
        (`_Restart`), which saves the SAVEPOINT and RELEASE round trips of every batch."""
        reused = self._connection is not None
        try:
            outcomes, connection, transaction = self._transaction(batch)
        except _Disconnected as lost:
            self._discard_connection()
            if not reused:
                _settle([(job, None, lost.error) for job in batch])
                return
            self._commit(batch)  # once more, on a fresh connection (never reused: no loop)
            return
        except Exception as exc:  # the shared commit failed: nobody's change is acknowledged
            self._discard_connection()
            _settle([(job, None, exc) for job in batch])
            return
        except BaseException:
            self._discard_connection()
            raise
        _after_commit(self.after_commit, connection, transaction)  # committed
        _settle(outcomes)

    def _transaction(self, batch: list[_Job]) -> tuple[list[_Outcome], Connection, Any]:
        if self._connection is None:
            # A Core connection, not an ORM Session: the writer's functions use only the
            # connection, and the Session's transaction bookkeeping per savepoint cost about
            # a tenth of a submission's time in the writer.
            self._connection = self.engine.connect()
        connection = self._connection
        try:
            transaction, outcomes = _begin_and_run(connection, batch, may_commit=_one_run(batch))
            try:
                if connection.info.pop(COMMITTED, None) is not transaction:
                    outcomes += self._late_arrivals(connection, batch)
            except _Restart as restart:
                # A late run failed without a savepoint: the transaction is lost. Everything
                # again, in a new one, the careful way (the late writes in savepoints).
                _raise_if_disconnected(connection, restart)
                transaction.rollback()
                transaction, outcomes = _begin_and_run(connection, batch)
        except DBAPIError as exc:
            if exc.connection_invalidated:  # nothing was committed: safe to make again
                raise _Disconnected(exc) from exc
            raise
        transaction.commit()  # sends nothing if a late write's append committed it already
        return outcomes, connection, transaction

    def _late_arrivals(self, connection: Connection, batch: list[_Job]) -> list[_Outcome]:
        """Writes queued while this transaction's statements were out, made in it too, until
        none is waiting or the batch is full; `batch` grows by them (so that whatever happens
        next, a failed COMMIT included, settles them with the rest).

        Why: the COMMIT (a WAL flush, and on PostgreSQL a round trip) is the fixed cost of a
        group. Callers woken by the previous COMMIT queue while the writer waits on the server
        for the first of them; without this they wait for the next transaction, and the
        groups settle into two halves that alternate, each paying its own COMMIT.

        Each arrival's first run is made without a savepoint (a SAVEPOINT and a RELEASE would
        be two more round trips on PostgreSQL): if it fails, `_Restart` is raised and the
        caller makes the whole batch again in a new transaction, the late writes then each in
        a savepoint as usual, so a refusal still goes back to its own caller alone.

        A late run made as ONE write (`_one_run`) is the last thing this transaction may make,
        as far as anyone knows when it starts: it is allowed to end the transaction with its
        own last statement (`MAY_COMMIT`: an audit append then sends its insert and the COMMIT
        as one round trip on PostgreSQL, instead of two). If it did (`COMMITTED`), writes
        queued meanwhile wait for the next transaction. If its COMMIT was sent and the
        connection lost, CommitOutcomeUnknownError goes to every caller of the batch (nothing
        is made again: it may have committed)."""
        outcomes: list[_Outcome] = []
        transaction = connection.get_transaction()
        while len(batch) < self.max_batch:
            with self._wake:
                more = self._pending[:self.max_batch - len(batch)]
                del self._pending[:len(more)]
            if not more:
                break
            batch.extend(more)
            if _one_run(more):
                connection.info[MAY_COMMIT] = transaction
            try:
                outcomes += run_batch(connection, more, first_bare=True)
            finally:
                if not connection.invalidated:  # (its `info` is then out of reach)
                    connection.info.pop(MAY_COMMIT, None)
                    connection.info.pop(COMMIT_SKIPPED, None)  # a _Restart redoes it all
            if connection.info.pop(COMMITTED, None) is transaction:
                break
        return outcomes

    def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            _invalidate(connection)


class _Disconnected(Exception):  # noqa: N818
    """The server dropped the connection before the batch's COMMIT was sent."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _begin_and_run(connection: Connection, batch: list[_Job], *,
                   may_commit: bool = False) -> tuple[Any, list[_Outcome]]:
    """Begin a transaction and make `batch` in it, its first write without a savepoint; if
    that write fails, roll back and make the rest in a new transaction (`_Restart`).

    `may_commit`: `batch` is made as one write (`_one_run`), the last thing the transaction
    makes as far as anyone knows when it starts: that write may end the transaction with its
    own last statement (`MAY_COMMIT`: an audit append made with `last=True` then sends the
    whole transaction, BEGIN to COMMIT, as one round trip on PostgreSQL); if it did
    (`COMMITTED`), the caller makes no late arrivals in it. If the server skipped that COMMIT
    (`COMMIT_SKIPPED`: an insert before it failed, maybe only because the log had grown), the
    batch is made again in a new transaction, the usual way."""
    transaction = connection.begin()
    if may_commit:
        connection.info[MAY_COMMIT] = transaction
    try:
        return transaction, run_batch(connection, batch, first_bare=True)
    except _Restart as restart:
        _raise_if_disconnected(connection, restart)
        skipped = connection.info.pop(COMMIT_SKIPPED, None) is transaction
        transaction.rollback()
        if skipped:
            # Its append failed with the COMMIT it carried, not necessarily for itself (at a
            # size that another process's append made stale, the next-index trigger fails
            # it): the batch again, the usual way, which decides (and refuses) on the real log.
            connection.info.pop(MAY_COMMIT, None)
            return _begin_and_run(connection, batch)
        transaction = connection.begin()
        return transaction, restart.outcomes + run_batch(
            connection, batch[len(restart.outcomes):], first_apart=not restart.outcomes)
    finally:
        if not connection.invalidated:  # (its `info` is then out of reach)
            connection.info.pop(MAY_COMMIT, None)


def _raise_if_disconnected(connection: Connection, restart: _Restart) -> None:
    lost = _disconnect_in(restart.outcomes)
    if lost is not None or connection.invalidated:
        raise _Disconnected(lost or restart) from None


def _disconnect_in(outcomes: list[_Outcome]) -> BaseException | None:
    for _job, _result, error in outcomes:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return error
    return None


class _Restart(Exception):  # noqa: N818 (control flow, not an error)
    """The transaction's first write, made without a savepoint, failed: the transaction must be
    rolled back. `outcomes`: what is settled already (the failed write's error), or nothing if a
    run made as one write failed (its writes are then made one by one)."""

    def __init__(self, outcomes: list[_Outcome]) -> None:
        super().__init__("first write failed")
        self.outcomes = outcomes


def run_batch(connection: Connection, batch: list[_Job], *, first_bare: bool = False,
              first_apart: bool = False) -> list[_Outcome]:
    """Make every write of `batch` in `connection`'s open transaction: runs of one `together`
    as one write if that works, else (and every other write) each in its own savepoint. A
    write's exception is its outcome; the transaction goes on.

    `first_bare`: nothing was written in the transaction yet, so the first run needs no
    savepoint: if it fails, `_Restart` is raised and the caller rolls the transaction back and
    calls again for the rest. `first_apart`: make the first run's writes one by one (its
    attempt as one write just failed)."""
    outcomes: list[_Outcome] = []
    for position, run in enumerate(_runs(batch)):
        if position == 0 and first_bare:
            _bare(connection, run, outcomes)
            continue
        apart = position == 0 and first_apart
        if len(run) > 1 and not apart and _together(connection, run, outcomes):
            continue
        for job in run:
            try:
                with connection.begin_nested():
                    outcomes.append((job, job.write(connection), None))
            except Exception as exc:
                outcomes.append((job, None, exc))
    return outcomes


def _bare(connection: Connection, run: list[_Job], outcomes: list[_Outcome]) -> None:
    """The transaction's first run, without a savepoint: as one write if it has several,
    else its one write; `_Restart` if that fails (the transaction must be rolled back)."""
    if len(run) > 1:
        together = run[0].together
        assert together is not None
        try:
            results = together(connection, [job.write for job in run])
            if len(results) != len(run):
                raise RuntimeError(f"group commit: {len(results)} results for {len(run)} writes")
        except CommitOutcomeUnknownError:  # the transaction may be committed: never redo it
            raise
        except Exception:
            raise _Restart([]) from None
        outcomes.extend((job, result, None) for job, result in zip(run, results, strict=True))
        return
    job = run[0]
    try:
        outcomes.append((job, job.write(connection), None))
    except CommitOutcomeUnknownError:
        raise
    except Exception as exc:
        raise _Restart([(job, None, exc)]) from None


def _together(connection: Connection, run: list[_Job], outcomes: list[_Outcome]) -> bool:
    """Make `run` as one write; False (its savepoint rolled back) if that failed."""
    together = run[0].together
    assert together is not None
    try:
        with connection.begin_nested():
            results = together(connection, [job.write for job in run])
            if len(results) != len(run):
                raise RuntimeError(f"group commit: {len(results)} results for {len(run)} writes")
    except Exception:  # each is then made (and refused) on its own
        return False
    outcomes.extend((job, result, None) for job, result in zip(run, results, strict=True))
    return True


def _one_run(batch: list[_Job]) -> bool:
    """Whether `batch` is made as one write (one job, or one run of a `together`)."""
    return len(batch) == 1 or (batch[0].together is not None
                               and all(job.together == batch[0].together for job in batch))


def _runs(batch: list[_Job]) -> Iterator[list[_Job]]:
    """`batch` cut into runs of neighbours with the same `together` (None: one write per run).
    Bound methods compare equal (not identical) when they are the same method of one object."""
    run: list[_Job] = []
    for job in batch:
        if run and (job.together is None or job.together != run[0].together):
            yield run
            run = []
        run.append(job)
    if run:
        yield run


class LoopGroupCommit(_Batcher):
    """Group commit for SQLite callers on an event loop: a batch's statements run ON the loop;
    only BEGIN IMMEDIATE (which may wait for another writer's lock) and COMMIT (the fsync) run
    on a helper thread, while the loop serves other requests.

    Why: with a Python writer thread (GroupCommit) the loop and the writer take the GIL from
    each other at every SQLite call, socket operation and signature (each releases it): ~6
    context switches per submission, and about a quarter of the process's CPU per submission
    went to those hand-overs (measured against the batch's statements on the loop:
    docs/benchmarks/api.md). SQLite statements are in-process
    CPU work, so running them on the loop blocks it no longer than that work takes; the waits
    (lock, fsync) stay off it. PostgreSQL statements wait on the network: they stay on
    GroupCommit's thread.

    One batch at a time: submissions that arrive while a batch commits form the next one.
    """

    def __init__(self, engine: Engine, max_batch: int = 64,
                 after_commit: Callable[[Connection, object], None] = lambda _c, _t: None) -> None:
        super().__init__(engine, max_batch, after_commit)
        self._draining: asyncio.Task[None] | None = None
        self._connection: Connection | None = None  # used by one batch at a time
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="coordinator-commit")

    def submit_async(self, fn: Write, together: Together | None = None) -> asyncio.Future[Any]:
        """Queue `fn(connection)`; an asyncio future, settled once the shared commit is durable."""
        if self._closed:
            raise RuntimeError("group commit: closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Job(fn, future, together, loop))
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._commit()
        finally:
            self._draining = None

    async def _commit(self) -> None:
        """One transaction for what is pending once it holds the write lock (submissions that
        arrive while BEGIN IMMEDIATE waits join this batch)."""
        loop = asyncio.get_running_loop()
        try:
            if self._connection is None:
                self._connection = await loop.run_in_executor(self._executor, self.engine.connect)
            connection = self._connection
            transaction = await loop.run_in_executor(self._executor, connection.begin)
        except Exception as exc:
            self._discard_connection()
            _settle_here([(job, None, exc) for job in self._take()], loop)
            return
        except BaseException:  # cancelled (the loop is closing): BEGIN may still complete
            self._discard_connection()
            raise
        batch = self._take()
        try:
            outcomes = run_batch(connection, batch)
            await loop.run_in_executor(self._executor, transaction.commit)
        except Exception as exc:  # the shared commit failed: nobody's change is acknowledged
            # A failed COMMIT can leave the driver's transaction open while SQLAlchemy's is
            # already inactive (and then the pool's reset on return is skipped): discard the
            # driver connection (SQLite drops an open transaction with it); the next batch
            # opens a fresh one.
            self._discard_connection()
            _settle_here([(job, None, exc) for job in batch], loop)
            return
        except BaseException:  # cancelled mid-commit: the connection's state is unknown
            self._discard_connection()
            raise
        _after_commit(self.after_commit, connection, transaction)
        _settle_here(outcomes, loop)

    def _discard_connection(self) -> None:
        """Forget the connection; close its driver connection on the helper thread, after
        whatever it is still doing with it (one thread: in order)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(RuntimeError):  # the executor is shut down: process exit
                self._executor.submit(_invalidate, connection)

    def close(self) -> None:
        """Stop taking writes and release the connection (the server has drained requests)."""
        self._closed = True
        self._executor.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
