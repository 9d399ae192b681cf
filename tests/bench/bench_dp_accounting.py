"""The epsilon a hospital reports, per patient, against an independent accountant.

    .venv/bin/python -m tests.bench.bench_dp_accounting            # full
    .venv/bin/python -m tests.bench.bench_dp_accounting --quick    # fewer cases

For each case a hospital's breast cancer training records are regrouped so that patients hold
1, 2, 3 or 5 records each (the node's records table allows several per patient); the study is
planned in patients (`plan_study(n_patients=...)`), one round of `train_round` runs with the
patient keys, and the epsilon it reports is compared with Google's `dp-accounting` PLD accountant
(a test-only dependency) for ONE patient: a Poisson-subsampled Gaussian with the plan's noise
multiplier, sample rate batch / patients, and the steps taken. The ratio printed is
reported / independent; the target (issue 14) is within 1 %. The composition of several studies
on one patient (what `PrivacyLedger.composition` reports) is compared the same way.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from federated.accounting import compose_epsilon, epsilon_spent, plan_study
from federated.data import load_hospital
from federated.dp import initial_state
from federated.dp_round import train_round
from tests.dp_reference import independent_epsilon

DELTA = 1e-5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    part = load_hospital("breast_cancer", "hospital-a").train()
    n = len(part)
    epsilons = [3.0] if args.quick else [1.0, 3.0, 8.0]
    per_patient = [1, 3] if args.quick else [1, 2, 3, 5]
    print(f"hospital-a: {n} training records; batch 32, 10 rounds x 10 steps, delta {DELTA}")
    print(f"{'records/patient':>16} {'patients':>9} {'target':>7} {'reported':>10} {'independent':>12} "
          f"{'ratio':>7}")
    worst = 0.0
    for k in per_patient:
        patients = np.array([f"p{i // k}" for i in range(n)])
        n_patients = len(set(patients.tolist()))
        for eps in epsilons:
            t0 = time.perf_counter()
            plan = plan_study(eps, DELTA, rounds=10, n_patients=n_patients, batch_size=32, steps_per_round=10,
                              evaluation=False)
            res = train_round("logistic_regression", initial_state("logistic_regression", part.n_features),
                              part.x, part.y, noise_multiplier=plan.noise_multiplier,
                              sample_rate=plan.sample_rate, local_steps=plan.steps_per_round, clip=1.0,
                              lr=0.5, delta=DELTA, prior_steps=9 * plan.steps_per_round, patients=patients,
                              seed=k)
            theirs = independent_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], DELTA)
            ratio = res.epsilon / theirs
            worst = max(worst, abs(ratio - 1.0))
            print(f"{k:>16} {n_patients:>9} {eps:>7g} {res.epsilon:>10.4f} {theirs:>12.4f} {ratio:>7.4f}"
                  f"  ({time.perf_counter() - t0:.1f} s)")
    # composition of three studies on one patient
    mechanisms = [(1.2, 0.3, 100), (2.5, 0.9, 50), (4.0, 1.0, 5)]
    ours = compose_epsilon(mechanisms, 3 * DELTA)
    theirs = independent_epsilon(mechanisms, 3 * DELTA)
    summed = sum(epsilon_spent(*m, DELTA) for m in mechanisms)
    worst = max(worst, abs(ours / theirs - 1.0))
    print(f"\ncomposition of 3 studies on one patient at delta {3 * DELTA:g}: PRV {ours:.4f}, "
          f"independent PLD "
          f"{theirs:.4f} (ratio {ours / theirs:.4f}); sum of the studies' epsilons {summed:.4f} "
          f"(composed / sum {ours / summed:.3f})")
    print(f"largest deviation from the independent accountant: {worst * 100:.2f} % "
          f"(target <= 1 %: {'met' if worst <= 0.01 else 'MISSED'})")


if __name__ == "__main__":
    main()
