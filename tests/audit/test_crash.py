"""Crash: kill -9 a process in the middle of 1,000 concurrent appends; nothing acknowledged is lost.

The worker (tests/audit/crash_worker.py) appends from 4 threads and, after each acknowledgement,
records "<index> <leaf hash>" in a file it fsyncs. We SIGKILL it at a random point while it is
still appending, then "restart": open the log again, check every recorded acknowledgement is
in the database at its index with its exact bytes, that the log is contiguous and verifies
(store check and the auditor's verifier), and that a new process can go on appending.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.audit.store_support import check_log, prepare_log, read_acks, start_worker, stored_leaves

TOTAL = 1000


def _wait_for_the_dead_workers_sessions(engine: Engine) -> None:
    """PostgreSQL: until no other session of the database is inside a statement or a
    transaction (the killed worker's server sessions finish what they were sent, then see the
    closed connection); up to 30 s."""
    if engine.dialect.name != "postgresql":
        return
    busy = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle'")
    deadline = time.monotonic() + 30
    with engine.connect() as connection:
        while connection.execute(busy).scalar_one():
            assert time.monotonic() < deadline, "the killed worker's sessions did not end"
            connection.rollback()
            time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_during_concurrent_appends_loses_no_acknowledged_entry(db_url: str,
                                                                      tmp_path: Path) -> None:
    engine, keys, keys_dir, acks = prepare_log(db_url, tmp_path)
    worker = start_worker(db_url, keys_dir, acks, "crash", 4, TOTAL)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == b"started"
    kill_after = random.Random().randint(100, 600)
    deadline = time.monotonic() + 60
    while len(read_acks(acks)) < kill_after:
        assert worker.poll() is None, worker.stderr.read().decode() if worker.stderr else ""
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.002)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    acked = read_acks(acks)
    assert kill_after <= len(acked) < TOTAL, \
        f"the kill (after {kill_after} acks) did not land during the appends"

    # Restart: every acknowledged entry is there, at its index, and the log verifies. Entries
    # committed but not yet acknowledged when the process died may be there too: on
    # PostgreSQL a transaction the worker had sent whole (BEGIN to COMMIT in one string) runs
    # to its end on the server after the kill, so its sessions must be over before the count.
    _wait_for_the_dead_workers_sessions(engine)
    size = len(stored_leaves(engine))
    assert size >= 1 + len(acked), f"killed after {len(acked)} acks, only {size - 1} stored"
    check_log(engine, keys, acked, size)

    # And the log keeps working: a new process appends after the crash.
    again = start_worker(db_url, keys_dir, acks, "after", 2, 20)
    _out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()
    acked_after = read_acks(acks)
    assert set(acked) < set(acked_after)
    check_log(engine, keys, acked_after, size + 20)
    engine.dispose()
