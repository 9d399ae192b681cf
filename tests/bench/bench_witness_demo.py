"""What witnessing adds to a study's completion in the demo: the demo with and without
witnesses, in the same run.

    .venv/bin/python -m tests.bench.bench_witness_demo [--rounds N] [--repeat R]

Runs `exchange demo --no-live` (its own process, as a user does) with `--no-witnesses` (the
baseline: checkpoints signed by the log key alone) and with witnesses (three hospitals cosign
every checkpoint, the export is verified with the quorum of 2), alternating, `--repeat` times
each. From each report's per-phase timings:

- completion: "training" (submission accepted by every hospital -> study completed, with the
  witnesses pulling and cosigning checkpoints all along) plus "cosigned checkpoint" (study
  completed -> a checkpoint of the whole log has the quorum of cosignatures; without witnesses,
  -> a log-signed checkpoint of the whole log);
- the added cost = completion with witnesses - completion without (target: <= 1 s), and the
  "cosigned checkpoint" phase alone, which has no training noise in it.

Best (smallest) of the repeats per variant: on a shared machine the load varies between runs.
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
from typing import Any


def run_demo(rounds: int, witnesses: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-witness-") as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "exchange.cli", "demo", "--out", str(out), "--rounds",
                   str(rounds), "--no-live", "--witnesses" if witnesses else "--no-witnesses"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
                                     "FLWR_DISABLE_UPDATE_CHECK": "1"})
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"demo exited {result.returncode}")
        report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    signed = (report["audit"].get("witnesses") or {}).get("signed") or {}
    return {"wall": wall, "training": timings["training"], "cosigned": timings["cosigned checkpoint"],
            "completion": timings["training"] + timings["cosigned checkpoint"],
            "cosigners": len(signed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="(the default already is quick)")
    args = parser.parse_args()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.repeat):
        for witnesses in (False, True):
            runs[witnesses].append(run_demo(args.rounds, witnesses))
    best = {w: min(r, key=lambda x: x["completion"]) for w, r in runs.items()}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"demo, {args.rounds} rounds, SQLite, best of {args.repeat}; load average {load:.1f}")
    for witnesses in (False, True):
        r = best[witnesses]
        label = "with witnesses (3, quorum 2)" if witnesses else "baseline: no witnesses"
        print(f"  {label:30s} training {r['training']:6.2f} s  cosigned checkpoint "
              f"{r['cosigned']:5.2f} s  completion {r['completion']:6.2f} s  demo wall "
              f"{r['wall']:6.1f} s  cosigners {r['cosigners']}")
    added = best[True]["completion"] - best[False]["completion"]
    phase = best[True]["cosigned"] - best[False]["cosigned"]
    ratio = best[True]["completion"] / best[False]["completion"]
    print(f"cosigning adds {added:+.2f} s to the study's completion (ratio {ratio:.3f} to the "
          f"baseline); the checkpoint phase alone {phase:+.2f} s (target: <= 1 s)")


if __name__ == "__main__":
    main()
