"""What SecAgg+ costs per round, against the same round without it, measured in one run.

    .venv/bin/python -m tests.bench.bench_secagg            # deployment: 4 rounds each; table: 3 reps
    .venv/bin/python -m tests.bench.bench_secagg --quick    # deployment: 3 rounds each; table: 1 rep
    .venv/bin/python -m tests.bench.bench_secagg --no-deployment   # the table only

1. Deployment (target: SecAgg+ round <= 2x the plain round at 3 hospitals): a SuperLink and three
   SuperNodes with warm executors on loopback (fast settings), breast cancer over 3 hospitals,
   logistic regression with DP-SGD; the same study with and without secure aggregation, steady
   state = mean of rounds 2+ (SecAgg+: pipelined, two exchanges per round). Reports wall time per
   round and overhead = wall - the slowest hospital's compute. `--hospitals 10`: the same at 10
   hospitals (target: SecAgg+ overhead <= 3 s per round beyond local training).
2. Table (target: <= 3 s per round beyond local training at 10 hospitals): model size (1k, 10k,
   100k weights) x hospitals (3, 5, 10), with and without SecAgg+, in process (`InProcessGrid`)
   with synthetic hospitals that return a random update and a signed receipt instead of training,
   so the time is the aggregation path alone: message handling, key agreement, Shamir sharing,
   masking, unmasking. In process every hospital runs on this one thread, so the time is the
   sum of all hospitals' protocol work plus the server's (an upper bound on the wall time of a
   deployment whose hospitals work in parallel).
Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (1_000, 10_000, 100_000)
HOSPITALS = (3, 5, 10)


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append({"round": float(round), **{k: float(v) for k, v in metrics.items()}})

    def on_complete(self, model_path: Path, sha256: str) -> None:
        pass

    def on_failed(self, reason: str) -> None:
        raise SystemExit(f"study failed: {reason}")


# -- 1. the real deployment -------------------------------------------------------------------------


def deployment(rounds: int, root: Path, hospitals: int = 3) -> dict[str, dict[str, float]]:
    from federated.runtime.demo_sites import approve, demo_spec, provision_sites
    from federated.runtime.deployment import LocalFederation
    from federated.runtime.server_runner import run_study
    from federated.runtime.settings import RuntimeSettings

    settings = RuntimeSettings()
    names = tuple(f"hospital-{chr(ord('a') + i)}" for i in range(hospitals))
    sites = provision_sites(root / "sites", hospitals=names)
    out: dict[str, dict[str, float]] = {}
    with LocalFederation(
        root / "fed", {h: d.site.node_config() for h, d in sites.items()}, settings=settings
    ) as fed:
        for secure in (False, True, False, True):  # interleaved: machine load hits both alike
            name = "secagg" if secure else "plain"
            spec = demo_spec(
                f"bench-{name}-{len(out)}-{time.time_ns()}",
                rounds=rounds,
                min_hospitals=3,
                accountant="rdp",
                secure_aggregation=secure,
                round_timeout_s=600,
            )
            for demo in sites.values():
                approve(demo.site, spec.study_id)
            recorder = Recorder()
            result = run_study(fed.superlink.address, spec, recorder, root / "out", settings=settings)
            if result.status != "completed":
                raise SystemExit(f"{name}: {result.reason}")
            steady = recorder.rounds[1:]
            keys = ["round_wall_s", "overhead_s", "train_compute_max_s"]
            if secure:
                keys += ["secagg_collect_s", "secagg_unmask_s", "secagg_pipelined"]
            for key in keys:
                out.setdefault(name, {}).setdefault(key, 0.0)
                out[name][key] += statistics.fmean(r.get(key, 0.0) for r in steady) / 2
            out[name]["ref_accuracy"] = recorder.rounds[-1].get("ref_accuracy", float("nan"))
    return out


# -- 2. the table (in process, synthetic hospitals) -------------------------------------------------


def _synthetic_app(signers: dict[int, Any], spec: Any, size: int) -> Any:
    from datetime import UTC, datetime

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from audit.reward_commitment import DEFAULT_SIZE, commit
    from federated.receipts import make_receipt
    from federated.secagg.client import secagg_mod
    from federated.server_app import GLOBAL_KEY, METRIC_PREFIX, REPLY_KEY, UPDATE_KEY, WEIGHTS_KEY

    app = ClientApp(mods=[secagg_mod])
    rng = np.random.default_rng(0)
    rewards = commit({}, minimum_size=DEFAULT_SIZE).public()

    @app.train()
    def train(message: Message, context: Any) -> Message:
        weights = message.content.array_records[GLOBAL_KEY][WEIGHTS_KEY].numpy()
        update = (weights + rng.normal(0, 0.05, size)).astype(np.float32)
        hospital = f"h{context.node_id}"
        receipt = make_receipt(
            signers[context.node_id],
            study_id=spec.study_id,
            round=int(message.metadata.group_id),
            hospital_id=hospital,
            records_used=100,
            commitment="0" * 64,
            epsilon_spent=0.1,
            epsilon_total=0.1,
            delta=1e-5,
            spec_sha256=spec.sha256(),
            rewards=rewards,
            instant=datetime.now(UTC),
        )
        record = ConfigRecord(
            {
                "status": "ok",
                "reason": "",
                "hospital": hospital,
                "receipt": receipt.to_bytes(),
                METRIC_PREFIX + "num_examples": 100.0,
            }
        )
        content = RecordDict({REPLY_KEY: record, UPDATE_KEY: ArrayRecord({WEIGHTS_KEY: Array(update)})})
        return Message(content, reply_to=message)

    return app


def table_cell(hospitals: int, size: int, secure: bool, reps: int) -> float:
    """Median seconds of one aggregation round (synthetic hospitals) over `reps` rounds."""
    import threading

    from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

    from audit.signing import Signer
    from federated.runtime.demo_sites import demo_spec
    from federated.runtime.inprocess import InProcessGrid
    from federated.secagg.server import SecAggDriver
    from federated.server_app import (
        GLOBAL_KEY,
        WEIGHTS_KEY,
        NodeDirectory,
        SecAggTransport,
        ServerOptions,
        _decode_reply,
        _reply_weights_sum,
        _stamp,
        exchange,
    )

    spec = demo_spec("bench-table", min_hospitals=3, secure_aggregation=secure)
    signers = {n: Signer.generate() for n in range(1, hospitals + 1)}
    app = _synthetic_app(signers, spec, size)
    grid = InProcessGrid({n: {} for n in signers}, spec.to_run_config(), client_app=app)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=spec.to_run_config()
    )
    options = ServerOptions(output_dir=Path("."), poll=0.0, stop_event=threading.Event())
    directory = NodeDirectory(grid, spec, context, options)
    targets = {n: f"h{n}" for n in signers}
    weights = np.zeros(size, dtype=np.float32)
    times = []
    for round_ in range(1, reps + 1):

        def decode(phase: Any, masked: bool, r: int = round_) -> list[Any]:
            return [
                _decode_reply(n, m, spec, r, None, n_weights=size, masked=masked)
                for n, m in phase.replies.items()
            ]

        t0 = time.perf_counter()
        if secure:
            result = SecAggDriver(SecAggTransport(directory), timeout=600, min_members=3).run(
                targets, weights, round_, lambda phase: decode(phase, True)
            )
            if result.weights is None:
                raise SystemExit(f"secagg round failed: {result.failure}")
            weights = result.weights
        else:
            content = RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(weights)})})
            messages = [
                Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(round_), ttl=600)
                for n in targets
            ]
            _stamp(messages, context, options)
            phase = exchange(grid, messages, timeout=600, poll=0.0)
            weights = _reply_weights_sum([r for r in decode(phase, False) if r.receipt is not None])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-deployment", action="store_true")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--hospitals", type=int, default=3, help="hospitals in the deployment part")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per study in the deployment part")
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    if not args.no_table:
        print(
            "== table: seconds per aggregation round (in process, synthetic hospitals, median of "
            f"{reps}); ratio = secagg / plain"
        )
        table_cell(3, 1_000, False, 1)  # warm-up: imports and first-use costs stay out of the table
        table_cell(3, 1_000, True, 1)
        print(f"{'weights':>8} {'hospitals':>9} {'plain':>8} {'secagg':>8} {'ratio':>6}")
        for size in SIZES:
            for hospitals in HOSPITALS:
                plain = table_cell(hospitals, size, False, reps)
                secure = table_cell(hospitals, size, True, reps)
                print(f"{size:>8} {hospitals:>9} {plain:>8.3f} {secure:>8.3f} {secure / plain:>6.1f}")
    if args.no_deployment:
        return
    rounds = args.rounds or (3 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        numbers = deployment(rounds, Path(tmp), args.hospitals)
    p, s = numbers["plain"], numbers["secagg"]
    print(
        f"== deployment: {args.hospitals} hospitals, breast cancer, logistic regression, DP-SGD; "
        f"mean of rounds 2-{rounds} (SecAgg+ pipelined), "
        "two studies each, interleaved"
    )
    for name, n in numbers.items():
        print(
            f"{name:>7}: wall {n['round_wall_s']:.2f} s/round, overhead {n['overhead_s']:.2f} s, "
            f"slowest compute {n['train_compute_max_s']:.2f} s, final ref. accuracy {n['ref_accuracy']:.3f}"
        )
    print(
        "secagg stages (s/round): "
        + ", ".join(
            f"{k.removeprefix('secagg_').removesuffix('_s')} {s[k]:.2f}" for k in s if k.startswith("secagg_")
        )
    )
    print(
        f"ratio secagg/plain: wall {s['round_wall_s'] / p['round_wall_s']:.2f}x (target <= 2x), "
        f"overhead {s['overhead_s'] / p['overhead_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
