"""Thread pools and the C allocator of a hospital's Flower process, sized for many per machine.

Why (issue "Scale", memory per hospital; numbers in docs/benchmarks/scale.md):
- torch (OpenMP) and OpenBLAS start one worker thread per core, each with its own stack and,
  under glibc, its own malloc arena (64 MB of address space, some of it touched and kept). Our
  models are a handful of linear or small MLP layers trained on a few hundred records a round:
  more than one intra-op thread buys nothing there, and a machine hosting several hospitals runs
  their rounds in parallel anyway. An operator who wants more sets OMP_NUM_THREADS themselves.
- glibc gives every thread that allocates its own arena (up to 8 x cores). gRPC, uvicorn, the
  heartbeat and the executor threads each grow one and keep their freed memory. Two arenas are
  enough for a process whose work is one task at a time.
- after a task, freed memory sits in those arenas; `trim()` hands it back to the OS
  (`malloc_trim`), so a hospital between rounds holds what it uses, not its peak.

`limit_threads()` must run before torch or numpy is imported (the pools read the environment
when they start); the environment variables also reach any child process.

`refuse_imports()` keeps a library this process has no use for from being imported as some
other library's optional extra: pyarrow imports pandas (about 25 MB of memory that stays) the
first time it builds an array from Python objects or converts one to numpy, only to check
whether the values are pandas objects; without pandas it does the same work. httpx (which flwr
imports for its logger) imports its own command-line client at import, and with it Pygments
(about 6 MB), inside `try: ... except ImportError`: without Pygments httpx is the same library
minus its CLI, which this process never runs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

#: The thread-pool variables set when the operator did not set them.
THREAD_ENV: dict[str, str] = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
#: glibc: the most malloc arenas a process uses (M_ARENA_MAX; also read as MALLOC_ARENA_MAX at start).
ARENA_MAX = 2
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc (musl): nothing to tune
        return None


_LIBC = _libc()


def limit_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment, changed in place) with the thread and arena
    limits added where it lacks them: this process's own values if the operator set them, else
    ours. Returns the result."""
    target = os.environ if env is None else env
    for key, value in {**THREAD_ENV, "MALLOC_ARENA_MAX": str(ARENA_MAX)}.items():
        target.setdefault(key, os.environ.get(key, value))
    return dict(target)


def limit_threads() -> None:
    """Cap this process's thread pools and malloc arenas (call before importing torch)."""
    limit_env()
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, int(os.environ.get("MALLOC_ARENA_MAX", ARENA_MAX)))
    if "torch" in sys.modules:  # imported already: at least its intra-op pool can still shrink
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def trim() -> None:
    """Give the memory the allocator holds free back to the OS (glibc `malloc_trim`)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


#: What a hospital's Flower process never imports (`refuse_imports`): pyarrow's optional pandas,
#: httpx's optional command-line client (Pygments).
NOT_IMPORTED: tuple[str, ...] = ("pandas", "pygments")


class _Refuse:
    """A meta path finder that makes `import NAME` fail with ModuleNotFoundError, as if NAME were
    not installed, so that libraries with an optional use of it carry on without it."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname}: not imported in this process (process_limits."
                                      "refuse_imports, docs/benchmarks/scale.md)", name=fullname)
        return None


def refuse_imports(names: Iterable[str] = NOT_IMPORTED) -> None:
    """From now on, importing any of `names` (or their submodules) in this process raises
    ModuleNotFoundError. Call it before they could be imported; one already imported stays."""
    finder = _Refuse(n for n in names if n not in sys.modules)
    if finder.names and not any(isinstance(f, _Refuse) and f.names == finder.names for f in sys.meta_path):
        sys.meta_path.insert(0, finder)
