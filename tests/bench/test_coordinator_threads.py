"""`bench_scale`'s coordinator CPU split by thread: the ServerApp, the API, the coordinator's
background threads, the demo's driver and the bench's own samplers each in their group."""

from __future__ import annotations

import threading
import time

from tests.bench.coordinator_threads import (
    BENCH,
    OTHER,
    PARTS,
    UNSEEN,
    ThreadCpuSampler,
    group_of,
    threads_in_window,
)


def test_each_thread_of_the_bench_process_falls_in_its_group() -> None:
    assert group_of("study-5f3a") == "serverapp"
    assert group_of("ThreadPoolExecutor-3_1") == "serverapp"
    assert group_of("coordinator") == "api_loop"
    assert group_of("coordinator-writer") == "coordinator_background"  # not the API's loop
    assert group_of("coordinator-commit_0") == "coordinator_background"
    assert group_of("AnyIO worker thread") == "api_workers"
    assert group_of("asyncio_2") == group_of("uvloop_3") == "api_workers"
    assert group_of("checkpointing") == "coordinator_background"
    assert group_of("MainThread") == "driver"
    assert group_of("bench-memory", {"bench-memory"}) == BENCH
    assert group_of("Thread-7 (_run)") == OTHER
    assert group_of("studyish") == OTHER  # a prefix only where the name says so


def test_a_thread_s_cpu_stays_in_its_group_after_it_ends() -> None:
    """A finished worker thread keeps the CPU it was last seen with (no drop, no double count in
    `unseen`), and a thread never sampled shows up as `unseen`."""
    sampler = ThreadCpuSampler()

    busy, done = threading.Event(), threading.Event()

    def spin(seconds: float, until: threading.Event | None = None) -> None:
        """Spin `seconds` of CPU, then on until `until` is set (the sample below must see this
        thread alive, however long the other threads of the test process keep the GIL)."""
        start = time.thread_time()
        while time.thread_time() < start + seconds or (until is not None and not until.is_set()):
            if time.thread_time() > start + 0.15:
                busy.set()

    worker = threading.Thread(target=spin, args=(0.3, done), name="study-test")
    before = sampler.sample()
    worker.start()
    assert busy.wait(10)
    sampler.sample()  # sees the worker while it runs, 0.15 s of CPU in
    done.set()
    worker.join()
    after = sampler.sample()
    assert set(after) == set(PARTS)
    gained = after["serverapp"] - before["serverapp"]
    assert gained >= 0.1, gained  # at least what it had spent when it was seen
    unseen = threading.Thread(target=spin, args=(0.3,), name="study-unseen")
    unseen.start()
    unseen.join()
    last = sampler.sample()
    assert last["serverapp"] == after["serverapp"]
    assert last[UNSEEN] - after[UNSEEN] >= 0.2


def test_a_window_takes_its_share_of_each_interval() -> None:
    zero = dict.fromkeys(PARTS, 0.0)
    samples = [(0.0, zero), (2.0, {**zero, "serverapp": 2.0, "driver": 1.0}),
               (4.0, {**zero, "serverapp": 3.0, "driver": 0.5})]  # a fall counts as nothing
    window = threads_in_window(samples, 1.0, 4.0)
    assert window["serverapp"] == 2.0 and window["driver"] == 0.5 and window["api_loop"] == 0.0
