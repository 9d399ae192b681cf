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
them (at least 3) and the report says how many trained.

Reported per configuration:
- start-up: from nothing to every daemon registered and online, and to every decision in;
- per round (rounds 2+; round 1 also calibrates each hospital's noise): wall time, the slowest
  hospital's own compute (evaluate + train, inside its ClientApp), and the overhead beyond
  training (wall - that compute), from the round metrics the ServerApp logs;
- memory per hospital: the peak, during training, of the summed RSS of a hospital's daemon and
  its descendants (SuperNode and executor), read from /proc;
- the ratios to the 3-hospital configuration of the same run, and SecAgg+ to plain.
Timing only: nothing is asserted; numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from exchange.demo.consortium import Consortium, DemoConfig, Progress


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


ROLES = ("daemon", "supernode", "executor", "other")


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


def tree_rss_mb(pid: int) -> dict[str, float]:
    """RSS (MiB) of `pid` and all its descendants, by role (daemon, supernode, executor)."""
    total: dict[str, float] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    role = _role(current)
                    total[role] = total.get(role, 0.0) + int(line.split()[1]) / 1024
        except OSError:
            continue
        todo += _children(current)
    return total


class MemorySampler:
    """Samples each hospital's process tree every second while the study trains."""

    def __init__(self, consortium: Consortium) -> None:
        self.consortium = consortium
        self.peak: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}  # hospital -> role -> RSS at its peak
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            if self.consortium.progress.phase != "training":
                continue
            for h in list(self.consortium.hospitals.values()):
                if h.process is not None:
                    parts = tree_rss_mb(h.process.pid)
                    if sum(parts.values()) > self.peak.get(h.id, 0.0):
                        self.peak[h.id] = sum(parts.values())
                        self.parts[h.id] = parts


def run_config(hospitals: int, secure: bool, rounds: int, root: Path) -> dict[str, Any]:
    config = DemoConfig(out=root / f"h{hospitals}-{'secagg' if secure else 'plain'}", rounds=rounds,
                        study="survival",
                        hospitals=hospitals, min_hospitals=max(3, hospitals // 2), secure_aggregation=secure,
                        strict_hospital=None, revoke={}, min_eligible_records=5, witnesses=True,
                        timeout_s=1800)
    progress = Progress()
    consortium = Consortium(config, progress)
    sampler = MemorySampler(consortium)
    sampler.thread.start()
    started = time.monotonic()
    try:
        consortium.run()
    finally:
        sampler.stop.set()
        consortium.stop()
    wall = time.monotonic() - started
    report = json.loads((config.out / "report.json").read_text())
    steady = [r for r in report["rounds"] if r["round"] >= 2] or report["rounds"]

    def mean(key: str) -> float:
        values = [float(r[key]) for r in steady if r.get(key) is not None]
        return statistics.fmean(values) if values else float("nan")

    return {
        "hospitals": hospitals, "secure_aggregation": secure, "wall_s": round(wall, 1),
        "startup_online_s": report["milestones_s"]["online"],
        "startup_decided_s": report["milestones_s"]["decided"],
        "round_wall_s": round(mean("wall_s"), 2), "train_compute_max_s": round(mean("compute_max_s"), 2),
        "overhead_s": round(mean("overhead_s"), 2),
        "rss_per_hospital_mb": round(statistics.fmean(sampler.peak.values()), 0) if sampler.peak else None,
        "rss_max_hospital_mb": round(max(sampler.peak.values()), 0) if sampler.peak else None,
        "rss_by_role_mb": {role: round(statistics.fmean(p.get(role, 0.0) for p in sampler.parts.values()))
                           for role in ROLES} if sampler.parts else None,
        "trained": sum(1 for h in report["hospitals"] if h.get("decision") == "approve"),
        "checks_failed": [c["check"] for c in report.get("checks", []) if not c.get("ok")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", default="3,10", help="comma-separated hospital counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-secagg", action="store_true", help="plain rounds only")
    parser.add_argument("--quick", action="store_true", help="3 hospitals, 3 rounds, plain only")
    args = parser.parse_args()
    counts = [3] if args.quick else [int(c) for c in args.hospitals.split(",")]
    rounds = 3 if args.quick else args.rounds
    modes = [False] if args.quick or args.no_secagg else [False, True]
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for count in counts:
            for secure in modes:
                result = run_config(count, secure, rounds, Path(tmp))
                results.append(result)
                print(json.dumps(result), flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"{'hospitals':>9} {'secagg':>6} {'online s':>8} {'decided s':>9} {'round s':>7} {'train s':>7} "
          f"{'overhead s':>10} {'x3':>5} {'RSS/hosp MB':>11} {'x3':>5}")
    for r in results:
        base = next(b for b in results if b["hospitals"] == counts[0] and b["secure_aggregation"]
                    == r["secure_aggregation"])
        over = r["overhead_s"] / base["overhead_s"] if base["overhead_s"] else float("nan")
        rss = (r["rss_per_hospital_mb"] / base["rss_per_hospital_mb"]
               if r["rss_per_hospital_mb"] and base["rss_per_hospital_mb"] else float("nan"))
        secagg = "yes" if r["secure_aggregation"] else "no"
        print(f"{r['hospitals']:>9} {secagg:>6} {r['startup_online_s']:>8} "
              f"{r['startup_decided_s']:>9} {r['round_wall_s']:>7} {r['train_compute_max_s']:>7} "
              f"{r['overhead_s']:>10} {over:>5.2f} {r['rss_per_hospital_mb']!s:>11} {rss:>5.2f}")
    for count in counts:
        pair = [r for r in results if r["hospitals"] == count]
        if len(pair) == 2 and pair[0]["round_wall_s"]:
            print(f"SecAgg+ / plain round wall at {count} hospitals: "
                  f"{pair[1]['round_wall_s'] / pair[0]['round_wall_s']:.2f}x")


if __name__ == "__main__":
    main()
