"""Wall-clock stamps of an exchange's steps in every Flower process (a debug trace, off by default).

Why: a SecAgg+ round at 3 hospitals is two exchanges of Flower messaging in which the hospitals
compute a few ms; what the rest of an exchange's ~0.24 s is (the push, a SuperNode's pick-up,
its object pulls, the executor's hand-off, the reply's push, the ServerApp's reply poll) can only
be read from one timeline across the ServerApp, the SuperNodes and their executors
(docs/benchmarks/flower.md, "The latency of one exchange"). Set `EXCHANGE_TIMELINE` to a file
before the processes start (they inherit it): each process appends one line per step,
``<CLOCK_MONOTONIC ns> <pid> <thread> <event> [details]``; Linux's monotonic clock is one clock
for all processes of the machine, so the lines of all of them sort into one timeline
(`python -m tests.bench.timeline_report FILE` prints it per exchange).

Off (the variable unset or empty) each stamp is one global read; nothing is opened. The file
gets message ids and step names only: no content, nothing about a patient.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

ENV = "EXCHANGE_TIMELINE"

F = TypeVar("F", bound=Callable[..., Any])

class _Sink:
    """Where stamps go: the path (None: off) and its descriptor, opened at the first stamp."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.lock = threading.Lock()


_sink = _Sink(os.environ.get(ENV) or None)


def configure(path: str | os.PathLike[str] | None) -> None:
    """Stamp into `path` from now on (None: stop). The processes this one starts later inherit
    `ENV` only if the caller sets it in their environment."""
    with _sink.lock:
        if _sink.fd is not None:
            os.close(_sink.fd)
        _sink.fd, _sink.path = None, (os.fspath(path) or None) if path is not None else None


def enabled() -> bool:
    """Whether stamps are written (set `ENV`, or `configure`)."""
    return _sink.path is not None


def stamp(event: str, *details: object) -> None:
    """One line: now, this process and thread, `event` and `details` (ids, counts: no content).
    Written with one `write` on an O_APPEND descriptor, so lines of concurrent processes do not
    interleave."""
    if _sink.path is None:
        return
    parts = [str(time.monotonic_ns()), str(os.getpid()), threading.current_thread().name.replace(" ", "_"),
             event, *(str(d) for d in details)]
    line = (" ".join(parts) + "\n").encode()
    with _sink.lock:
        if _sink.path is None:
            return
        if _sink.fd is None:
            _sink.fd = os.open(_sink.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(_sink.fd, line)


def short(message_id: object) -> str:
    """A message id as the timeline shows it (its first 12 hex digits: unique enough in a run)."""
    return str(message_id)[:12]


def traced(fn: F, event: str, describe: Callable[[Any], object] | None = None) -> F:
    """`fn` stamping ``event>`` when called and ``event<`` when it returned (with `describe` of
    its result) or ``event!`` with the exception's type when it raised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stamp(event + ">")
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            stamp(event + "!", type(exc).__name__)
            raise
        if describe is None:
            stamp(event + "<")
        else:
            stamp(event + "<", describe(result))
        return result

    return wrapper  # type: ignore[return-value]
