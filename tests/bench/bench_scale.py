"""A consortium as it grows: studies with 3, 10, 25 hospitals, each a real node daemon with its
SuperNode and warm executor, with and without secure aggregation (issue "Scale", item 1).

    .venv/bin/python -m tests.bench.bench_scale                     # 3 and 10 hospitals
    .venv/bin/python -m tests.bench.bench_scale --hospitals 3,10,25 # the whole table
    .venv/bin/python -m tests.bench.bench_scale --quick             # 3 hospitals, plain only

Each configuration is the demo's consortium (`exchange.demo.consortium`: coordinator, TLS
SuperLink with SuperNode authentication, one `exchange node run` per hospital; the survival
study, flchain's 7,874 people split non-IID over the hospitals (breast cancer's 569 cannot be
split over 10); no revocations) running one study of `--rounds` rounds. A hospital whose split
holds too few events for the Cox template refuses (site rule), so `min_hospitals` is half of
them (at least 3) unless `--min-hospitals` says otherwise, and the report says how many trained.
`--keep DIR` runs in DIR and leaves it (the daemons', SuperLink's and coordinator's logs) instead
of a temporary folder removed at the end.

Reported per configuration:
- start-up: from nothing to every daemon registered and online, and to every decision in;
- per round (rounds 2+; round 1 also calibrates each hospital's noise): wall time, the slowest
  hospital's own compute (evaluate + train, inside its ClientApp), and the overhead beyond
  training (wall - that compute), from the round metrics the ServerApp logs;
- memory per hospital: the peak, during training, of the summed RSS and of the summed PSS of a
  hospital's daemon and its descendants (its Flower process: SuperNode and executor), and of
  their resident pages counted once (`memory_map.union_mb`: the issue's "node, SuperNode and
  executor together" on a host of their own), read from /proc;
- the ratios to the 3-hospital configuration of the same run, and SecAgg+ to plain.
Timing only: nothing is asserted; numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from exchange.demo.consortium import Consortium, DemoConfig, Progress, study_body
from tests.bench.coordinator_threads import ThreadCpuSampler, threads_in_window
from tests.bench.memory_map import union_mb


def _children(pid: int) -> list[int]:
    """The child processes of `pid`; none once it has exited (a forked decision step, a
    restarted SuperNode: /proc/PID/task goes away while it is listed)."""
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


ROLES = ("daemon", "daemon_step", "supernode", "executor", "other")


def _role(pid: int) -> str:
    """Which part of a hospital a process is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    for marker, role in (("node run", "daemon"), ("supernode", "supernode"), ("executor", "executor"),
                         ("clientapp", "executor")):
        if marker in text:
            return role
    return "other"


def _smaps(pid: int) -> dict[str, float]:
    """RSS, PSS and anonymous memory (MiB) of one process, from /proc/PID/smaps_rollup.

    RSS counts every resident page the process maps, including the pages of shared libraries
    (libtorch, libpython, numpy) that every hospital's processes on this machine share through
    the page cache: summed over hospitals it counts them once per process. PSS divides each shared
    page among the processes that map it, so PSS summed over hospitals is what they really take
    together on one machine; RSS is what one hospital would take on a host of its own."""
    out = {"rss": 0.0, "pss": 0.0, "anon": 0.0}
    keys = {"Rss:": "rss", "Pss:": "pss", "Anonymous:": "anon"}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in keys:
            out[keys[parts[0]]] = int(parts[1]) / 1024
    return out


def _status_memory(pid: int) -> dict[str, float]:
    """RSS and anonymous memory (MiB) of one process from /proc/PID/status (`VmRSS`, `RssAnon`):
    the kernel's counters, read in microseconds, where smaps_rollup walks the page tables (about
    3 ms of kernel CPU for a 450 MB process, on the cores the measured study runs on). No PSS."""
    out = {"rss": 0.0, "anon": 0.0}
    keys = {"VmRSS:": "rss", "RssAnon:": "anon"}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in keys:
            out[keys[parts[0]]] = int(parts[1]) / 1024
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += _children(current)
    return found


def tree_usage(pid: int, *, pss: bool = True) -> dict[str, dict[str, float]]:
    """Memory (rss, pss, anon MiB) and CPU seconds of `pid` and all its descendants, by role
    (daemon, supernode, executor; daemon_step: a short-lived fork of the daemon deciding on a
    study or exporting the records, `exchange.node.isolated`, which shows the daemon's command
    line: part of the hospital's memory while it runs, and apart so that a peak it falls in says
    so). `pss=False`: rss and anon from the kernel's counters (`_status_memory`), no pss: cheap
    enough to sample every hospital every second."""
    total: dict[str, dict[str, float]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            usage = {**(_smaps(current) if pss else _status_memory(current)), "cpu_s": _cpu_s(current)}
        except (OSError, IndexError, ValueError):
            continue
        name = _role(current)
        role = total.setdefault("daemon_step" if name == "daemon" and current != pid else name, {})
        for key, value in usage.items():
            role[key] = role.get(key, 0.0) + value
        todo += _children(current)
    return total


def tree_rss_mb(pid: int) -> dict[str, float]:
    """RSS (MiB) of `pid` and all its descendants, by role (daemon, supernode, executor)."""
    return {role: usage["rss"] for role, usage in tree_usage(pid).items()}


#: the least time between two `union_mb` counts of one hospital (`MemorySampler.union_due`)
UNION_EVERY_S = 10.0
#: ... and only once the hospital's summed RSS grew by this fraction over its last count's
UNION_GROWTH = 0.02


class MemorySampler:
    """Samples each hospital's process tree every second while the study trains: the peak of the
    hospital's summed RSS, each role's share at that peak, and each role's CPU seconds (the last
    sample: from start-up to the end of training), from the kernel's counters (`tree_usage(pss=
    False)`: microseconds a process).

    At a new peak of the summed RSS, at most every `UNION_EVERY_S` per hospital, it also reads
    the hospital's smaps (its summed PSS, whose peak is kept apart) and counts its resident pages
    once (`memory_map.union_mb`: the pages its daemon and Flower process share, libpython, OpenSSL
    and the other libraries both map, are in both RSS): the most of that is `peak_union`, what
    "node, SuperNode and executor together" take on a host of their own. Only then: smaps_rollup
    costs ~3 ms of kernel CPU per process and reading every page's frame a fraction of a CPU
    second, taken from the two cores the measured rounds run on (at 25 hospitals a smaps_rollup
    of every process every second was ~0.15 CPU s a second). The PSS peak is therefore the
    largest PSS seen at those RSS peaks."""

    def __init__(self, consortium: Consortium) -> None:
        self.consortium = consortium
        self.peak: dict[str, float] = {}  # hospital -> peak summed RSS
        self.peak_pss: dict[str, float] = {}
        self.peak_union: dict[str, float] = {}  # hospital -> its resident pages counted once (MiB)
        self.parts: dict[str, dict[str, float]] = {}  # hospital -> role -> RSS at its peak
        self.parts_pss: dict[str, dict[str, float]] = {}
        self.cpu: dict[str, dict[str, float]] = {}  # hospital -> role -> CPU seconds
        self.union_at: dict[str, float] = {}  # hospital -> when its pages were last counted once
        self.union_rss: dict[str, float] = {}  # hospital -> its summed RSS at that count
        self.union_base_rss: dict[str, float] = {}  # hospital -> its summed RSS at its largest count
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            if self.consortium.progress.phase != "training":
                continue
            for h in list(self.consortium.hospitals.values()):
                if h.process is not None and self.sample(h.id, tree_usage(h.process.pid, pss=False)) \
                        and self.union_due(h.id, time.monotonic(), self.peak[h.id]):
                    self.sample(h.id, tree_usage(h.process.pid))
                    self.sample_union(h.id, tree_pids(h.process.pid), self.peak[h.id])

    def union_due(self, hospital: str, now: float, rss: float | None = None) -> bool:
        """Whether a new RSS peak of `hospital` gets its pages counted once (`union_mb`): at most
        every `UNION_EVERY_S` per hospital, and (given the peak `rss`) only once it grew by
        `UNION_GROWTH` over the last count's. Reading every page's frame is this process's
        heaviest work (15 % of its samples at 25 hospitals, py-spy; with RSS creeping up a few
        MB at a time during training every hospital was recounted every 10 s: 0.5-0.8 CPU s per
        round of the bench's threads at 25 hospitals), and this process is also the coordinator
        and the ServerApp whose rounds it measures; `union_bound` covers the growth since."""
        if now - self.union_at.get(hospital, -UNION_EVERY_S) < UNION_EVERY_S:
            return False
        last = self.union_rss.get(hospital)
        if rss is not None and last is not None and rss < last * (1 + UNION_GROWTH):
            return False
        self.union_at[hospital] = now
        return True

    def sample(self, hospital: str, usage: dict[str, dict[str, float]]) -> bool:
        """Record one sample; True when the hospital's summed RSS is a new peak."""
        usage.pop("gone", None)
        new_peak = False
        for key, peak, parts in (("rss", self.peak, self.parts), ("pss", self.peak_pss, self.parts_pss)):
            if any(key not in u for u in usage.values()):
                continue  # a sample without PSS (`tree_usage(pss=False)`)
            total = sum(u[key] for u in usage.values())
            if total > peak.get(hospital, 0.0):
                peak[hospital] = total
                parts[hospital] = {role: u[key] for role, u in usage.items()}
                new_peak = new_peak or key == "rss"
        self.cpu[hospital] = {role: u["cpu_s"] for role, u in usage.items()}
        return new_peak

    def sample_union(self, hospital: str, pids: list[int], rss: float | None = None) -> None:
        """Count `hospital`'s resident pages once; `rss`: its summed RSS then (default: its peak)."""
        union = union_mb(pids)
        if union is None:
            return
        rss = self.peak.get(hospital, 0.0) if rss is None else rss
        self.union_rss[hospital] = rss
        if union > self.peak_union.get(hospital, 0.0):
            self.peak_union[hospital] = union
            self.union_base_rss[hospital] = rss

    def union_bound(self, hospital: str) -> float:
        """The hospital's pages counted once at its RSS peak, bounded from above: its largest
        count plus all the RSS it grew since (a page added later counted as if no other process
        mapped it). Counts are skipped while RSS grew less than `UNION_GROWTH`."""
        base = self.union_base_rss.get(hospital, self.peak.get(hospital, 0.0))
        return self.peak_union[hospital] + max(0.0, self.peak.get(hospital, 0.0) - base)


def _thread_cpu_s(tid: int) -> float:
    """User + system CPU seconds of one thread of this process (/proc/self/task/TID/stat)."""
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: whose CPU `ServerCpuSampler` samples, in the order of its samples' CPU fields (`hospitals_flower`:
#: the hospitals' Flower processes alone, a part of `hospitals`)
CPU_PARTS = ("superlink", "coordinator", "hospitals", "hospitals_flower")
CpuSample = tuple[float, str, float, float, float, float]


def cpu_in_window(samples: list[CpuSample], start: float, end: float) -> dict[str, float]:
    """CPU seconds of each of `CPU_PARTS` between the times `start` and `end` (the samples' clock,
    `time.time()`): each interval between two samples adds its (never negative) increase in the
    share of it that falls in the window, as if spent evenly."""
    out = {f"{who}_cpu_s": 0.0 for who in CPU_PARTS}
    for (t0, _phase, *cpu0), (t1, _next, *cpu1) in itertools.pairwise(samples):
        overlap = min(t1, end) - max(t0, start)
        if overlap <= 0 or t1 <= t0:
            continue
        for who, before, after in zip(CPU_PARTS, cpu0, cpu1, strict=True):
            out[f"{who}_cpu_s"] += max(0.0, after - before) * overlap / (t1 - t0)
    return {key: round(value, 3) for key, value in out.items()}


def cpu_by_round(samples: list[CpuSample], rounds: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each round's CPU seconds (`cpu_in_window`) over its wall time: a round ends at its log
    entry's time (`time`, ISO 8601) and began `wall_s` before (the exchange: push, training,
    replies; not round 1's start-up before it)."""
    out = []
    for r in rounds:
        if r.get("time") is None or r.get("wall_s") is None:
            continue
        end = datetime.fromisoformat(str(r["time"]).replace("Z", "+00:00")).timestamp()
        out.append({"round": r["round"], "wall_s": round(float(r["wall_s"]), 2),
                    **cpu_in_window(samples, end - float(r["wall_s"]), end)})
    return out


def coordinator_threads_by_round(samples: list[tuple[float, dict[str, float]]],
                                 rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each round's CPU seconds of this process by thread group (`coordinator_threads.PARTS`:
    ServerApp, the API's loop and workers, the coordinator's background threads, the demo's
    driver, the bench's samplers), over the round's wall time as in `cpu_by_round`."""
    out = []
    for r in rounds:
        if r.get("time") is None or r.get("wall_s") is None:
            continue
        end = datetime.fromisoformat(str(r["time"]).replace("Z", "+00:00")).timestamp()
        out.append({"round": r["round"], **threads_in_window(samples, end - float(r["wall_s"]), end)})
    return out


def cpu_by_phase(samples: list[CpuSample]) -> dict[str, dict[str, float]]:
    """Per phase of the consortium's run: its wall seconds and the CPU seconds the SuperLink, the
    coordinator and all hospitals together (daemons and Flower processes) spent in it, from
    (time, phase, SuperLink CPU s, coordinator CPU s, hospitals CPU s) samples in time
    order. Each interval between two samples counts to the phase of its first sample; `*_cores`
    is CPU over wall (how many cores it kept busy). A process that ended between two samples
    takes its CPU with it, so a difference is never negative."""
    out: dict[str, dict[str, float]] = {}
    for (t0, phase, *cpu0), (t1, _next, *cpu1) in itertools.pairwise(samples):
        row = out.setdefault(phase, {"wall_s": 0.0, **{f"{who}_cpu_s": 0.0 for who in CPU_PARTS}})
        row["wall_s"] += t1 - t0
        for who, before, after in zip(CPU_PARTS, cpu0, cpu1, strict=True):
            row[f"{who}_cpu_s"] += max(0.0, after - before)
    for row in out.values():
        for who in CPU_PARTS:
            row[f"{who}_cores"] = row[f"{who}_cpu_s"] / row["wall_s"] if row["wall_s"] else 0.0
        for key, value in row.items():
            row[key] = round(value, 2)
    return out


class ServerCpuSampler:
    """Samples, twice a second, the CPU seconds of the SuperLink (its process tree), of the
    coordinator (this process: API, runner, ServerApp; less the bench's own sampling threads) and
    of all hospitals' process trees, with the consortium's phase: what each side spends while
    hospitals join, decide and train (`cpu_by_phase`)."""

    def __init__(self, consortium: Consortium, exclude_threads: list[threading.Thread]) -> None:
        self.consortium = consortium
        self.exclude = exclude_threads
        self.samples: list[CpuSample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def _coordinator_cpu(self) -> float:
        own = _cpu_s(os.getpid())
        samplers = [t.native_id for t in (*self.exclude, self.thread) if t.native_id is not None]
        return own - sum(_thread_cpu_s(tid) for tid in samplers)

    @staticmethod
    def _tree_cpu(pid: int) -> float:
        total = 0.0
        for current in tree_pids(pid):
            try:
                total += _cpu_s(current)
            except (OSError, IndexError, ValueError):
                continue
        return total

    def _superlink_cpu(self) -> float:
        superlink = self.consortium.superlink
        proc = getattr(superlink, "proc", None) if superlink is not None else None
        return self._tree_cpu(proc.pid) if proc is not None else 0.0

    def _hospitals_cpu(self) -> tuple[float, float]:
        """All hospitals' CPU seconds, and those of their Flower processes alone (SuperNode and
        executor, `_role`; the rest is the node daemons and their short-lived forks)."""
        total = flower = 0.0
        for h in list(self.consortium.hospitals.values()):
            if h.process is None:
                continue
            for current in tree_pids(h.process.pid):
                try:
                    cpu = _cpu_s(current)
                except (OSError, IndexError, ValueError):
                    continue
                total += cpu
                if _role(current) in ("supernode", "executor"):
                    flower += cpu
        return total, flower

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self.consortium.progress.phase or "",
                                 self._superlink_cpu(), self._coordinator_cpu(), *self._hospitals_cpu()))
            if self.stop.wait(0.5):
                return


def _mean_by_role(parts: dict[str, dict[str, float]]) -> dict[str, float] | None:
    if not parts:
        return None
    return {role: round(statistics.fmean(p.get(role, 0.0) for p in parts.values()), 1) for role in ROLES}


def participation(report: dict[str, Any]) -> dict[str, int]:
    """How many hospitals approved the study and how many trained in it (a round charged at the
    hospital). Not the same: the coordinator starts the study when `min_hospitals` approved,
    and an approval that arrives after the start is refused (decisions closed), so with a low
    `min_hospitals` fewer train than approve."""
    hospitals = report.get("hospitals", [])
    return {"approved": sum(1 for h in hospitals if h.get("decision") == "approve"),
            "trained": sum(1 for h in hospitals if h.get("rounds"))}


FIRST_ROUND_PARTS = ("start_s", "setup_s", "join_wait_s", "push_s", "dispatch_s", "compute_max_s", "return_s")


def first_round(rounds: list[dict[str, Any]]) -> dict[str, float] | None:
    """Where the first round's time went, from the study's start at the coordinator's runner:
    start_s (FAB, run submitted to the SuperLink, ServerApp task claimed), setup_s (the ServerApp's
    spec, model and public pre-training), join_wait_s (until the approved hospitals' nodes are
    connected and said hello), then the exchange: push_s (messages to the SuperLink),
    dispatch_s (until the slowest ClientApp started), compute_max_s (the slowest hospital's own
    evaluate + train, privacy calibration included), return_s (its reply back). total_s is
    start + setup + join wait + the exchange's wall time; overhead_s is total_s - compute_max_s."""
    one = next((r for r in rounds if r["round"] == 1), None)
    if one is None or "wall_s" not in one:
        return None
    out = {key: round(float(one.get(key, 0.0)), 2) for key in FIRST_ROUND_PARTS}
    total = out["start_s"] + out["setup_s"] + out["join_wait_s"] + float(one["wall_s"])
    out["wall_s"] = round(float(one["wall_s"]), 2)
    out["total_s"] = round(total, 2)
    out["overhead_s"] = round(total - out["compute_max_s"], 2)
    return out


def min_hospitals_arg(text: str) -> list[int]:
    """`--min-hospitals`: "3" (every configuration) or "3,10,20" (one per `--hospitals` count)."""
    return [int(part) for part in text.split(",")]


def min_hospitals_for(counts: list[int], given: list[int] | None) -> list[int | None]:
    """The `min_hospitals` of each hospital count (None: `default_min_hospitals`)."""
    if given is None:
        return [None] * len(counts)
    each = given * len(counts) if len(given) == 1 else list(given)
    if len(each) != len(counts):
        raise SystemExit(f"--min-hospitals: {len(given)} values for {len(counts)} hospital counts")
    if any(m > c for m, c in zip(each, counts, strict=True)):
        raise SystemExit("--min-hospitals: more than the hospitals of its configuration")
    return list(each)


def default_min_hospitals(hospitals: int) -> int:
    """The study's `min_hospitals` when `--min-hospitals` is not given: half of them, at least 3."""
    return max(3, hospitals // 2)


def run_config(hospitals: int, secure: bool, rounds: int, root: Path,
               min_hospitals: int | None = None, features: int | None = None,
               purpose: str | None = None) -> dict[str, Any]:
    config = DemoConfig(out=root / f"h{hospitals}-{'secagg' if secure else 'plain'}", rounds=rounds,
                        study="survival", hospitals=hospitals,
                        min_hospitals=min_hospitals or default_min_hospitals(hospitals),
                        secure_aggregation=secure,
                        strict_hospital=None, revoke={}, min_eligible_records=5, witnesses=True,
                        timeout_s=1800, features=features, purpose=purpose)
    progress = Progress()
    consortium = Consortium(config, progress)
    sampler = MemorySampler(consortium)
    sampler.thread.start()
    threads = ThreadCpuSampler()
    server_cpu = ServerCpuSampler(consortium, [sampler.thread, threads.thread])
    threads.bench_names |= {sampler.thread.name, server_cpu.thread.name}
    threads.thread.start()
    server_cpu.thread.start()
    load_start = round(os.getloadavg()[0], 1)
    started = time.monotonic()
    try:
        consortium.run()
    finally:
        sampler.stop.set()
        server_cpu.stop.set()
        threads.stop.set()
        server_cpu.thread.join()
        threads.thread.join()
        consortium.stop()
    wall = time.monotonic() - started
    report = json.loads((config.out / "report.json").read_text())
    steady = [r for r in report["rounds"] if r["round"] >= 2] or report["rounds"]

    def mean(key: str) -> float:
        values = [float(r[key]) for r in steady if r.get(key) is not None]
        return statistics.fmean(values) if values else float("nan")

    return {
        "hospitals": hospitals, "secure_aggregation": secure, "min_hospitals": config.min_hospitals,
        "features": sum(len(names) for names in study_body(config)["columns"].values()),
        "purpose": study_body(config)["purpose"], "rounds": rounds, "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 1),
        "wall_s": round(wall, 1),
        "startup_online_s": report["milestones_s"]["online"],
        "startup_decided_s": report["milestones_s"]["decided"],
        "round_wall_s": round(mean("wall_s"), 2), "train_compute_max_s": round(mean("compute_max_s"), 2),
        "overhead_s": round(mean("overhead_s"), 2),
        "rss_per_hospital_mb": round(statistics.fmean(sampler.peak.values()), 0) if sampler.peak else None,
        "rss_max_hospital_mb": round(max(sampler.peak.values()), 0) if sampler.peak else None,
        "rss_by_role_mb": _mean_by_role(sampler.parts),
        "pss_per_hospital_mb": (round(statistics.fmean(sampler.peak_pss.values()), 0)
                                if sampler.peak_pss else None),
        "pss_by_role_mb": _mean_by_role(sampler.parts_pss),
        "rss_union_per_hospital_mb": (round(statistics.fmean(map(sampler.union_bound, sampler.peak_union)), 0)
                                      if sampler.peak_union else None),
        "cpu_s_by_role": _mean_by_role(sampler.cpu),
        "first_round": first_round(report["rounds"]),
        "rounds_detail": [{key: r.get(key) for key in ("round", "wall_s", "compute_max_s", "overhead_s",
                                                         *FIRST_ROUND_PARTS[2:])} for r in report["rounds"]],
        "server_cpu_by_phase": cpu_by_phase(server_cpu.samples),
        "cpu_by_round": cpu_by_round(server_cpu.samples, report["rounds"]),
        "coordinator_threads_by_round": coordinator_threads_by_round(threads.samples, report["rounds"]),
        **participation(report),
        "checks_failed": [c["check"] for c in report.get("checks", []) if not c.get("ok")],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", default="3,10", help="comma-separated hospital counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-secagg", action="store_true", help="plain rounds only")
    parser.add_argument("--quick", action="store_true", help="3 hospitals, 3 rounds, plain only")
    parser.add_argument("--json", type=Path, help="also write the results (a JSON list) here")
    parser.add_argument("--plot", type=Path, help="also draw them (SVG, tests/bench/scale_plot.py) here")
    parser.add_argument("--plot-with", type=Path, nargs="*", default=[], metavar="JSON",
                        help="earlier --json files whose rows the plot draws too (this run's rows win "
                             "for the same hospitals and aggregation)")
    parser.add_argument("--min-hospitals", type=min_hospitals_arg, default=None,
                        help="the study's min_hospitals: a number, or one per --hospitals count "
                             "(comma-separated; default: half the hospitals, at least 3)")
    parser.add_argument("--features", type=int, default=None,
                        help="the study asks for flchain's first N feature columns (default: all 6); a Cox "
                             "study with fewer coefficients needs fewer events per hospital (25 hospitals)")
    parser.add_argument("--purpose", default=None,
                        help="the study's DUO purpose (default: the survival study's GRU, DUO:0000042); "
                             "DUO:0000006 (HMB) is permitted by more of the demo's consents")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="run in DIR and keep it (logs of the daemons, SuperLink, coordinator)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    counts = [3] if args.quick else [int(c) for c in args.hospitals.split(",")]
    rounds = 3 if args.quick else args.rounds
    modes = [False] if args.quick or args.no_secagg else [False, True]
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            root = args.keep
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        for count, minimum in zip(counts, min_hospitals_for(counts, args.min_hospitals), strict=True):
            for secure in modes:
                result = run_config(count, secure, rounds, root, minimum, args.features, args.purpose)
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.json is not None:  # after each configuration: a later one may not finish
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot is not None:
        from tests.bench.scale_plot import merge_rows, plot, read_rows

        rows = merge_rows([*(read_rows(path) for path in args.plot_with), results])
        plot(rows, args.plot, title=f"bench_scale, {rounds} rounds")
    print(f"{'hospitals':>9} {'secagg':>6} {'online s':>8} {'decided s':>9} {'round s':>7} {'train s':>7} "
          f"{'overhead s':>10} {'x3':>5} {'RSS/hosp MB':>11} {'x3':>5} {'once MB':>7} {'PSS MB':>6}")
    for r in results:
        base = next(b for b in results if b["hospitals"] == counts[0] and b["secure_aggregation"]
                    == r["secure_aggregation"])
        over = r["overhead_s"] / base["overhead_s"] if base["overhead_s"] else float("nan")
        rss = (r["rss_per_hospital_mb"] / base["rss_per_hospital_mb"]
               if r["rss_per_hospital_mb"] and base["rss_per_hospital_mb"] else float("nan"))
        secagg = "yes" if r["secure_aggregation"] else "no"
        print(f"{r['hospitals']:>9} {secagg:>6} {r['startup_online_s']:>8} "
              f"{r['startup_decided_s']:>9} {r['round_wall_s']:>7} {r['train_compute_max_s']:>7} "
              f"{r['overhead_s']:>10} {over:>5.2f} {r['rss_per_hospital_mb']!s:>11} {rss:>5.2f} "
              f"{r['rss_union_per_hospital_mb']!s:>7} {r['pss_per_hospital_mb']!s:>6}")
    columns = (*FIRST_ROUND_PARTS, "wall_s", "total_s", "overhead_s")
    print("first round (s): " + " ".join(f"{k:>12}" for k in columns))
    for r in results:
        parts = r["first_round"] or {}
        print(f"{r['hospitals']:>3} {'secagg' if r['secure_aggregation'] else 'plain ':>6}      "
              + " ".join(f"{parts.get(k, float('nan')):>12}" for k in columns))
    for count in counts:
        pair = [r for r in results if r["hospitals"] == count]
        if len(pair) == 2 and pair[0]["round_wall_s"]:
            print(f"SecAgg+ / plain round wall at {count} hospitals: "
                  f"{pair[1]['round_wall_s'] / pair[0]['round_wall_s']:.2f}x")


if __name__ == "__main__":
    main()
