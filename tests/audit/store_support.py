"""Shared helpers for the audit store tests, the crash worker and the benchmark.

A test log needs: the pinned operator key (root of the keyring), the log key (signs
checkpoints), and a writer key registered by the operator in the log itself.

Appends go the one way the coordinator makes them (`GroupLog`): `AuditLog.append_in` inside a
write of the coordinator's group commit (`exchange.coordinator.group_commit.GroupCommit`: one
transaction and one fsync for every write waiting, each write in its own savepoint), on a write
engine like the coordinator's, with `AuditLog.after_commit` as the commit hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from audit import merkle
from audit.entry import Entry, sign_entry
from audit.export import Trust
from audit.merkle import leaf_hash
from audit.signing import Signer
from audit.store import AuditLog, audit_entries, verify_storage
from audit.store.admission import Prepared
from audit.verify import VerifyReport, verify_lines
from exchange.coordinator.group_commit import PG_GATHER_S, GroupCommit
from exchange.db.checkpoint import WalCheckpointer, writers_leave_checkpoints_to_a_thread
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade

ORIGIN = "exchange.test/audit-log"
REPO_ROOT = Path(__file__).resolve().parents[2]


def migrated_engine(url: str) -> Engine:
    """An engine on `url` after the audit migration (and only it: later ones are not ours)."""
    upgrade(url, "coordinator", "0001_audit_log")
    return make_engine(url)


def immediate_engine(url: str, **kwargs: Any) -> Engine:
    """An engine whose transactions hold the write lock from the start, as append_in needs on
    SQLite (BEGIN IMMEDIATE, per SQLAlchemy's pysqlite recipe); READ COMMITTED on PostgreSQL
    (each statement after append_in's advisory lock sees what committed before it). The
    coordinator's write engine is made the same way (exchange.coordinator.app)."""
    engine = make_engine(url, **kwargs)
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="READ COMMITTED")
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: object, _record: object) -> None:
            dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

        @event.listens_for(engine, "begin")
        def _begin(connection: object) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # type: ignore[attr-defined]

    return engine


def register(operator: Signer, signer: Signer, role: str = "coordinator",
             owner: str = "coordinator:test") -> Entry:
    return sign_entry(operator, "key.register", {"key_id": signer.key_id,
                                                 "public_key": signer.public_key_b64,
                                                 "role": role, "owner": owner})


def note_entry(signer: Signer, tag: str, seq: int) -> Entry:
    """A realistic non-token entry, unique per (tag, seq)."""
    digest = hashlib.sha256(f"{tag}/{seq}".encode()).hexdigest()
    return sign_entry(signer, "study.round", {"study_id": f"study-{tag}", "round": seq,
                                              "model_sha256": digest, "participants": 3})


@dataclass
class LogKeys:
    operator: Signer
    log: Signer
    writer: Signer

    @classmethod
    def generate(cls) -> LogKeys:
        return cls(Signer.generate(), Signer.generate(), Signer.generate())

    def trust(self) -> Trust:
        return Trust(ORIGIN, self.operator.public_key, self.log.public_key)

    def open(self, engine: Engine, *, max_batch: int = 64) -> GroupLog:
        """The log on `engine` (reads) with appends through the coordinator's group commit."""
        return GroupLog(AuditLog(engine, self.log, ORIGIN, self.operator.public_key),
                        max_batch=max_batch)

    def save(self, folder: Path) -> None:
        for name in ("operator", "log", "writer"):
            getattr(self, name).save(folder / f"{name}.key")

    @classmethod
    def load(cls, folder: Path) -> LogKeys:
        return cls(*(Signer.load(folder / f"{name}.key") for name in ("operator", "log", "writer")))


@dataclass(frozen=True)
class _Append:
    """One group-commit write: append `entries` in the writer's transaction; their indexes.
    It makes nothing after the append (`last=True`): made as its transaction's only run, or
    late, it may end the transaction in the append's own round trip (on PostgreSQL, the
    whole transaction in one string: docs/audit-store.md, "Round trips")."""

    log: AuditLog
    entries: tuple[Entry | Mapping[str, Any] | Prepared, ...]

    def __call__(self, connection: Connection) -> list[int]:
        return self.log.append_in(connection, self.entries, last=True)


def _append_together(connection: Connection, writes: list[_Append]) -> list[list[int]]:
    """Neighbouring appends as ONE append_in (the coordinator's `together` for submissions):
    if any entry is refused, the group commit makes each append on its own instead. Nothing
    is made after the append (`last=True`, as `_Append`)."""
    indexes = writes[0].log.append_in(connection, [e for w in writes for e in w.entries],
                                      last=True)
    out, position = [], 0
    for write in writes:
        out.append(indexes[position:position + len(write.entries)])
        position += len(write.entries)
    return out


class GroupLog:
    """An AuditLog whose appends go through the coordinator's group commit.

    Reads, proofs and checkpoints are the AuditLog's (attributes are passed through); `append`,
    `append_many`, `submit` and `append_async` queue an `append_in` write on a GroupCommit over
    a write engine of the log's database, and return once the shared transaction committed.
    """

    def __init__(self, log: AuditLog, *, max_batch: int = 64) -> None:
        self.log = log
        self.write_engine = immediate_engine(log.engine.url.render_as_string(hide_password=False))
        self.checkpointer: WalCheckpointer | None = None
        if self.write_engine.dialect.name == "sqlite":  # as the coordinator: WAL checkpoints
            writers_leave_checkpoints_to_a_thread(self.write_engine)  # off the commit path
            self.checkpointer = WalCheckpointer(self.write_engine)
        # Only PostgreSQL's transactions end in their first round trip (no late arrivals).
        gather_s = PG_GATHER_S if self.write_engine.dialect.name == "postgresql" else 0.0
        self.group = GroupCommit(self.write_engine, max_batch=max_batch,
                                 after_commit=log.after_commit, gather_s=gather_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    def __enter__(self) -> GroupLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the queued appends, then stop the writer thread and its engine."""
        self.group.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.write_engine.dispose()
        self.log.close()

    def submit(self, entries: Sequence[Entry | Mapping[str, Any]]) -> Future[list[int]]:
        """Queue the append; the entries are prepared (form, signature) here, in the caller's
        thread, as the coordinator prepares a submission before queueing it."""
        return self.group.submit(_Append(self.log, tuple(self.log.prepare(entries))),
                                 _append_together)

    def append(self, entry: Entry | Mapping[str, Any]) -> int:
        return self.submit([entry]).result()[0]

    def append_many(self, entries: Sequence[Entry | Mapping[str, Any]]) -> list[int]:
        return self.submit(entries).result()

    async def append_async(self, entry: Entry | Mapping[str, Any]) -> int:
        future = self.group.submit_async(_Append(self.log, tuple(self.log.prepare([entry]))),
                                         _append_together)
        indexes: list[int] = await future
        return indexes[0]


@contextlib.contextmanager
def libpq_trace(log: GroupLog | GroupCommit, path: Path) -> Iterator[None]:
    """libpq's own trace, into `path`, of what the group commit's writer connection (a
    GroupLog's, or the coordinator Journal's `batcher`) sends and the server answers while the
    block runs (no timestamps: one message per line, `F` from the client, `B` from the
    backend). PostgreSQL only; the writer's connection must be open."""
    import psycopg

    group = log.group if isinstance(log, GroupLog) else log
    assert group._connection is not None, "the writer's connection is not open yet"
    driver = group._connection.connection.driver_connection
    with path.open("w") as trace:
        driver.pgconn.trace(trace.fileno())
        driver.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield
        finally:
            driver.pgconn.untrace()


def stored_leaves(engine: Engine) -> list[bytes]:
    """Every stored leaf, in index order, checking the indexes are 0, 1, 2, ... (no gaps)."""
    from sqlalchemy import select

    with engine.connect() as connection:
        rows = connection.execute(select(audit_entries.c.idx, audit_entries.c.leaf)
                                  .order_by(audit_entries.c.idx)).all()
    assert [row.idx for row in rows] == list(range(len(rows))), "indexes are not contiguous"
    return [bytes(row.leaf) for row in rows]


def memory_tree(leaves: Iterable[bytes]) -> merkle.MemoryTree:
    return merkle.MemoryTree(merkle.leaf_hash(leaf) for leaf in leaves)


def verify_with_auditor(log: AuditLog, keys: LogKeys) -> VerifyReport:
    """Run the auditor's verifier (audit.verify) over the stored log and a fresh checkpoint."""
    note = log.checkpoint()
    leaves = stored_leaves(log.engine)
    return verify_lines((leaf + b"\n" for leaf in leaves), note, keys.trust())


def check_log(engine: Engine, keys: LogKeys, acked: dict[int, bytes], expected_size: int) -> None:
    """The log is contiguous, of the expected size, holds every acked entry, and verifies."""
    leaves = stored_leaves(engine)  # asserts 0..n-1
    assert len(leaves) == expected_size
    for index, hash_ in acked.items():
        assert leaf_hash(leaves[index]) == hash_, f"entry {index} is not the acknowledged one"
    with keys.open(engine) as log:
        assert log.root() == memory_tree(leaves).root()
        report = verify_with_auditor(log, keys)
        assert report.ok, report.problem
    assert verify_storage(engine, keys.operator.public_key) == memory_tree(leaves).root()


def read_acks(folder: Path) -> dict[int, bytes]:
    """Every fully written ack line: {index: leaf hash}."""
    acked: dict[int, bytes] = {}
    for path in folder.glob("*.acks"):
        data = path.read_bytes()
        for line in data.split(b"\n")[:-1]:  # a last line without newline was not recorded
            index, hash_hex = line.split()
            assert int(index) not in acked, f"index {int(index)} acknowledged twice"
            acked[int(index)] = bytes.fromhex(hash_hex.decode())
    return acked


def start_worker(db_url: str, keys_dir: Path, acks: Path, tag: str, threads: int,
            count: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.audit.crash_worker", "--db", db_url, "--keys", str(keys_dir),
         "--acks", str(acks), "--tag", tag, "--threads", str(threads), "--count", str(count)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def prepare_log(db_url: str, folder: Path) -> tuple[Engine, LogKeys, Path, Path]:
    """A migrated log with the writer key registered; keys saved for the worker processes."""
    engine = migrated_engine(db_url)
    keys = LogKeys.generate()
    keys_dir = folder / "keys"
    keys.save(keys_dir)
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
    acks = folder / "acks"
    acks.mkdir()
    return engine, keys, keys_dir, acks
