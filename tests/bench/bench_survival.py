"""DP Cox (case-cohort, public subcohort) FedAvg on flchain, 3 hospitals non-IID, vs a centralized
non-private Cox fit on the pooled training patients, on the same held-out patients.

    ./scripts/bench survival              # eps 3 and 1, 5 seeds, throughput
    ./scripts/bench survival --quick      # 2 seeds, eps 3 only

The FedAvg loop runs in-process (no Flower), as bench_dp_utility does: each round every hospital
runs `train_round` (template `cox_ph`) from the global state on its own training patients with its
own DP plan (patient-level Poisson sampling, per-patient clipping, secure noise, calibrated so all
rounds stay within (epsilon, 1e-5) per patient by the PRV accountant); the server averages. The
risk set of every patient is the PUBLIC subcohort (docs/survival.md). Two DP starts are measured:
"public start" (what the ServerApp does: the initial model fitted without noise on the public
subcohort) and "zero start" (no public pre-training; the ablation that shows what the hospitals'
private data adds). "public only" is the public start with no hospital data at all.

Baseline: lifelines' CoxPHFitter on the pooled training patients of all hospitals (full risk sets,
no privacy), scored on the union of the hospitals' hold-out patients with Harrell's concordance
(scikit-survival). Target (issue 17): mean DP concordance at epsilon 3 within 0.03 of it.

Per-hospital metric release (issue 17 item 1 with issue 14's accounting): each hospital's
Harrell's concordance and integrated Brier score released through the charged evaluation
(`federated.eval_stats`, noise from the study plan's `eval_noise_multiplier`, one evaluation per
round): the binning gap (no noise) and the error of 200 noised releases against the exact metrics
on that hospital's hold-out patients, per hospital and pooled, for the DP model at epsilon 3 and 1.

Throughput: patient-steps per second of the DP step (Poisson sampling, per-patient gradients,
clipping, ChaCha20 noise) vs the same loop without clipping or noise (sigma 0, clip huge),
single-threaded torch, in the same run. Target: ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
import torch

from federated.accounting import plan_study
from federated.clinical_data import (
    EVENT_COLUMN,
    SurvivalSet,
    load_survival_federated,
    public_survival_reference,
    split_outcome,
)
from federated.data import pooled
from federated.dp import PatientIndex, initial_state, public_initial_state, run_cox
from federated.dp_round import train_round
from federated.secure_random import SecureRandom
from federated.survival import Subcohort, exact_metrics, per_patient_loss
from federated.templates import get_template
from federated.weights import fedavg

DELTA = 1e-5
TEMPLATE = "cox_ph"
ROUNDS, STEPS, BATCH, CLIP, LR = 5, 10, 256, 1.0, 0.5


def run_dp(hospitals: list[SurvivalSet], columns: list[str], epsilon: float, seed: int,
           public_start: bool) -> np.ndarray:
    sub = public_survival_reference(columns, "pretrain")
    assert sub is not None
    plans = [plan_study(epsilon, DELTA, rounds=ROUNDS, n_patients=len(h), batch_size=BATCH,
                        steps_per_round=STEPS, evaluation=False) for h in hospitals]
    state = (public_initial_state(TEMPLATE, columns, "survival", seed) if public_start
             else initial_state(TEMPLATE, len(columns), seed))
    for r in range(ROUNDS):
        results = [train_round(TEMPLATE, state, h.x, np.column_stack([h.time, h.event]),
                               noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                               local_steps=p.steps_per_round, clip=CLIP, lr=LR, delta=DELTA,
                               prior_steps=r * p.steps_per_round, seed=seed * 1_000_003 + r * 101 + i,
                               subcohort=sub)
                   for i, (h, p) in enumerate(zip(hospitals, plans, strict=True))]
        state = fedavg([res.state for res in results], [res.num_examples for res in results])
    return state


def concordance(beta: np.ndarray, test: SurvivalSet, train: SurvivalSet) -> float:
    return exact_metrics(test.x @ beta, test, train.x @ beta, train)["concordance"]


def lifelines_beta(train: SurvivalSet, columns: list[str]) -> np.ndarray:
    from lifelines import CoxPHFitter

    frame = pd.DataFrame(train.x.astype(np.float64), columns=columns)
    frame["T"], frame["E"] = train.time, train.event
    return np.asarray(CoxPHFitter().fit(frame, "T", "E").params_.values, dtype=np.float64)


def throughput(h: SurvivalSet, columns: list[str], private: bool, steps: int) -> float:
    """Patient-steps per second of the training loop alone (no accounting): the DP loop
    (`run_cox`: Poisson sampling, per-patient gradients, clipping, secure noise) or ordinary
    mini-batch SGD on the same loss through autograd and torch.optim (shuffled batches)."""
    sub = public_survival_reference(columns, "pretrain")
    assert sub is not None
    cohort = Subcohort.from_set(sub)
    cohort = Subcohort(cohort.x, cohort.time)
    model = get_template(TEMPLATE).build(len(columns))
    x = torch.from_numpy(h.x)
    y = torch.from_numpy(np.column_stack([h.time, h.event]))
    t0 = time.perf_counter()
    if private:
        run_cox(model, x, y, cohort, index=PatientIndex.build(len(h), None), rng=SecureRandom(0),
                sigma=1.0, q=BATCH / len(h), steps=steps, clip=CLIP, lr=LR, momentum=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(0)
        layer = model[0]
        assert isinstance(layer, torch.nn.Linear)
        for _ in range(steps):
            idx = torch.randperm(len(h), generator=gen)[:BATCH]
            opt.zero_grad()
            per_patient_loss(layer.weight[0], cohort, x[idx], y[idx, 0], y[idx, 1].float()).mean().backward()
            opt.step()
    return steps * BATCH / (time.perf_counter() - t0)


def release_errors(model_beta: np.ndarray, parts: list, columns: list[str], epsilon: float,
                   draws: int) -> None:
    """Error of each hospital's noised metric release against the exact metrics on its hold-out
    patients (and of the pooled release against the pooled exact metrics); prints one line each."""
    from sksurv.metrics import concordance_index_censored, integrated_brier_score
    from sksurv.util import Surv

    from federated import eval_stats
    from federated.evaluation import aggregate_statistics, noised_release, patient_statistics
    from federated.survival import baseline_survival
    from federated.weights import unpack

    template = get_template(TEMPLATE)
    model = unpack(template.build(len(columns)), model_beta.astype(np.float32))
    sub = public_survival_reference(columns, "pretrain")
    assert sub is not None
    setup = eval_stats.survival_setup(tuple(columns))
    times_s0, s0 = baseline_survival(template.predict(model, sub.x), sub)
    y_train = Surv.from_arrays(sub.event.astype(bool), sub.time)
    plan = plan_study(epsilon, DELTA, rounds=ROUNDS, n_patients=2000, batch_size=BATCH, steps_per_round=STEPS)
    assert plan.eval_noise_multiplier is not None
    rng = SecureRandom()

    def exact(s: SurvivalSet) -> dict[str, float]:
        eta = template.predict(model, s.x)
        surv = np.interp(setup.grid, times_s0, s0)[None, :] ** np.exp(eta)[:, None]
        return {"concordance": concordance_index_censored(s.event.astype(bool), s.time, eta)[0],
                "ibs": integrated_brier_score(y_train, Surv.from_arrays(s.event.astype(bool), s.time),
                                              surv, setup.grid)}

    tests = [p.test() for p in parts]
    sets = [split_outcome(t, columns) for t in tests]
    rows = [patient_statistics(template, model, s.x, np.column_stack([s.time, s.event]), t.pseudonyms,
                               columns=columns) for s, t in zip(sets, tests, strict=True)]
    truth = {f"h{i}": exact(s) for i, s in enumerate(sets)}
    pooled_set = SurvivalSet(np.concatenate([s.x for s in sets]), np.concatenate([s.time for s in sets]),
                             np.concatenate([s.event for s in sets]))
    truth["pooled"] = exact(pooled_set)
    noiseless = aggregate_statistics({f"h{i}": (float(r.shape[0]), r.sum(0)) for i, r in enumerate(rows)},
                                     "survival", columns=columns)
    errors: dict[str, dict[str, list[float]]] = {k: {"concordance": [], "ibs": []} for k in truth}
    for _ in range(draws):
        released = {}
        for i, r in enumerate(rows):
            rel = noised_release(np.zeros(r.shape[0]), plan.eval_noise_multiplier, rng, stats=r,
                                 blocks=eval_stats.blocks("survival"))
            released[f"h{i}"] = (rel.count, rel.stats)
        got = aggregate_statistics(released, "survival", columns=columns)
        for who in truth:
            for metric in ("concordance", "ibs"):
                key = f"eval_{metric}" + ("" if who == "pooled" else f"@{who}")
                if key in got:
                    errors[who][metric].append(got[key] - truth[who][metric])
    sigma = plan.eval_noise_multiplier
    print(f"  metric release, DP model eps {epsilon:g}: eval noise multiplier {sigma:.2f} "
          f"({ROUNDS} evaluations), {draws} releases")
    for who, metrics in errors.items():
        key = "" if who == "pooled" else f"@{who}"
        parts_text = []
        for metric, e in metrics.items():
            gap = noiseless[f"eval_{metric}{key}"] - truth[who][metric]
            a = np.abs(np.asarray(e))
            parts_text.append(f"{metric} exact {truth[who][metric]:.4f}, binning gap {gap:+.4f}, noised "
                              f"bias {np.mean(e):+.4f}, |error| median {np.median(a):.4f}, "
                              f"90% {np.quantile(a, 0.9):.4f}")
        n = sum(len(s) for s in sets) if who == "pooled" else len(sets[int(who[1:])])
        print(f"    {who} ({n} hold-out patients): " + "; ".join(parts_text))


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def utility(dataset: str, seeds: list[int], epsilons: list[float]) -> tuple[list[SurvivalSet], list[str]]:
    """Concordance of DP Cox vs the centralized fit on `dataset`; prints one line per setting."""
    parts = load_survival_federated(dataset, 3)
    columns = [c for c in parts[0].columns if c != EVENT_COLUMN]
    hospitals = [split_outcome(p.train(), columns) for p in parts]
    train = split_outcome(pooled(parts).train(), columns)
    test = split_outcome(pooled(parts).test(), columns)
    print(f"{dataset}: 3 hospitals, {[len(h) for h in hospitals]} training patients, {len(test)} held out "
          f"({int(test.event.sum())} events); {ROUNDS} rounds x {STEPS} steps, batch {BATCH}")
    t0 = time.perf_counter()
    central = concordance(lifelines_beta(train, columns), test, train)
    print(f"  centralized non-private Cox (lifelines), pooled training: C = {central:.4f} "
          f"({time.perf_counter() - t0:.1f}s)")
    public_only = concordance(public_initial_state(TEMPLATE, columns, "survival"), test, train)
    print(f"  public subcohort only (no hospital data): C = {public_only:.4f} "
          f"(gap {central - public_only:+.4f})")
    for eps in epsilons:
        for public_start in (True, False):
            t0 = time.perf_counter()
            cs = [concordance(run_dp(hospitals, columns, eps, s, public_start), test, train)
                  for s in seeds]
            gap = central - statistics.fmean(cs)
            label = "public start" if public_start else "zero start"
            print(f"  DP Cox eps {eps:g} ({label}), {len(seeds)} seeds: C = {fmt(cs)}; gap to centralized "
                  f"{gap:+.4f}; ratio {statistics.fmean(cs) / central:.4f} ({time.perf_counter() - t0:.1f}s)")
            if dataset == "flchain" and eps == 3.0 and public_start:
                print(f"  TARGET eps 3 gap <= 0.03: {'MET' if gap <= 0.03 else 'NOT MET'} ({gap:+.4f})")
            if public_start:
                model = run_dp(hospitals, columns, eps, seeds[0], True)
                release_errors(model, parts, columns, eps, draws=200)
    return hospitals, columns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    epsilons = [3.0] if args.quick else [3.0, 1.0]
    for dataset in ("flchain", "gbsg2"):
        hospitals_ds, columns_ds = utility(dataset, seeds, epsilons)
        if dataset == "flchain":
            hospitals, columns = hospitals_ds, columns_ds
    steps = 100 if args.quick else 400
    throughput(hospitals[0], columns, True, 10)  # warm-up (imports, first allocations)
    nonpriv = statistics.median(throughput(hospitals[0], columns, False, steps) for _ in range(3))
    priv = statistics.median(throughput(hospitals[0], columns, True, steps) for _ in range(3))
    print(f"throughput (patient-steps/s, batch {BATCH}): DP {priv:,.0f}, non-private {nonpriv:,.0f}, "
          f"ratio {priv / nonpriv:.3f}; TARGET >= 0.5: {'MET' if priv / nonpriv >= 0.5 else 'NOT MET'}")


if __name__ == "__main__":
    main()
