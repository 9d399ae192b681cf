"""Opt-in pytest plugin: each test's wall time AND its CPU time, to find the slow tests on a
shared, loaded machine (`python -m pytest -p tests.cpu_timing`: `-m` puts the repository on the
import path; docs/testing.md).

Wall time under load says little: at a load of 40 on 2 cores a test that needs 1 s of CPU takes
20-40 s. CPU time (this process's, threads included, plus its reaped child processes', e.g. the
`exchange` commands a test runs) hardly depends on the load, and on a quiet machine a test's
wall time is about its CPU time plus what it sleeps or waits for. Grandchildren that are never
reaped (a SuperNode a daemon killed) are not counted, so a multi-process test reads low.

One JSON line per test goes to $CPU_TIMING_OUT (default ./cpu-timing.jsonl): node id, wall,
self and children CPU seconds, and the 1-minute load average at its end."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown together: a module fixture's cost lands on its first test."""
    started, (own, children) = time.monotonic(), _cpu()
    yield
    own_after, children_after = _cpu()
    row = {"id": item.nodeid, "wall": round(time.monotonic() - started, 2),
           "self": round(own_after - own, 2), "children": round(children_after - children, 2),
           "load": round(os.getloadavg()[0], 1)}
    with Path(os.environ.get("CPU_TIMING_OUT", "cpu-timing.jsonl")).open("a") as out:
        out.write(json.dumps(row) + "\n")
