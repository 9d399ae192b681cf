"""Accuracy at epsilon 1 with distributed noise against local noise, 3 honest hospitals, breast
cancer, the same seeds and splits (docs/secure-aggregation.md, "Noise").

    .venv/bin/python -m tests.bench.bench_distributed_noise            # 5 seeds, splits 0-3
    .venv/bin/python -m tests.bench.bench_distributed_noise --quick    # 2 seeds, split 0

In process (no Flower: the SecAgg+ sum is exact, `tests/federated/test_distributed_noise.py` checks
the integer path through the real protocol), from the same public pre-trained model, evaluated
on the union of the hospitals' hold-out records. Three runs per seed and split:
- distributed: `federated.distributed_noise`, each hospital adds Sk(mu / 3), the aggregate Sk(mu)
  (guarantee against the coordinator: epsilon, at least 3 honest members);
- local, same algorithm: the same full-batch rounds, each hospital adds the full Sk(mu) (every
  hospital's update alone is epsilon-DP: what local noise means);
- local, the default: the project's DP-SGD FedAvg with local noise (template defaults, PRV
  accountant): what a study gets without `noise: distributed`.
The gain is distributed accuracy minus each local accuracy, mean over seeds, per split.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from federated import distributed_noise as dn
from federated.data import HospitalData, load_federated, pooled
from federated.dp import PatientIndex, public_initial_state
from federated.secure_random import SecureRandom
from federated.templates import Template, get_template
from federated.weights import unpack
from tests.bench.bench_dp_utility import DELTA, Config, evaluate, run_dp


def run_fedsgd(tpl: Template, hospitals: list[HospitalData], test: HospitalData, *, epsilon: float,
               rounds: int, lr: float, clip: float, seed: int, honest: int) -> float:
    """Full-batch rounds with Skellam noise; `honest` = 1 is local noise (each hospital adds it all)."""
    state = public_initial_state(tpl, test.columns, tpl.task, seed)
    noise = dn._plan_cached((epsilon, DELTA, rounds), clip, state.shape[0], honest)
    for r in range(rounds):
        model = unpack(tpl.build(test.n_features, 0), state)
        summed = np.zeros(noise.dim, dtype=np.int64)
        for i, h in enumerate(hospitals):
            rng = SecureRandom(seed * 1_000_003 + r * 101 + i)
            index = PatientIndex.build(len(h.x), h.pseudonyms)
            x = torch.from_numpy(np.ascontiguousarray(h.x, dtype=np.float32))
            y = torch.from_numpy(np.ascontiguousarray(h.y, dtype=np.float32))
            patients = index.sample(1.0, rng)
            summed += dn.hospital_vector(model, tpl, x, y, patients=patients, noise=noise, rng=rng)
        state = dn.apply_sum(state, summed, noise=noise, lr=lr)
    return evaluate(tpl, state, test)["accuracy"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tpl = get_template("logistic_regression")
    d = tpl.defaults
    lr = args.lr or d.lr
    cfg = Config(template=tpl.name, rounds=d.rounds, local_steps=d.local_steps, batch_size=d.batch_size,
                 clip=d.clip, lr=d.lr, momentum=d.momentum)
    seeds = list(range(2 if args.quick else 5))
    splits = [0] if args.quick else [0, 1, 2, 3]
    noise = dn._plan_cached((args.epsilon, DELTA, args.rounds), d.clip, 31, 3)
    print(f"epsilon {args.epsilon}, delta {DELTA}; distributed: {args.rounds} full-batch rounds, lr {lr}, "
          f"sigma {noise.sigma:.3f}, guarantee vs coordinator {noise.central_epsilon(args.rounds):.3f}, "
          f"local (others collude) {noise.local_epsilon(args.rounds):.3f}; local default: {cfg}")
    gains_same, gains_default = [], []
    for split in splits:
        parts = load_federated("breast_cancer", split_seed=split)
        hospitals = [p.train() for p in parts]
        test = pooled([p.test() for p in parts])
        t0 = time.perf_counter()
        dist = [run_fedsgd(tpl, hospitals, test, epsilon=args.epsilon, rounds=args.rounds, lr=lr, clip=d.clip,
                           seed=s, honest=3) for s in seeds]
        same = [run_fedsgd(tpl, hospitals, test, epsilon=args.epsilon, rounds=args.rounds, lr=lr, clip=d.clip,
                           seed=s, honest=1) for s in seeds]
        default = [run_dp(tpl, cfg, hospitals, test, args.epsilon, s)[0]["accuracy"] for s in seeds]
        m_dist, m_same, m_def = statistics.fmean(dist), statistics.fmean(same), statistics.fmean(default)
        gains_same.append(m_dist - m_same)
        gains_default.append(m_dist - m_def)
        print(f"split {split}: accuracy distributed {m_dist:.4f} (min {min(dist):.4f}), local same algorithm "
              f"{m_same:.4f} (min {min(same):.4f}), local default DP-SGD {m_def:.4f} (min {min(default):.4f})"
              f"  [{time.perf_counter() - t0:.1f} s]")
    print(f"gain of distributed noise, mean over splits: {statistics.fmean(gains_same):+.4f} vs local noise "
          f"(same algorithm), {statistics.fmean(gains_default):+.4f} vs the local default")


if __name__ == "__main__":
    main()
