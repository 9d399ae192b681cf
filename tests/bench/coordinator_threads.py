"""Where the bench process's CPU goes, thread by thread (`bench_scale`'s "coordinator" part).

`bench_scale` runs the coordinator in its own process: the coordinator's API (uvicorn's event
loop and the worker threads its blocking handlers run in), the log's writer and checkpointing,
the in-process ServerApp (the study's thread and flwr's object-transfer workers), and also the
demo's driver (`Consortium.follow_training` on the main thread: the researcher's progress polls
and each hospital's privacy ledger read from its node database, every 0.5 s) and the bench's
own samplers. Its "coordinator" CPU is this process's CPU less the samplers' threads; this
module splits it by thread so that a round's coordinator CPU says which of these spent it.

A thread's CPU is read from /proc/self/task/TID/stat and kept per thread (a thread that ends
keeps what it was last seen with), so a group's CPU never falls when a thread ends; what the
process spent in threads never seen by a sample (short-lived ones) is `unseen`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

#: the groups, in the order `group_of` tries them: (group, thread names; one ending in "-" or "_"
#: is a prefix: "study-" is every study's thread, "coordinator" only the API's own)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the study's ServerApp thread (exchange.study.runners) and flwr's object push/pull workers
    ("serverapp", ("study-", "ThreadPoolExecutor-", "federated-warm-up", "prepare-")),
    # the API's event loop (async handlers, the SQLite group commit of request nonces)
    ("api_loop", ("coordinator",)),
    # the API's blocking handlers (Litestar `sync_to_thread`, on the loop's default executor:
    # uvloop_N; AnyIO's workers): signature checks, SQL reads
    ("api_workers", ("AnyIO worker thread", "asyncio_", "uvloop_")),
    # the log's writer, checkpoints, sweeps: background work of the coordinator
    ("coordinator_background", ("coordinator-writer", "coordinator-commit_", "checkpointing",
                                "deadline-sweep", "sqlite-checkpointer")),
    # the demo's driver: `Consortium.run` on the main thread (follow_training's polls)
    ("driver", ("MainThread",)),
)
#: the bench's own sampling threads (`bench_scale` leaves them out of the coordinator's CPU)
BENCH = "bench"
OTHER = "other"
UNSEEN = "unseen"
PARTS = (*(name for name, _ in GROUPS), BENCH, OTHER, UNSEEN)


def group_of(name: str, bench_names: Iterable[str] = ()) -> str:
    """The group of a thread of this process, from its Python name (`GROUPS`); `BENCH` for the
    bench's own samplers, `OTHER` for any thread no group names."""
    if name in set(bench_names):
        return BENCH
    for group, names in GROUPS:
        if any(name == n or (n.endswith(("-", "_")) and name.startswith(n)) for n in names):
            return group
    return OTHER


def _task_cpu_s(tid: int) -> float | None:
    """User + system CPU seconds of one thread of this process; None once it has ended."""
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s() -> float:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ThreadSample = tuple[float, dict[str, float]]


class ThreadCpuSampler:
    """Samples, twice a second, the CPU seconds of this process by thread group (`PARTS`):
    cumulative, each thread's last seen CPU counted in the group of its name."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[ThreadSample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-thread-cpu", daemon=True)
        self.bench_names: set[str] = {self.thread.name}
        self._last: dict[int, tuple[str, float]] = {}  # native id -> (group, CPU s last seen)

    def sample(self) -> dict[str, float]:
        """One cumulative sample (and remember each live thread's CPU)."""
        for t in threading.enumerate():
            tid = t.native_id
            if tid is None:
                continue
            cpu = _task_cpu_s(tid)
            if cpu is not None:
                self._last[tid] = (group_of(t.name, self.bench_names), cpu)
        out = dict.fromkeys(PARTS, 0.0)
        for group, cpu in self._last.values():
            out[group] += cpu
        out[UNSEEN] = max(0.0, _process_cpu_s() - sum(out.values()))
        return out

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self.sample()))
            if self.stop.wait(self.interval_s):
                return


def threads_in_window(samples: list[ThreadSample], start: float, end: float) -> dict[str, float]:
    """CPU seconds of each group between `start` and `end` (`time.time()`): each interval between
    two samples adds its (never negative) increase in the share of it inside the window."""
    out = dict.fromkeys(PARTS, 0.0)
    for (t0, cpu0), (t1, cpu1) in itertools.pairwise(samples):
        overlap = min(t1, end) - max(t0, start)
        if overlap <= 0 or t1 <= t0:
            continue
        for part in PARTS:
            out[part] += max(0.0, cpu1.get(part, 0.0) - cpu0.get(part, 0.0)) * overlap / (t1 - t0)
    return {part: round(value, 3) for part, value in out.items()}
