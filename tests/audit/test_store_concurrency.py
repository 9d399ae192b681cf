"""Concurrent appenders on one database: threads, several AuditLog objects, several processes.

Whatever the interleaving, the log must come out contiguous (0..n-1, no gaps, no duplicates),
every acknowledged index must hold exactly the entry it was acknowledged for, and the auditor's
verifier must accept the result.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from audit.checkpoint import verify_checkpoint
from audit.merkle import leaf_hash
from audit.store import AuditLog, audit_checkpoints
from tests.audit.store_support import (
    ORIGIN,
    LogKeys,
    check_log,
    memory_tree,
    migrated_engine,
    note_entry,
    prepare_log,
    read_acks,
    register,
    start_worker,
    stored_leaves,
)


def test_threads_and_several_logs_in_one_process(db_url: str) -> None:
    engine = migrated_engine(db_url)
    keys = LogKeys.generate()
    logs = [keys.open(engine), keys.open(engine, max_batch=7)]
    logs[0].append(register(keys.operator, keys.writer))
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def appender(log: AuditLog, tag: str, count: int, group: int) -> None:
        try:
            for start in range(0, count, group):
                entries = [note_entry(keys.writer, tag, seq)
                           for seq in range(start, min(count, start + group))]
                indexes = log.append_many(entries)
                assert indexes == list(range(indexes[0], indexes[0] + len(entries)))
                with lock:
                    for index, entry in zip(indexes, entries, strict=True):
                        assert index not in acked
                        acked[index] = leaf_hash(entry.leaf_bytes())
        except BaseException as exc:
            errors.append(exc)

    notes: list[str] = []

    def checkpointer() -> None:
        try:
            for _ in range(10):
                notes.append(logs[1].checkpoint())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(logs[t % 2], f"t{t}", 40, 1 + t % 3))
               for t in range(8)]
    threads.append(threading.Thread(target=checkpointer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    assert errors == []
    assert sorted(acked) == list(range(1, 321))
    check_log(engine, keys, acked, 321)
    # Checkpoints signed while appends ran: each commits to the log as it was at its size.
    tree = memory_tree(stored_leaves(engine))
    for note in notes:
        checkpoint = verify_checkpoint(note, keys.log.public_key, ORIGIN, ORIGIN)
        assert checkpoint.root == tree.root(checkpoint.size)
    with engine.connect() as connection:
        sizes = [row.size for row in connection.execute(
            select(audit_checkpoints.c.size).order_by(audit_checkpoints.c.size))]
    assert sizes == sorted(set(sizes)) and sizes
    engine.dispose()


@pytest.mark.slow
def test_several_processes_append_to_one_log(db_url: str, tmp_path: Path) -> None:
    engine, keys, keys_dir, acks = prepare_log(db_url, tmp_path)
    workers = [start_worker(db_url, keys_dir, acks, f"p{n}", 3, 60) for n in range(3)]
    for worker in workers:
        _out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
    acked = read_acks(acks)
    assert sorted(acked) == list(range(1, 181))
    check_log(engine, keys, acked, 181)
    engine.dispose()
