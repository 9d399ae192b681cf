"""Wall time of `exchange demo`, per phase, against a baseline measured in the same run.

    .venv/bin/python -m tests.bench.bench_demo [--quick] [--rounds N] [--db URL]

Runs the demo as a user does (`python -m exchange.cli demo --no-live`, its own process) and
reads the per-phase timings from its report.json. The baseline is the cost of starting one
interpreter that imports torch and flwr (what every SuperNode executor and node daemon pays),
measured right before the demo on the same machine: on a shared 2-core machine the load varies
by a factor of several between runs, and the ratio says how much of a slow demo is the machine.
`--quick`: 2 rounds (default 5, the demo's own default). Target: the whole demo under 180 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def baseline_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, flwr.serverapp, opacus"], check=True,
                   env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--db", default=None, help="coordinator database URL (default SQLite)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    base = baseline_s()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "exchange.cli", "demo", "--out", str(out), "--rounds", str(rounds),
                   "--no-live"] + (["--db", args.db] if args.db else [])
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"demo exited {result.returncode}")
        report = json.loads((out / "report.json").read_text())
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"demo, {rounds} rounds, {'PostgreSQL' if args.db else 'SQLite'}; load average {load:.1f}")
    print(f"baseline (interpreter importing torch, flwr, opacus): {base:.1f} s")
    order = ["coordinator", "hospitals join", "data import", "study submitted", "hospitals decide",
             "training", "audit"]
    timings = report["timings_s"]
    for phase, seconds in sorted(timings.items(),
                                 key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        print(f"  {phase:<18} {seconds:7.1f} s")
    rounds_s = [r.get("wall_s", float("nan")) for r in report["rounds"]]
    print("  rounds: " + ", ".join(f"{s:.1f}" for s in rounds_s) + " s")
    print(f"whole command: {wall:.1f} s = {wall / base:.1f}x baseline; target < 180 s: "
          f"{'met' if wall < 180 else 'MISSED'}")


if __name__ == "__main__":
    main()
