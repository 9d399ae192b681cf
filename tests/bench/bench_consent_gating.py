"""Benchmark: gate 1,000,000 records over 10,000 distinct contracts, against a naive per-record loop.

    .venv/bin/python -m tests.bench.bench_consent_gating            # 1,000,000 records, 10,000 contracts
    .venv/bin/python -m tests.bench.bench_consent_gating --quick    # 100,000 records, 1,000 contracts

Target (issue 3): >= 1,000,000 records/s on one core, and >= 50x the naive loop measured in the
same run. The naive loop (`consent.gate.gate_naive`: one `evaluate` per record, then the same
commitment) is too slow to run on every record, so it runs on a uniform sample of records
(`--naive-sample`, default 20,000) and its per-record time is extrapolated; both variants are
checked to agree on that sample. The process is pinned to one CPU (sched_setaffinity) and
Arrow's thread pools are set to one thread. Setup (contract generation, signing, building the record
columns) is not timed. Runs in one process, so on one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from datetime import UTC, datetime

import pyarrow as pa

from audit.signing import Signer
from consent.gate import gate, gate_naive
from consent.history import ContractRegistry
from consent.request import StudyRequest
from consent.synthetic import make_contracts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100k records, 1k contracts")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--contracts", type=int, default=None)
    parser.add_argument("--naive-sample", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # one core: pin the process to a single CPU and keep Arrow's thread pools at one thread
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    n_records = args.records or (100_000 if args.quick else 1_000_000)
    n_contracts = args.contracts or (1_000 if args.quick else 10_000)

    rng = random.Random(42)
    signer = Signer.from_seed(bytes(range(32)))
    pseudonyms = [f"psn-{i:07d}" for i in range(n_contracts)]
    t = time.perf_counter()
    registry = ContractRegistry(make_contracts(pseudonyms, "hospital-a", signer, seed=42))
    setup_s = time.perf_counter() - t
    instant = datetime(2026, 9, 1, tzinfo=UTC)
    in_force = registry.records_at(pseudonyms, "hospital-a", instant)
    # every patient has several records (n_records / n_contracts on average), in random order
    records = [in_force[rng.randrange(n_contracts)] for _ in range(n_records)]
    by_hash = registry.by_hash
    request = StudyRequest(
        purpose="DS",
        disease="C50.9",
        organisation="uni-b",
        region="DE",
        data_categories=("labs", "diagnoses", "vitals"),
        ethics_approval=True,
        epsilon=2.0,
    )
    columns = (pa.array([p for p, _ in records], pa.string()), pa.array([h for _, h in records], pa.string()))

    def timed(fn: object, *fn_args: object) -> tuple[float, object]:
        best = float("inf")
        result = None
        for _ in range(args.repeats):
            gc.collect()
            start = time.perf_counter()
            result = fn(*fn_args)  # type: ignore[operator]
            best = min(best, time.perf_counter() - start)
        return best, result

    arrow_s, result = timed(gate, columns, by_hash, request, instant)
    pairs_s, pairs_result = timed(gate, records, by_hash, request, instant)
    assert pairs_result.commitment == result.commitment  # type: ignore[union-attr]

    sample = rng.sample(records, min(args.naive_sample, n_records))
    naive_times = []
    for _ in range(args.repeats):
        gc.collect()
        start = time.perf_counter()
        naive = gate_naive(sample, by_hash, request, instant)
        naive_times.append(time.perf_counter() - start)
    naive_per_record = min(naive_times) / len(sample)
    check = gate(sample, by_hash, request, instant)
    assert check.commitment == naive.commitment and check.excluded_by_reason == naive.excluded_by_reason
    naive_full_s = naive_per_record * n_records

    out = {
        "records": n_records,
        "distinct_contracts_in_force": len({h for _, h in in_force}),
        "records_used": result.records_used,  # type: ignore[union-attr]
        "excluded_by_reason": result.excluded_by_reason,  # type: ignore[union-attr]
        "gate_arrow_columns_s": round(arrow_s, 4),
        "gate_arrow_columns_records_per_s": round(n_records / arrow_s),
        "gate_python_pairs_s": round(pairs_s, 4),
        "gate_python_pairs_records_per_s": round(n_records / pairs_s),
        "naive_sample": len(sample),
        "naive_sample_s": round(min(naive_times), 4),
        "naive_us_per_record": round(naive_per_record * 1e6, 2),
        "naive_extrapolated_s": round(naive_full_s, 2),
        "speedup_arrow_vs_naive": round(naive_full_s / arrow_s, 1),
        "speedup_pairs_vs_naive": round(naive_full_s / pairs_s, 1),
        "naive_sample_spread_s": round(statistics.pstdev(naive_times), 4),
        "setup_contracts_s": round(setup_s, 2),
    }
    print(json.dumps(out, indent=2))
    ok_rate = n_records / arrow_s >= 1_000_000
    ok_ratio = naive_full_s / arrow_s >= 50
    print(
        f"target >= 1,000,000 records/s: {'met' if ok_rate else 'NOT met'}; "
        f">= 50x naive: {'met' if ok_ratio else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
