"""A separate process that appends to an audit log from several threads and records each ack.

Used by the multi-process and crash (kill -9) tests:

    python -m tests.audit.crash_worker --db URL --keys DIR --acks DIR --tag T --threads 4 --count 1000

Each thread appends its share of `count` entries one at a time, the coordinator's way (append_in
in a write of its group commit: tests/audit/store_support.GroupLog); after each acknowledgement it
writes "<index> <leaf hash hex>\\n" to its own file in --acks and fsyncs it, so every line in
those files is an append the log acknowledged before the process died. Prints "started" once
the log is open.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from audit.merkle import leaf_hash
from exchange.db.engine import make_engine
from tests.audit.store_support import GroupLog, LogKeys, note_entry


def _appender(log: GroupLog, keys: LogKeys, tag: str, thread: int, seqs: range,
              ack_path: Path, errors: list[BaseException]) -> None:
    try:
        fd = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for seq in seqs:
                entry = note_entry(keys.writer, f"{tag}-{thread}", seq)
                index = log.append(entry)
                os.write(fd, f"{index} {leaf_hash(entry.leaf_bytes()).hex()}\n".encode())
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        errors.append(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--acks", type=Path, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)

    keys = LogKeys.load(args.keys)
    engine = make_engine(args.db)
    log = keys.open(engine)
    print("started", flush=True)
    errors: list[BaseException] = []
    per_thread = -(-args.count // args.threads)
    threads = []
    for t in range(args.threads):
        seqs = range(t * per_thread, min(args.count, (t + 1) * per_thread))
        threads.append(threading.Thread(
            target=_appender,
            args=(log, keys, args.tag, t, seqs, args.acks / f"{args.tag}-{t}.acks", errors)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    engine.dispose()
    for error in errors:
        print(f"appender failed: {error!r}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
