"""`audit verify` throughput vs raw PyNaCl verification of the same signatures.

    .venv/bin/python -m tests.bench.bench_audit_verify            # 100,000 entries
    .venv/bin/python -m tests.bench.bench_audit_verify --quick    # 10,000 entries

Set-up (not timed): `audit.generate.generate_log(N, seed=1)` written as an export folder, the
same thing `audit generate --entries N --out DIR --seed 1` writes.

Timed, best of `--repeat` runs:
- baseline: `VerifyKey.verify(message, signature)` for every entry, one thread, with the
  VerifyKey objects, signed messages and raw signatures prepared beforehand: the bare cost of
  the Ed25519 checks, nothing else;
- `verify_export(DIR)`: what `audit verify DIR` runs: read entries.jsonl, parse and canonical-
  check each line, envelope, duplicate check, keyring, every signature, the token ledger fold,
  rebuild the RFC 6962 tree, match the signed checkpoint. Measured with the default number of
  signature worker processes (one per spare core, at most 2) and with none (all in one thread).
Ratio = baseline time / verify time (1.0: as fast as bare signature checks; target >= 0.8).
The variants run interleaved, best of `--repeat` each; the CPU-time ratio of the variant without
worker processes is also printed, as it hardly depends on the load of a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nacl.signing import VerifyKey

from audit.generate import generate_log
from audit.keyring import Keyring
from audit.signing import b64decode
from audit.verify import default_workers, verify_export


def _measure(runs: dict[str, Callable[[], None]], repeat: int) -> dict[str, tuple[float, float]]:
    """Best wall time and best CPU time (this process only) of each run, interleaved.

    Interleaving (A, B, C, A, B, C, ...) exposes every variant to the same background load on a
    shared machine; CPU time (time.process_time) is nearly load-independent but does not count
    work done in worker processes.
    """
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 entries")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    entries = args.entries or (10_000 if args.quick else 100_000)

    start = time.perf_counter()
    log = generate_log(entries, seed=1)
    generated = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-audit-verify-") as tmp:
        folder = Path(tmp) / "log"
        log.write(folder)
        size_mb = (folder / "entries.jsonl").stat().st_size / 1e6
        keyring = Keyring(log.operator.public_key)
        checks: list[tuple[VerifyKey, bytes, bytes]] = []
        keys: dict[str, VerifyKey] = {}
        for index, entry in enumerate(log.entries):
            key = keys.get(entry.key_id) or keys.setdefault(
                entry.key_id, VerifyKey(keyring.public_key(entry.key_id)))
            checks.append((key, entry.signing_input(), b64decode(entry.signature)))
            keyring.apply(entry, index)
        del log
        gc.collect()

        def baseline() -> None:
            for key, message, signature in checks:
                key.verify(message, signature)

        def verify(workers: int | None) -> None:
            report = verify_export(folder, workers=workers)
            assert report.ok and report.entries == entries, report.problem

        workers = default_workers()
        results = _measure({"baseline": baseline, "pooled": lambda: verify(workers),
                            "single": lambda: verify(0)}, args.repeat)

    print(f"entries: {entries:,} ({size_mb:.1f} MB of entries.jsonl; generated in {generated:.1f} s, "
          f"not timed); cpus: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}")
    labels = {"baseline": "baseline: raw PyNaCl verify, 1 thread",
              "pooled": f"audit verify ({workers} signature worker processes)",
              "single": "audit verify (no worker process)"}
    for name, label in labels.items():
        wall, cpu = results[name]
        print(f"  {label:<46} {wall:7.3f} s  {entries / wall:>9,.0f} entries/s  "
              f"{wall / entries * 1e6:6.1f} us/entry  (CPU in this process {cpu:7.3f} s)")
    base = results["baseline"][0]
    print(f"ratio (baseline time / verify time, target >= 0.80): {base / results['pooled'][0]:.2f} "
          f"with {workers} worker process(es), {base / results['single'][0]:.2f} with none; "
          f"CPU-time ratio with none: {results['baseline'][1] / results['single'][1]:.2f}")


if __name__ == "__main__":
    main()
