"""Where a process's memory is, and what a group of processes takes together, from /proc.

Used by `bench_scale` (memory per hospital) and on its own:

    .venv/bin/python -m tests.bench.memory_map PID [PID ...]   # per mapping, and the union

- `breakdown(pid)`: RSS, PSS and private memory per mapping (a shared library by file name, the
  heap, anonymous mappings, stacks), from /proc/PID/smaps: which library or heap the MB are in.
- `union_mb(pids)`: the resident pages of several processes counted ONCE, from
  /proc/PID/pagemap (the physical frame of each resident page). A hospital's daemon and its
  Flower process both map libpython, OpenSSL, the C library (and a forked child the pages it
  still shares copy-on-write with its parent): summed RSS counts those twice, though
  a host running that hospital alone holds them once. The union is what "node, SuperNode and
  executor together" take on a host of their own. Frame numbers need CAP_SYS_ADMIN (Linux
  zeroes them otherwise): without it `union_mb` returns None and only the sums are reported.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAGE = 4096
_PRESENT = np.uint64(1 << 63)
_PFN_MASK = np.uint64((1 << 55) - 1)


def _name(path: str) -> str:
    if not path:
        return "[anon]"
    if path.startswith("["):
        return "[stack]" if path.startswith("[stack") else path
    return Path(path.split(" (deleted)", maxsplit=1)[0]).name


def breakdown(pid: int) -> dict[str, dict[str, float]]:
    """MiB per mapping name: rss, pss, private (clean + dirty), anonymous."""
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"rss": 0.0, "pss": 0.0, "private": 0.0, "anon": 0.0}
    )
    current = "[anon]"
    keys = {
        "Rss:": "rss",
        "Pss:": "pss",
        "Private_Clean:": "private",
        "Private_Dirty:": "private",
        "Anonymous:": "anon",
    }
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
            current = _name(" ".join(parts[5:]) if len(parts) > 5 else "")
        elif parts[0] in keys:
            out[current][keys[parts[0]]] += int(parts[1]) / 1024
    return dict(out)


def _resident_ranges(pid: int) -> list[tuple[int, int]]:
    """The address ranges of `pid` with resident pages (from smaps: only those are read)."""
    ranges: list[tuple[int, int]] = []
    start = end = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            low, high = parts[0].split("-")
            start, end = int(low, 16), int(high, 16)
        elif parts and parts[0] == "Rss:" and int(parts[1]) > 0:
            ranges.append((start, end))
    return ranges


def frames(pid: int) -> np.ndarray | None:
    """The physical frames of `pid`'s resident pages (sorted, unique); None where the kernel
    hides them."""
    found: list[np.ndarray] = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end in _resident_ranges(pid):
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            found.append(entries[(entries & _PRESENT) != 0] & _PFN_MASK)
    present = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.uint64)
    if present.size and not present.any():  # present pages, all frame 0: no CAP_SYS_ADMIN
        return None
    return present


def union_mb(pids: Iterable[int]) -> float | None:
    """MiB of the pages resident in any of `pids`, each counted once (None: frames hidden)."""
    seen = np.empty(0, dtype=np.uint64)
    for pid in pids:
        try:
            own = frames(pid)
        except OSError:  # gone meanwhile
            continue
        if own is None:
            return None
        seen = np.union1d(seen, own)
    return int(seen.size) * PAGE / (1 << 20)


def main(argv: list[str]) -> None:
    pids = [int(p) for p in argv]
    for pid in pids:
        rows = sorted(breakdown(pid).items(), key=lambda kv: -kv[1]["rss"])
        total = {k: sum(r[k] for _n, r in rows) for k in ("rss", "pss", "private", "anon")}
        print(f"pid {pid}: " + " ".join(f"{k} {v:.1f}" for k, v in total.items()))
        for name, row in rows[:25]:
            print(f"  {name[:48]:<48} " + " ".join(f"{k} {v:7.1f}" for k, v in row.items()))
    union = union_mb(pids)
    print(f"union of {len(pids)} processes: {union if union is None else round(union, 1)} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
