"""Supervises the node's child processes (Flower SuperNode, ClientApp executor): start,
notice an exit, restart with exponential backoff, stop cleanly.

Driven by the daemon's main loop (`tick()`), not by threads of its own, so every start and
every state change happens on one thread and can be reasoned about (and so Linux's
parent-death signal, which is tied to the forking thread, stays armed for the daemon's life).

Why the special cases:
- Flower exit code 305 (SUPERNODE_CONNECTION_ERROR) from a SuperNode: among others, the
  SuperLink still lists this node as online: after a SIGKILL it keeps it for a while (docs/node.md).
  Restarting sooner only fails again, so that exit waits at least `after_305_s` and keeps
  doubling like any other failure. Flower's codes are not process exit statuses (`flwr_exit`
  exits with status 1 for every error and prints "Exit Code: 305"), so the supervisor reads
  the code from what the child wrote to its log since it started.
- children get SIGTERM when the daemon dies, even by SIGKILL (PR_SET_PDEATHSIG), so a
  crashed daemon never leaves a SuperNode holding the ports its successor needs; a
  SuperNode stopped by SIGTERM deregisters, so the next one starts at once.
- a child that stayed up for `stable_after_s` has its backoff reset.
- a child alive but silent is restarted: a ready child with a `liveness_file` that it has not
  touched for `liveness_s` gets SIGTERM (SIGKILL after `kill_after_s`), logged with the reason
  (`child_unresponsive`), then restarts like any exit. The hosted SuperNode touches its file
  after each heartbeat the SuperLink accepted: a SuperNode alive but not online (its loop
  stuck, its heartbeat thread gone) is no exit, and was kept as it was for good.
- a child may start only `after` another is ready (its log, since it started, holds its
  `ready_line`): the SuperNode waits for the warm ClientApp executor to have imported torch
  and the ClientApp, so the first message of a run is not held up by that import (seconds
  of CPU). The executor retries until the SuperNode's runtime API answers, so starting it
  first is safe.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERLINK_SAYS_STILL_ONLINE = 305
PR_SET_PDEATHSIG = 1


# Loaded in the parent, so that the child (between fork and exec, where taking a lock that
# another thread of the parent held at fork time could deadlock) only makes one libc call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass(frozen=True)
class ChildSpec:
    """What to run: argv, environment, where its output goes."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None
    # a line the child writes to `log_file` once it is ready (None: ready once started)
    ready_line: str | None = None
    # the name of a child that must be running and ready before this one starts
    after: str | None = None
    # a file the child touches while it is healthy (the hosted SuperNode: after each heartbeat
    # the SuperLink accepted); a ready child that has not touched it for `liveness_s` is
    # restarted (None: not watched)
    liveness_file: Path | None = None
    liveness_s: float = 120.0


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    flower_exit: int | None = None
    log_offset: int = 0
    ready: bool = False
    #: the liveness file's modification time last seen, and when (the supervisor's clock) it
    #: last changed or the child became ready
    liveness_mtime: float | None = None
    live_at: float = 0.0
    #: when the supervisor asked an unresponsive child to stop (SIGKILL after `kill_after_s`)
    stopping_since: float | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def snapshot(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.process.pid if self.running and self.process else None,
                "ready": self.running and self.ready, "restarts": self.restarts, "last_exit": self.last_exit,
                "flower_exit": self.flower_exit}


Event = Callable[[str, dict[str, Any]], None]


class Supervisor:
    """Keeps a set of children running."""

    def __init__(self, *, initial_backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 after_305_s: float = 10.0, stable_after_s: float = 60.0, kill_after_s: float = 10.0,
                 on_event: Event | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.kill_after = kill_after_s
        self.initial_backoff = initial_backoff_s
        self.max_backoff = max_backoff_s
        self.after_305 = after_305_s
        self.stable_after = stable_after_s
        self.children: dict[str, Child] = {}
        self._event = on_event or (lambda _name, _data: None)
        self._clock = clock

    def want(self, spec: ChildSpec) -> None:
        """Keep `spec` running (started on the next tick if it is new)."""
        if spec.name not in self.children:
            self.children[spec.name] = Child(spec=spec, backoff=self.initial_backoff)

    def forget(self, name: str, grace_s: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            self._stop_children([child], grace_s)

    def tick(self) -> None:
        now = self._clock()
        for child in self.children.values():
            self._check(child, now)
        for child in self.children.values():
            if child.process is None and now >= child.next_start and self._may_start(child):
                self._start(child, now)

    def _may_start(self, child: Child) -> bool:
        if child.spec.after is None:
            return True
        before = self.children.get(child.spec.after)
        return before is not None and before.running and before.ready

    def _check(self, child: Child, now: float) -> None:
        """Notice readiness and exits of one child (and schedule its restart)."""
        if child.process is None:
            return
        code = child.process.poll()
        if code is None:
            if child.stopping_since is not None:
                if now - child.stopping_since >= self.kill_after:
                    child.process.kill()
                    self._event("child_killed", {"child": child.spec.name})
                return
            if now - child.started_at >= self.stable_after:
                child.backoff = self.initial_backoff
            if not child.ready and _wrote_since_start(child, child.spec.ready_line):
                child.ready = True
                child.live_at = now
                child.liveness_mtime = _mtime(child.spec.liveness_file)
                self._event("child_ready", {"child": child.spec.name, "pid": child.process.pid})
            elif child.ready:
                self._check_liveness(child, now)
            return
        unresponsive = child.stopping_since is not None
        child.stopping_since = None
        child.ready = False
        child.last_exit = code
        child.flower_exit = _flower_exit_code(child)
        child.process = None
        delay = child.backoff
        if child.flower_exit == SUPERLINK_SAYS_STILL_ONLINE:
            delay = max(delay, self.after_305)
        child.next_start = now + delay
        child.backoff = min(child.backoff * 2, self.max_backoff)
        child.restarts += 1
        self._event("child_exited", {"child": child.spec.name, "exit_code": code,
                                     "flower_exit_code": child.flower_exit,
                                     "restart_in_s": round(delay, 3), "unresponsive": unresponsive})

    def _check_liveness(self, child: Child, now: float) -> None:
        """Stop (SIGTERM; SIGKILL after `kill_after_s`) a ready child whose liveness file has not
        changed for its `liveness_s`; `_check` restarts it once it exited. The hosted SuperNode
        touches its file after each heartbeat the SuperLink accepted, so an unchanged file means
        a process alive but not online, which nothing else would notice: it is not an exit."""
        path = child.spec.liveness_file
        if path is None or child.process is None:
            return
        mtime = _mtime(path)
        if mtime != child.liveness_mtime:
            child.liveness_mtime, child.live_at = mtime, now
            return
        silent = now - child.live_at
        if silent < child.spec.liveness_s:
            return
        self._event("child_unresponsive", {
            "child": child.spec.name, "pid": child.process.pid, "silent_s": round(silent, 1),
            "reason": f"running but {path.name} untouched for {silent:.0f} s (limit "
                      f"{child.spec.liveness_s:.0f} s): for a SuperNode, no heartbeat the SuperLink "
                      "accepted, so not online; stopping it to restart it"})
        child.process.send_signal(signal.SIGTERM)
        child.stopping_since = now

    def _start(self, child: Child, now: float) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env}
        output: Any = subprocess.DEVNULL
        if spec.log_file is not None:
            spec.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = spec.log_file.open("ab")
            child.log_offset = output.tell()
        try:
            child.process = subprocess.Popen(list(spec.argv), env=env, stdin=subprocess.DEVNULL,
                                             stdout=output, stderr=subprocess.STDOUT,
                                             preexec_fn=_die_with_parent)  # noqa: PLW1509 (see _PRCTL)
        except OSError as exc:
            child.next_start = now + child.backoff
            child.backoff = min(child.backoff * 2, self.max_backoff)
            self._event("child_start_failed", {"child": spec.name, "error": str(exc)})
            return
        finally:
            if spec.log_file is not None:
                output.close()
        child.started_at = now
        child.ready = spec.ready_line is None
        child.live_at, child.liveness_mtime = now, _mtime(spec.liveness_file)
        self._event("child_started", {"child": spec.name, "pid": child.process.pid})

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child, wait up to `grace_s`, SIGKILL the rest."""
        self._stop_children(list(self.children.values()), grace_s)

    def _stop_children(self, children: list[Child], grace_s: float) -> None:
        live = [c for c in children if c.running]
        for child in live:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in live:
            assert child.process is not None
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
                self._event("child_killed", {"child": child.spec.name})
            child.last_exit = child.process.returncode
            child.process = None
            child.ready = False
            self._event("child_stopped", {"child": child.spec.name, "exit_code": child.last_exit})

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: child.snapshot() for name, child in self.children.items()}


_FLOWER_EXIT = re.compile(rb"Exit Code: (\d+)")
_LOG_TAIL_BYTES = 64 * 1024


def _flower_exit_code(child: Child) -> int | None:
    """The last "Exit Code: N" Flower printed since this run of the child started, if any."""
    path = child.spec.log_file
    if path is None:
        return None
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(child.log_offset, size - _LOG_TAIL_BYTES))
            found = _FLOWER_EXIT.findall(handle.read())
    except OSError:
        return None
    return int(found[-1]) if found else None


def _mtime(path: Path | None) -> float | None:
    """`path`'s modification time, None if there is no such file."""
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _wrote_since_start(child: Child, line: str | None) -> bool:
    """Whether the child wrote `line` to its log since this run of it started."""
    if line is None:
        return True
    path = child.spec.log_file
    if path is None:
        return False
    try:
        with path.open("rb") as handle:
            handle.seek(child.log_offset)
            return line.encode() in handle.read()
    except OSError:
        return False
