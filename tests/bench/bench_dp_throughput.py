"""DP-SGD throughput vs non-private training of the MLP template (samples per second).

    .venv/bin/python -m tests.bench.bench_dp_throughput            # full
    .venv/bin/python -m tests.bench.bench_dp_throughput --quick    # fewer steps

All variants train the `mlp_classifier` template on the pooled breast cancer training records
(30 features), same batch size, same number of steps, one thread (what one hospital's training gets
on a shared 2-core machine), best of `--repeats` runs:
- non-private: `train_nonprivate` (shuffled batches by tensor indexing, mean loss, torch SGD);
  the baseline every ratio is against;
- DP fast: `train_round(engine="fast")` (the default: patient-level Poisson sampling + ghost-norm
  clipping + secure noise: ChaCha20, sum of four Gaussians per coordinate), in NumPy
  (`federated.numpy_dp`, what a hospital runs);
- DP fast, torch: the same steps through the torch twin (`tests.federated.torch_reference.run_fast`,
  the engine before NumPy's), same seed, so the two engines compare in one run;
- DP fast without noise: the same with noise multiplier 0, to show what the secure noise costs;
- DP opacus: `train_round(engine="opacus")` (Opacus GradSampleModule + DPOptimizer, same sampling);
- Opacus defaults: `PrivacyEngine.make_private` with a DataLoader, as the Opacus tutorials do.
Samples per second = steps * (expected) batch size / wall time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # NumPy's BLAS, as torch's:
    os.environ.setdefault(_var, "1")  # one thread (before NumPy is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from federated.data import load_federated, pooled  # noqa: E402
from federated.dp import PatientIndex, initial_state, train_nonprivate  # noqa: E402
from federated.dp_round import train_round  # noqa: E402
from federated.secure_random import SecureRandom  # noqa: E402
from federated.templates import get_template  # noqa: E402
from federated.weights import pack, unpack  # noqa: E402
from tests.federated.torch_reference import run_fast  # noqa: E402

DELTA = 1e-5


def best_of(repeats: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def opacus_defaults(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, sigma: float,
                    clip: float, lr: float) -> None:
    """Plain Opacus usage: PrivacyEngine.make_private over a DataLoader (Poisson sampling)."""
    import warnings

    from opacus import PrivacyEngine

    tpl = get_template("mlp_classifier")
    model = tpl.build(x.shape[1], 0)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv")
        model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=sigma, max_grad_norm=clip)
        done = 0
        while done < steps:
            for xb, yb in loader:
                opt.zero_grad()
                if len(xb):
                    tpl.loss(model(xb), yb).backward()
                opt.step()
                done += 1
                if done >= steps:
                    break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 200 if args.quick else 1000
    repeats = 1 if args.quick else args.repeats
    tpl = get_template("mlp_classifier")
    train = pooled([p.train() for p in load_federated("breast_cancer")])
    x, y = train.x, train.y
    n = len(train)
    state = initial_state(tpl, x.shape[1])
    sigma, clip, lr = 1.0, 1.0, 0.1
    print(f"mlp_classifier ({sum(1 for _ in state)} parameters), {n} records, {steps} steps, "
          f"best of {repeats}, torch threads 1")
    for batch in args.batch_sizes:
        q = batch / n

        def plain(batch: int = batch) -> None:
            train_nonprivate(tpl, state, x, y, batch_size=batch, steps=steps, lr=lr, seed=0)

        def fast(q: float = q) -> None:
            train_round(tpl, state, x, y, noise_multiplier=sigma, sample_rate=q, local_steps=steps,
                        clip=clip, lr=lr, delta=DELTA, seed=0, engine="fast")

        def fast_torch(q: float = q) -> None:
            model = unpack(tpl.build(x.shape[1], 0), state)
            index = PatientIndex.build(n, None)
            run_fast(model, tpl, torch.from_numpy(x.astype(np.float32)),  # type: ignore[arg-type]
                      torch.from_numpy(y.astype(np.float32)), index=index, rng=SecureRandom(0), sigma=sigma,
                      q=q, steps=steps, clip=clip, lr=lr, momentum=0.0, expected_batch=q * n)
            pack(model)

        def quiet(q: float = q) -> None:
            train_round(tpl, state, x, y, noise_multiplier=0.0, sample_rate=q, local_steps=steps,
                        clip=clip, lr=lr, delta=DELTA, seed=0, engine="fast")

        def slow(q: float = q) -> None:
            train_round(tpl, state, x, y, noise_multiplier=sigma, sample_rate=q, local_steps=steps,
                        clip=clip, lr=lr, delta=DELTA, seed=0, engine="opacus")

        def defaults(batch: int = batch) -> None:
            opacus_defaults(x, y, batch, steps, sigma, clip, lr)

        fast()  # warm the accountant's cache: accounting is not training throughput
        plain()  # and torch's first-call costs
        variants = [("non-private (baseline)", plain), ("DP fast engine (NumPy)", fast),
                    ("DP fast engine, torch", fast_torch),
                    ("DP fast engine, no noise", quiet),
                    ("DP opacus engine", slow), ("Opacus defaults (make_private)", defaults)]
        # interleaved repeats, best of each: load from other processes hits all variants alike
        best = {name: float("inf") for name, _ in variants}
        for _ in range(repeats):
            for name, fn in variants:
                best[name] = min(best[name], best_of(1, fn))
        base = best["non-private (baseline)"]
        rows = list(best.items())
        print(f"\nbatch {batch} (sample rate {q:.3f}):")
        for name, secs in rows:
            rate = steps * batch / secs
            print(f"  {name:32s} {rate:10.0f} samples/s  {secs * 1e3 / steps:7.3f} ms/step  "
                  f"ratio to non-private {base / secs:5.2f}x")


if __name__ == "__main__":
    main()
