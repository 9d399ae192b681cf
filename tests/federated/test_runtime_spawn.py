"""Children started by `federated.runtime.deployment._spawn` live as long as the process that
started them, whichever thread called `_spawn` (PR_SET_PDEATHSIG follows the forking thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

# The parent: spawns `sleep` from a thread that ends at once, reports the child's pid, then waits.
PARENT = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from federated.runtime.deployment import _spawn

    out = {}
    def start():
        out["proc"] = _spawn("sleeper", ["sleep", "120"], Path(sys.argv[1]), {"PATH": "/usr/bin:/bin"})
    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    time.sleep(1.0)  # the thread that called _spawn is gone by now
    print(out["proc"].pid, flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger if pid 1 does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_child_spawned_from_short_lived_thread_outlives_it_and_dies_with_the_process(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "sleeper.log")],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    child = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent printed {line!r}, exit {parent.poll()}"
        child = int(line)
        time.sleep(0.5)
        assert _running(child), "the child died with the thread that spawned it"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the child outlived its parent process"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and _running(child):
            os.kill(child, signal.SIGKILL)
