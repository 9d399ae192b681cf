"""The bench's memory measure (tests/bench/memory_map.py): pages a forked child still shares with
its parent are in both processes' RSS but counted once in their union, and a page the child
writes becomes its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.bench.memory_map import breakdown, frames, union_mb

MIB = 1 << 20


def _rss_mb(pid: int) -> float:
    return sum(row["rss"] for row in breakdown(pid).values())


def _forked_union(writes: bool) -> tuple[float, float]:
    """(summed RSS, union) MiB of this process and a forked child, after the child wrote over a
    64 MiB buffer both hold, or not."""
    buffer = bytearray(b"x" * (64 * MIB))  # resident, private anonymous memory of this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            if writes:
                for offset in range(0, len(buffer), 4096):
                    buffer[offset] = 0x79
            os.write(write, b"r")
            signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"r"
        rss_sum = _rss_mb(os.getpid()) + _rss_mb(pid)
        union = union_mb([os.getpid(), pid])
        assert union is not None
        return rss_sum, union
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)


@pytest.mark.skipif(frames(os.getpid()) is None, reason="page frames hidden without CAP_SYS_ADMIN")
def test_shared_pages_count_once_and_written_ones_twice() -> None:
    shared_sum, shared_union = _forked_union(writes=False)
    written_sum, written_union = _forked_union(writes=True)
    # untouched, the child shares the buffer and the interpreter: both in each RSS, once in the union
    assert shared_sum - shared_union > 60
    # written, the child's copy is its own page: in the union too
    assert written_union - shared_union > 56
    assert abs(written_sum - shared_sum) < 16


def test_breakdown_names_the_heap_and_libraries() -> None:
    rows = breakdown(os.getpid())
    assert any(name.startswith("libpython") or name.startswith("python") for name in rows), sorted(rows)
    assert all(row["rss"] >= row["private"] - 1e-6 for row in rows.values())


def test_a_fork_of_the_daemon_is_counted_apart_as_a_daemon_step(tmp_path: Path) -> None:
    """bench_scale's roles: a child with the daemon's own command line (a decision or export
    step, `exchange.node.isolated`) is the daemon_step role, the daemon itself stays daemon."""
    import subprocess
    import sys
    import time

    from tests.bench.bench_scale import tree_usage

    ready = tmp_path / "forked"
    code = (
        "import os, pathlib, time\n"
        f"if os.fork() == 0:\n    pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", code, "node", "run"])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.05)
        usage = tree_usage(daemon.pid)
        assert set(usage) == {"daemon", "daemon_step"}, usage
        assert usage["daemon"]["rss"] > 0 and usage["daemon_step"]["rss"] > 0
    finally:
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGKILL)
        daemon.kill()
        daemon.wait()
