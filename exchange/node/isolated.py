"""Run one heavy step of the node daemon in a short-lived forked child, so the daemon never
imports what only that step needs.

Why (issue "Scale", memory per hospital; numbers in docs/benchmarks/scale.md): deciding on a
study (consent gating over every record with pyarrow, the survival outcome check with the public
reference data, i.e. pandas, SciPy and scikit-survival) and exporting the site's records
(numpy, and the data code) import about 150 MB of libraries and leave the parsed data behind. A Python
process never gives an imported module back, so a daemon that did this work itself held all of
it for the rest of its life, while it mostly polls the coordinator. Done in a forked child, that
memory is the child's and goes with it; the daemon keeps only SQLAlchemy, pydantic and httpx.

What the child shares with the daemon: everything in memory at the fork (settings, signer, the
store's engine), copy-on-write. Its effects reach the daemon only through the database (a
decision count in the privacy ledger, the site files) and the value it returns, sent back
pickled over a pipe (a child of this very process: trusted as much as the daemon itself).
An exception raised in the child is raised again here. The database connections the daemon's
pool holds are never used in the child (`Engine.dispose(close=False)`, SQLAlchemy's way for a
forked process) nor closed by it (the old pool stays referenced until the child exits with
`os._exit`, which runs no finalizers), so the daemon's connections stay intact.

Cost: one fork per heavy step (decisions and record exports are rare: once per new study or
data import), and what the child computed is not cached in the daemon (e.g. the parsed consent
contracts of `exchange.node.eligibility.ContractCache` are parsed again for the next study).
Where `os.fork` does not exist, the step runs in this process, as before.

Locks at the fork: a child gets every lock in the state it had at the fork, and one that another
thread held then stays held in the child for ever. Two kinds mattered (a daemon of the
25-hospital benchmark stopped stepping for the 600 s timeout): structlog's write lock per output
file (the witness thread logs) and SQLite's own mutexes (the witness thread reads and writes the
node's store). So the fork takes structlog's write locks (`_hold_write_locks`), and it happens
under `FORK_GUARD`, which every other thread of the daemon holds while it uses the database
(`exchange.node.witness_loop`): no lock of either kind is held by another thread at the fork.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine
from structlog._output import WRITE_LOCKS

T = TypeVar("T")

#: How long a step may run before its child is killed: a forked child of a threaded process can
#: in principle hang on a lock another thread held at the fork, and the daemon must not hang with it.
DEFAULT_TIMEOUT_S = 600.0

#: Held by a daemon thread other than the main one while it uses the database, and by the main
#: thread across a fork (module docstring).
FORK_GUARD = threading.RLock()

#: Set in the child: the pools it must never use nor close (kept alive until `os._exit`).
_INHERITED: list[Any] = []


class IsolatedStepError(RuntimeError):
    """The child died without an answer (killed, or its result could not be sent back)."""


def supported() -> bool:
    """Whether steps can be isolated here (POSIX fork)."""
    return hasattr(os, "fork") and sys.platform != "win32"


@contextmanager
def _hold_write_locks() -> Iterator[None]:
    """structlog's write lock of each output file, held (so by no other thread) while forking.
    (structlog keeps them in `structlog._output.WRITE_LOCKS` and, unlike the standard library's
    logging, does not reset them in a forked child.)"""
    with ExitStack() as held:
        for lock in list(WRITE_LOCKS.values()):
            held.enter_context(lock)
        yield


def _child(fn: Callable[..., T], args: tuple[Any, ...], engines: tuple[Engine, ...], out: int) -> None:
    for engine in engines:
        _INHERITED.append(engine.pool)
        engine.dispose(close=False)
    try:
        payload = pickle.dumps(("ok", fn(*args)))
    except BaseException as exc:  # every failure goes back to the daemon
        try:
            payload = pickle.dumps(("error", exc))
        except Exception:  # an exception that does not pickle: its type and text
            payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    view = memoryview(payload)
    while view:
        view = view[os.write(out, view):]


def run_isolated(fn: Callable[..., T], *args: Any, engines: tuple[Engine, ...] = (),
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    """`fn(*args)` in a forked child; its result (or exception) here. `engines`: the database
    engines the child may use (their pooled connections are the daemon's: the child opens its
    own). Raises IsolatedStepError when the child ends without an answer, or is still running
    after `timeout_s` (it is then killed)."""
    if not supported():
        return fn(*args)
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    with FORK_GUARD, _hold_write_locks():
        pid = os.fork()
    if pid == 0:  # the child: never returns into the daemon's code
        status = 1
        try:
            os.close(read)
            _child(fn, args, engines, write)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        _pid, wait_status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if timed_out:
        raise IsolatedStepError(f"the isolated step {getattr(fn, '__name__', fn)!r} did not answer within "
                                f"{timeout_s:g} s and was stopped")
    if not data:
        raise IsolatedStepError(f"the isolated step {getattr(fn, '__name__', fn)!r} ended without an answer "
                                f"(exit status {os.waitstatus_to_exitcode(wait_status)})")
    kind, value = pickle.loads(data)  # written by our own forked child
    if kind == "error":
        raise value
    return value
