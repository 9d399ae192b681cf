"""The supervisor with real child processes: restart with exponential backoff, the longer wait
after exit code 305, clean stop (SIGTERM, then SIGKILL after the grace period), and children
that die with their parent even when the parent is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from exchange.node.supervisor import ChildSpec, Supervisor
from tests.node.helpers import wait_for

PY = sys.executable


class Clock:
    """A clock the test moves by hand: backoff decisions are checked without sleeping on them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exit_with(code: int) -> ChildSpec:
    return ChildSpec(f"exit-{code}", (PY, "-c", f"import sys; sys.exit({code})"))


def _wait_exit(supervisor: Supervisor, name: str) -> None:
    child = supervisor.children[name]
    assert child.process is not None
    child.process.wait(60)


def test_failing_child_restarts_with_doubling_backoff() -> None:
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    sup = Supervisor(initial_backoff_s=1.0, max_backoff_s=4.0, after_305_s=10.0, clock=clock,
                     on_event=lambda e, d: events.append((e, d)))
    sup.want(_exit_with(3))
    delays = []
    for _ in range(4):
        sup.tick()  # starts it
        _wait_exit(sup, "exit-3")
        sup.tick()  # notices the exit, schedules the restart
        child = sup.children["exit-3"]
        delays.append(child.next_start - clock.now)
        assert not child.running and child.last_exit == 3
        clock.now = child.next_start - 0.01
        sup.tick()
        assert child.process is None  # not before its time
        clock.now = child.next_start
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert sup.children["exit-3"].restarts == 4
    assert [d["exit_code"] for e, d in events if e == "child_exited"] == [3, 3, 3, 3]


def test_flower_exit_305_waits_for_the_superlink_to_forget_the_node(tmp_path: Path) -> None:
    """flwr_exit(305) prints "Exit Code: 305" and exits with status 1 (as flwr 1.42 does)."""
    clock = Clock()
    sup = Supervisor(initial_backoff_s=1.0, max_backoff_s=60.0, after_305_s=10.0, clock=clock)
    sup.want(ChildSpec("supernode", (PY, "-c", "import sys; print('Exit Code: 305'); sys.exit(1)"),
                       log_file=tmp_path / "supernode.log"))
    sup.tick()
    _wait_exit(sup, "supernode")
    sup.tick()
    child = sup.children["supernode"]
    assert (child.last_exit, child.flower_exit) == (1, 305)
    assert child.next_start - clock.now == 10.0
    # the next run fails differently: the old 305 in the same log file does not count again
    sup.children["supernode"] = type(child)(spec=ChildSpec("supernode", (PY, "-c", "import sys; sys.exit(1)"),
                                                           log_file=tmp_path / "supernode.log"),
                                            backoff=1.0)
    sup.tick()
    _wait_exit(sup, "supernode")
    sup.tick()
    assert sup.children["supernode"].flower_exit is None
    assert sup.children["supernode"].next_start - clock.now == 1.0


def test_stop_all_terminates_and_kills_the_stubborn(tmp_path: Path) -> None:
    ignores_term = ChildSpec("stubborn", (PY, "-c", textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """)), log_file=tmp_path / "stubborn.log")
    polite = ChildSpec("polite", (PY, "-c", "import time; print('ready', flush=True); time.sleep(600)"),
                       log_file=tmp_path / "polite.log")
    events: list[str] = []
    sup = Supervisor(on_event=lambda e, d: events.append(f"{e}:{d.get('child')}"))
    sup.want(ignores_term)
    sup.want(polite)
    sup.tick()
    wait_for(lambda: "ready" in (tmp_path / "stubborn.log").read_text()
             and "ready" in (tmp_path / "polite.log").read_text(), "children up")
    pids = [c.process.pid for c in sup.children.values() if c.process]
    sup.stop_all(grace_s=1.0)
    assert sup.children["polite"].last_exit == -signal.SIGTERM
    assert sup.children["stubborn"].last_exit == -signal.SIGKILL
    assert "child_killed:stubborn" in events and "child_killed:polite" not in events
    for pid in pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_children_die_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from exchange.node.supervisor import ChildSpec, Supervisor
        sup = Supervisor()
        sup.want(ChildSpec("sleeper", ({PY!r}, "-c", "import time; time.sleep(600)")))
        sup.tick()
        Path({str(pid_file)!r}).write_text(str(sup.children["sleeper"].process.pid))
        time.sleep(600)
    """)])
    try:
        child_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the child"))
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        wait_for(lambda: not _alive(child_pid) or _zombie(child_pid), "the orphan to get SIGTERM")
    finally:
        if parent.poll() is None:
            parent.kill()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_a_child_starts_only_after_the_one_it_waits_for_is_ready(tmp_path: Path) -> None:
    """The SuperNode waits for the warm executor's ready line (torch imported) before it starts;
    the executor's readiness is read from what this run of it wrote to its log."""
    gate = tmp_path / "go"
    slow = ChildSpec("executor", (PY, "-c", textwrap.dedent(f"""
        import os, time
        print("loading", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.02)
        print("warm executor ready for 127.0.0.1:1", flush=True)
        time.sleep(600)
    """)), log_file=tmp_path / "executor.log", ready_line="warm executor ready")
    (tmp_path / "executor.log").write_text("warm executor ready (an earlier run: does not count)\n")
    dependent = ChildSpec("supernode", (PY, "-c", "import time; time.sleep(600)"), after="executor")
    events: list[str] = []
    sup = Supervisor(on_event=lambda e, d: events.append(f"{e}:{d.get('child')}"))
    try:
        sup.want(dependent)  # wanted first: the order of want() does not matter
        sup.want(slow)
        sup.tick()
        assert sup.children["executor"].running and sup.children["supernode"].process is None
        wait_for(lambda: "loading" in (tmp_path / "executor.log").read_text(), "the executor to start")
        for _ in range(5):
            sup.tick()
        assert sup.children["supernode"].process is None
        assert sup.snapshot()["executor"]["ready"] is False
        gate.touch()
        wait_for(lambda: (sup.tick(), sup.children["supernode"].running)[1], "the supernode to start")
        assert events.index("child_ready:executor") < events.index("child_started:supernode")
        assert sup.snapshot()["executor"]["ready"] is True
    finally:
        sup.stop_all(grace_s=5.0)


def _silent_child(tmp_path: Path, *, ignore_sigterm: bool = False) -> ChildSpec:
    """A child that runs on and never touches its liveness file itself (the test does)."""
    body = "import pathlib, signal, sys, time\n"
    if ignore_sigterm:
        body += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    body += "pathlib.Path(sys.argv[1]).write_text('armed')\ntime.sleep(3600)\n"
    return ChildSpec("supernode", (PY, "-c", body, str(tmp_path / "armed")),
                     liveness_file=tmp_path / "supernode.online", liveness_s=10.0)


def test_a_child_alive_but_silent_is_stopped_and_restarted(tmp_path: Path) -> None:
    """A running child whose liveness file stays unchanged for `liveness_s` (the hosted SuperNode
    touches it after each heartbeat the SuperLink accepted: alive but not online) gets SIGTERM with
    the reason logged, and restarts like any exit; a touch within the limit keeps it."""
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    sup = Supervisor(initial_backoff_s=1.0, clock=clock, on_event=lambda e, d: events.append((e, d)))
    spec = _silent_child(tmp_path)
    assert spec.liveness_file is not None
    sup.want(spec)
    sup.tick()
    child = sup.children["supernode"]
    first = child.process
    assert first is not None and child.ready
    clock.now += 8
    spec.liveness_file.touch()  # a heartbeat went through
    os.utime(spec.liveness_file, (1.0, 1.0))  # a distinct mtime whatever the file system's resolution
    sup.tick()
    clock.now += 9  # 17 s since start, 9 since the touch
    sup.tick()
    assert child.process is first and first.poll() is None
    assert not [e for e, _ in events if e == "child_unresponsive"]
    clock.now += 1.5  # 10.5 s without a touch
    sup.tick()
    [(_, data)] = [(e, d) for e, d in events if e == "child_unresponsive"]
    assert data["child"] == "supernode" and data["pid"] == first.pid and data["silent_s"] == 10.5
    assert "supernode.online untouched for 10 s" in data["reason"] and "not online" in data["reason"]
    assert first.wait(30) == -signal.SIGTERM
    sup.tick()
    exited = [d for e, d in events if e == "child_exited"]
    assert exited and exited[-1]["unresponsive"] is True
    clock.now = child.next_start
    sup.tick()  # restarted, and its silence counts from its own start
    assert child.process is not None and child.process is not first and child.restarts == 1
    clock.now += 9
    sup.tick()
    assert child.running and len([e for e, _ in events if e == "child_unresponsive"]) == 1
    sup.stop_all(grace_s=5.0)


def test_a_silent_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    clock = Clock()
    events: list[str] = []
    sup = Supervisor(kill_after_s=5.0, clock=clock, on_event=lambda e, _d: events.append(e))
    sup.want(_silent_child(tmp_path, ignore_sigterm=True))
    sup.tick()
    child = sup.children["supernode"]
    process = child.process
    assert process is not None
    wait_for((tmp_path / "armed").exists, "the child to ignore SIGTERM")
    clock.now += 11
    sup.tick()
    assert events[-1] == "child_unresponsive"
    clock.now += 4
    sup.tick()
    assert process.poll() is None  # SIGTERM ignored, not yet killed
    clock.now += 1
    sup.tick()
    assert process.wait(30) == -signal.SIGKILL and "child_killed" in events
    sup.tick()
    assert events[-1] == "child_exited" and child.process is None
