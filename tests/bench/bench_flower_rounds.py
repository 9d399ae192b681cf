"""Per-round wall time of a study on the real Flower deployment, broken down, fast vs plain.

    .venv/bin/python -m tests.bench.bench_flower_rounds            # fast: 6 rounds, plain: 2 rounds
    .venv/bin/python -m tests.bench.bench_flower_rounds --quick    # fast: 3 rounds, plain: 1 round

Both configurations run in this one invocation, on the same machine state, against a SuperLink and
three SuperNodes on loopback (breast cancer split over 3 hospitals, logistic regression, DP-SGD):

- fast  (`RuntimeSettings()`): warm executors behind `--isolation process`, shortened SuperNode
  sleeps and pull back-offs, ServerApp in-process polling every 0.05 s, evaluation folded into the
  train exchange;
- plain (`RuntimeSettings(mode="plain")`): the out-of-the-box SuperNode (one `flwr-clientapp`
  process per message), no patches, 3 s server polls (the ServerApp still runs in-process).

Per round: wall time, the slowest hospital's compute inside its ClientApp (evaluate + train),
overhead = wall - that compute, and where the overhead went: the server's push, dispatch (push
returned -> ClientApp started, slowest hospital), return (ClientApp ended -> reply pulled, slowest).
Round 1 also calibrates each hospital's noise, so steady state = mean over rounds 2+ (fast);
plain reports every round it ran. Timing only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from federated.runtime.demo_sites import approve, demo_spec, provision_sites
from federated.runtime.deployment import LocalFederation
from federated.runtime.server_runner import run_study
from federated.runtime.settings import RuntimeSettings

KEYS = ("round_wall_s", "train_compute_max_s", "overhead_s", "train_push_s", "train_dispatch_max_s",
        "train_return_max_s", "aggregate_s")


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.failed: list[str] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append({"round": float(round), **{k: float(v) for k, v in metrics.items()}})

    def on_complete(self, model_path: Path, sha256: str) -> None:
        pass

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


def run_config(mode: str, rounds: int, root: Path) -> dict[str, Any]:
    settings = RuntimeSettings(mode=mode)  # type: ignore[arg-type]
    sites = provision_sites(root / "sites")
    spec = demo_spec(f"bench-{mode}", rounds=rounds, min_hospitals=3, round_timeout_s=600)
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    t0 = time.perf_counter()
    with LocalFederation(root / "fed", {h: d.site.node_config() for h, d in sites.items()},
                         settings=settings) as federation:
        started = time.perf_counter() - t0
        recorder = Recorder()
        t1 = time.perf_counter()
        result = run_study(federation.superlink.address, spec, recorder, root / "out", settings=settings)
        study_s = time.perf_counter() - t1
    if result.status != "completed":
        raise SystemExit(f"{mode}: study failed: {result.reason}")
    steady = recorder.rounds[1:] if len(recorder.rounds) > 1 else recorder.rounds
    mean = {k: statistics.fmean(r[k] for r in steady) for k in KEYS}
    return {"mode": mode, "rounds": recorder.rounds, "steady_rounds": [int(r["round"]) for r in steady],
            "steady_mean": mean, "federation_start_s": started, "study_s": study_s,
            "run_start_s": result.start_s,
            "final_eval_wall_s": recorder.rounds[-1].get("final_eval_wall_s", float("nan")),
            "eval_accuracy": recorder.rounds[-1].get("eval_accuracy", float("nan"))}


def _row(label: str, values: dict[str, float]) -> str:
    return f"{label:<14}" + "".join(f"{values[k]:>10.2f}" for k in KEYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast: 3 rounds, plain: 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the fast study")
    parser.add_argument("--plain-rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args()
    fast_rounds = args.rounds or (3 if args.quick else 6)
    plain_rounds = args.plain_rounds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        # plain first: the fast run patches this process's grid module (pull back-off), which
        # would otherwise stay active for the plain run's ServerApp
        plain = run_config("plain", plain_rounds, Path(tmp) / "plain")
        fast = run_config("fast", fast_rounds, Path(tmp) / "fast")
    header = f"{'':<14}" + "".join(f"{k.removesuffix('_s').replace('train_', '')[:9]:>10}" for k in KEYS)
    print("seconds per round (3 hospitals on loopback; overhead = wall - slowest hospital's compute)")
    print(header)
    for result in (fast, plain):
        for r in result["rounds"]:
            print(_row(f"{result['mode']} r{int(r['round'])}", r))
    print(_row("fast steady", fast["steady_mean"]))
    print(_row("plain steady", plain["steady_mean"]))
    f, p = fast["steady_mean"], plain["steady_mean"]
    print(f"overhead per round: fast {f['overhead_s']:.2f} s, plain {p['overhead_s']:.2f} s, "
          f"ratio plain/fast {p['overhead_s'] / f['overhead_s']:.1f}x (target: fast <= 3 s)")
    print(f"wall per round:     fast {f['round_wall_s']:.2f} s, plain {p['round_wall_s']:.2f} s, "
          f"ratio plain/fast {p['round_wall_s'] / f['round_wall_s']:.1f}x")
    print(f"final evaluation exchange: fast {fast['final_eval_wall_s']:.2f} s, "
          f"plain {plain['final_eval_wall_s']:.2f} s; run start (submit -> ServerApp task): "
          f"fast {fast['run_start_s']:.2f} s, plain {plain['run_start_s']:.2f} s")
    print(f"federation start: fast {fast['federation_start_s']:.1f} s, "
          f"plain {plain['federation_start_s']:.1f} s; final accuracy fast {fast['eval_accuracy']:.3f}, "
          f"plain {plain['eval_accuracy']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"fast": fast, "plain": plain}, indent=1))


if __name__ == "__main__":
    main()
