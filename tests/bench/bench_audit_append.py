"""Durable append throughput of the audit store vs Ed25519 signing plus group fsync of the same bytes.

    .venv/bin/python -m tests.bench.bench_audit_append              # SQLite, 10,000 entries
    .venv/bin/python -m tests.bench.bench_audit_append --quick      # SQLite, 2,000 entries
    .venv/bin/python -m tests.bench.bench_audit_append --postgres   # PostgreSQL at 127.0.0.1:5432
    .venv/bin/python -m tests.bench.bench_audit_append --postgres --journal   # the Journal's path

Workload, the same for both sides: `--threads` appenders each sign `--entries / threads`
realistic entries (audit.entry.sign_entry: RFC 8785 encoding + Ed25519) and append them one at
a time, each waiting for its acknowledgement before the next.

- store: the coordinator's way of appending (tests/audit/store_support.GroupLog): each append is
  a write of the coordinator's group commit (exchange/coordinator/group_commit.py: every write
  waiting shares one transaction and one fsync, each in its own savepoint; neighbours made as
  one `AuditLog.append_in` when they can be), on a write engine made like the coordinator's
  (SQLite: BEGIN IMMEDIATE, WAL checkpoints on a thread of their own; PostgreSQL: READ
  COMMITTED), with `AuditLog.after_commit` as the commit hook. append_in does the form checks,
  signature verification, signer registered and active, no replay, leaf + tree nodes inserted;
  SQLite WAL with synchronous=FULL, PostgreSQL synchronous_commit=on;
- store with `--journal`: the coordinator's own path instead, `Journal.append(...,
  last=True)` in a write of the Journal's group commit (the ledger fold as the append's
  check, the Journal's writer and commit hook; the coordinator's full schema), entries
  prepared in the caller's thread and neighbours appended together, as study submissions are
  (without their study rows);
- baseline: the least a durable signed log must do: sign, encode the leaf bytes, hand them to a
  writer thread that appends every waiting record to a plain file and fsyncs once per group
  (the same group-commit structure), then acknowledge.

Target: store >= 50 % of the baseline. The SQLite database and the baseline file live in one
temporary folder (same disk).

The store skips verifying exactly the signatures a Signer of its own process just made
(audit.signing._SignatureMemo: valid by construction), which is the coordinator's case: it
signs most entries itself. Also printed, with its own ratio: the same workload with entries
signed "in another process" (the raw PyNaCl key, outside any Signer), each one verified by the
store, which is the case of a hospital's receipt.
"""

from __future__ import annotations

import argparse
import inspect
import os
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.entry import Entry, sign_entry
from audit.signing import Signer, canonical
from tests.audit.store_support import LogKeys, migrated_engine, register

PG_ADMIN_DSN = os.environ.get("EXCHANGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _payload(tag: str, seq: int) -> dict[str, object]:
    return {"study_id": f"study-{tag}", "round": seq, "hospital": "hospital:st-mary",
            "records_used": 1200 + seq % 50, "epsilon_spent_micro": 125000,
            "commitment": f"{seq:064x}"}


@dataclass(frozen=True)
class OtherProcessSigner(Signer):
    """Signs like a Signer of another process would: this process's memo never sees it."""

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature


class GroupFsyncFile:
    """The baseline: a writer thread that appends waiting records to a file, fsyncs per group."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._queue: queue.SimpleQueue[tuple[bytes, Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.groups = 0

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                group.append(more)
            os.write(self._fd, b"".join(record + b"\n" for record, _ in group))
            os.fsync(self._fd)
            self.groups += 1
            for _, future in group:
                future.set_result(None)

    def append(self, record: bytes) -> None:
        future: Future[None] = Future()
        self._queue.put((record, future))
        future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)


def _run_threads(threads: int, total: int, work: Callable[[int, int], object]) -> float:
    """Run work(thread, seq) for `total` items over `threads` threads; return the seconds taken."""
    per = -(-total // threads)
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(t: int) -> None:
        barrier.wait()
        try:
            for seq in range(t * per, min(total, (t + 1) * per)):
                work(t, seq)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


@contextmanager
def _database(postgres: bool, folder: Path) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{folder / 'audit.db'}"
        return
    import psycopg

    name = f"bench_audit_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class JournalLog:
    """Appends the coordinator's way: `Journal.append` (ledger fold included) in a write of the
    Journal's group commit, made last in its write (`last=True`, where the tree has it), the
    entries prepared in the caller's thread and neighbours appended as one, as
    `StudyLifecycle.submit_study` does (without the study row)."""

    def __init__(self, url: str, keys: LogKeys) -> None:
        from audit.store import AuditLog
        from exchange.coordinator.app import _read_engine, _write_engine
        from exchange.coordinator.journal import Journal
        from exchange.db import migrate

        migrate.upgrade(url, "coordinator")
        self.read_engine, self.write_engine = _read_engine(url), _write_engine(url)
        self.audit_log = AuditLog(self.read_engine, keys.log, "exchange.bench/journal",
                                  keys.operator.public_key)
        self.journal = Journal(self.read_engine, self.write_engine, self.audit_log,
                               operator=keys.operator, coordinator=keys.writer)
        self.journal.bootstrap()  # registers the writer key (the coordinator key)
        # `last` where this tree's Journal has it (the bench file also runs on older trees)
        has_last = "last" in inspect.signature(Journal.append).parameters
        self._last: dict[str, Any] = {"last": True} if has_last else {}

    def size(self) -> int:
        return self.audit_log.size()

    def _together(self, connection: Any, writes: list[Any]) -> list[list[int]]:
        entries = [e for write in writes for e in write.entries]
        indexes = self.journal.append(connection, *entries,
                                      prepared=[p for write in writes for p in write.prepared],
                                      **self._last)
        out, position = [], 0
        for write in writes:
            out.append(indexes[position:position + len(write.entries)])
            position += len(write.entries)
        return out

    def append(self, entry: Entry) -> int:
        prepared = tuple(self.audit_log.prepare([entry]))
        write = _JournalWrite(self, (entry,), prepared)
        indexes: list[int] = self.journal.batcher.run(write, self._together)
        return indexes[0]

    def __enter__(self) -> JournalLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.journal.close()
        self.audit_log.close()
        self.read_engine.dispose()
        self.write_engine.dispose()


@dataclass(frozen=True)
class _JournalWrite:
    log: JournalLog
    entries: tuple[Entry, ...]
    prepared: tuple[Any, ...]

    def __call__(self, connection: Any) -> list[int]:
        indexes: list[int] = self.log.journal.append(connection, *self.entries,
                                                     prepared=self.prepared, **self.log._last)
        return indexes


def run_once(url: str, folder: Path, keys: LogKeys, total: int, threads: int,
             run: int, journal: bool = False,
             gather_s: float | None = None) -> tuple[float, float, float, int]:
    """(store s, baseline s, store verifying every signature s, baseline fsync groups)."""
    # keys.open: reads on `engine`, appends through the coordinator's group commit (GroupLog);
    # with `journal`, through the coordinator's Journal (JournalLog).
    engine = migrated_engine(url)
    elsewhere = OtherProcessSigner(keys.writer.signing_key)
    with (JournalLog(url, keys) if journal else keys.open(engine)) as log:
        if gather_s is not None:  # the writer's gather wait (GroupCommit(gather_s=)), to tune it
            (log.journal.batcher if isinstance(log, JournalLog) else log.group).gather_s = gather_s
        if log.size() == 0:
            log.append(register(keys.operator, keys.writer))
        store_s = _run_threads(threads, total, lambda t, seq: log.append(
            sign_entry(keys.writer, "study.round", _payload(f"{run}-s{t}", seq))))
        verified_s = _run_threads(threads, total, lambda t, seq: log.append(
            sign_entry(elsewhere, "study.round", _payload(f"{run}-v{t}", seq))))
    engine.dispose()

    baseline = GroupFsyncFile(folder / f"baseline-{run}.log")

    def baseline_append(t: int, seq: int) -> None:
        entry: Entry = sign_entry(keys.writer, "study.round", _payload(f"{run}-b{t}", seq))
        baseline.append(canonical(entry.to_json()))

    baseline_s = _run_threads(threads, total, baseline_append)
    baseline.close()
    return store_s, baseline_s, verified_s, baseline.groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 entries (default 10,000)")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the SQLite file and the baseline file (default: the "
                             "system temp folder); /dev/shm shows the CPU-bound case")
    parser.add_argument("--journal", action="store_true",
                        help="the store appends through the coordinator's Journal (its full "
                             "schema, the ledger fold, its group commit) instead of GroupLog")
    parser.add_argument("--gather-ms", type=float, default=None,
                        help="the store's writer waits up to this long for a group as large as "
                             "its last one (default: the code's own, PG_GATHER_S on PostgreSQL)")
    parser.add_argument("--postgres", action="store_true",
                        help=f"PostgreSQL (a temporary database via {PG_ADMIN_DSN})")
    args = parser.parse_args(argv)
    total = args.entries or (2_000 if args.quick else 10_000)
    keys = LogKeys.generate()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=args.dir) as tmp, \
            _database(args.postgres, Path(tmp)) as url:
        for run in range(args.repeat):
            results.append(run_once(url, Path(tmp), keys, total, args.threads, run,
                                    journal=args.journal,
                                    gather_s=None if args.gather_ms is None
                                    else args.gather_ms / 1000))
    store_s = statistics.median(r[0] for r in results)
    baseline_s = statistics.median(r[1] for r in results)
    verified_s = statistics.median(r[2] for r in results)
    groups = statistics.median(r[3] for r in results)
    backend = "PostgreSQL" if args.postgres else "SQLite (WAL, synchronous=FULL)"
    if args.journal:
        backend += ", through the coordinator's Journal"
    print(f"audit append: {total} entries, {args.threads} appender threads, {backend}, "
          f"median of {args.repeat}")
    print(f"  store (sign + append, durable): {store_s:.3f} s  {total / store_s:,.0f} entries/s  "
          f"({store_s / total * 1e6:.0f} us/entry)")
    print(f"  baseline (sign + group fsync):  {baseline_s:.3f} s  {total / baseline_s:,.0f} "
          f"entries/s  ({baseline_s / total * 1e6:.0f} us/entry, {groups:.0f} fsync groups)")
    print(f"  store, signed in another process (every signature verified): {verified_s:.3f} s  "
          f"{total / verified_s:,.0f} entries/s")
    ratio = baseline_s / store_s
    print(f"  ratio store / baseline throughput: {ratio:.2f} (target >= 0.50: "
          f"{'met' if ratio >= 0.5 else 'NOT met'})")
    print(f"  ratio, signed in another process: {baseline_s / verified_s:.2f}")


if __name__ == "__main__":
    main()
