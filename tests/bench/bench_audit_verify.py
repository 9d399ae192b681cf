"""`audit verify` throughput vs raw PyNaCl verification of the same signatures, and its memory.

    .venv/bin/python -m tests.bench.bench_audit_verify                      # 100,000 entries
    .venv/bin/python -m tests.bench.bench_audit_verify --quick              # 10,000 entries
    .venv/bin/python -m tests.bench.bench_audit_verify --entries 1000000 --repeat 1
    .venv/bin/python -m tests.bench.bench_audit_verify --export /tmp/log1m --entries 1000000

Set-up (not timed): `audit.generate.write_generated_log(DIR, N, seed=1, witnesses=3)`, the same
folder `audit generate --entries N --out DIR --seed 1 --witnesses 3` writes: a realistic log
whose checkpoint three hospitals cosigned (the trust policy's quorum of 2 is checked).

Timed, best of `--repeat` runs, interleaved so every variant sees the same background load:
- baseline: `VerifyKey.verify(message, signature)` for every entry, one thread, in this process,
  with the VerifyKey objects, signed messages and raw signatures prepared beforehand: the bare
  cost of the Ed25519 checks, nothing else;
- `verify_export(DIR)`: what `audit verify DIR` runs (canonical check, envelope, replay check,
  keyring, every signature, token ledger, tree, checkpoint signature, witness quorum), each run in
  a fresh Python process so that its peak RSS is its own: with the default number of signature
  worker processes (one per spare core, at most 2) and with none. (A worker holds the modules
  and the batches it is given, 512 entries each; its memory does not grow with the log.)
Ratio = baseline time / verify time (1.0: as fast as bare signature checks on one core; target
>= 0.8). The CPU-time ratio of the variant without workers is also printed: it hardly depends
on the load of a shared machine. Peak RSS: of the verifying process (target: <= 200 MB for
1,000,000 entries).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nacl.signing import VerifyKey

RESULT_TAG = "RESULT "


def _child(folder: Path, workers: int) -> None:
    """Run one verification in this fresh process and print its numbers as one JSON line."""
    from audit.verify import verify_export

    wall, cpu = time.perf_counter(), time.process_time()
    report = verify_export(folder, workers=workers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not report.ok:
        raise SystemExit(f"verification failed: {report.problem}")
    print(RESULT_TAG + json.dumps({"wall": wall, "cpu": cpu, "entries": report.entries,
                                   "rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec: VmHWM. (getrusage's ru_maxrss is no use here: it
    keeps the peak of the forked parent across exec, and the parent holds every signature.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(folder: Path, workers: int, tree: Path | None = None) -> dict[str, float]:
    """Verify in a fresh process; with `tree`, with the code of that source tree instead."""
    command = [sys.executable, "-m", "tests.bench.bench_audit_verify", "--child", str(folder),
               "--workers", str(workers)]
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tree, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result: dict[str, float] = json.loads(line[len(RESULT_TAG):])
            return result
    raise SystemExit(f"verification process failed ({done.returncode}): {done.stderr[-2000:]}")


def _baseline_checks(folder: Path) -> list[tuple[VerifyKey, bytes, bytes]]:
    """(key, signed bytes, signature) of every entry, as the verifier derives them (not timed)."""
    from audit.export import read_trust
    from audit.keyring import Keyring
    from audit.signing import b64decode
    from audit.verify import envelope_from_json, signing_input_from_line

    keyring = Keyring(read_trust(folder / "trust.json").operator_public_key)
    keys: dict[str, VerifyKey] = {}
    checks = []
    with (folder / "entries.jsonl").open("rb") as handle:
        for index, raw in enumerate(handle):
            line = raw[:-1]
            entry = envelope_from_json(json.loads(line))
            key = keys.get(entry.key_id) or keys.setdefault(
                entry.key_id, VerifyKey(keyring.public_key(entry.key_id)))
            checks.append((key, signing_input_from_line(line, entry), b64decode(entry.signature)))
            keyring.apply(entry, index)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 entries")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None,
                        help="also time the no-worker verify of this source tree (e.g. `git "
                             "archive` of an earlier commit), in the same interleaved runs")
    parser.add_argument("--export", type=Path, default=None,
                        help="verify the export in this folder, generating it there first if it "
                             "does not exist (so that a 1,000,000-entry export is made once)")
    parser.add_argument("--no-workers-only", action="store_true",
                        help="skip the variant with signature worker processes (a 1,000,000-entry "
                             "run on a loaded machine is long enough without it)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.workers)
        return
    from audit.generate import write_generated_log
    from audit.verify import default_workers

    entries = args.entries or (10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-audit-verify-") as tmp:
        folder = args.export.resolve() if args.export is not None else Path(tmp) / "log"
        start = time.perf_counter()
        if (folder / "checkpoint").exists():
            print(f"  (the existing export in {folder})", flush=True)
        else:
            write_generated_log(folder, entries, seed=1, witnesses=3)
            print(f"  (generated {entries:,} entries in {time.perf_counter() - start:.1f} s)",
                  flush=True)
        generated = time.perf_counter() - start
        size_mb = (folder / "entries.jsonl").stat().st_size / 1e6
        checks = _baseline_checks(folder)
        entries = len(checks)  # (an existing --export may hold another number)
        gc.collect()

        def baseline() -> dict[str, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            for key, message, signature in checks:
                key.verify(message, signature)
            return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

        workers = default_workers()
        runs: dict[str, Callable[[], dict[str, float]]] = {
            "baseline": baseline, "pooled": lambda: _run_child(folder, workers),
            "single": lambda: _run_child(folder, 0)}
        if args.no_workers_only:
            del runs["pooled"]
        before = args.before.resolve() if args.before is not None else None
        if before is not None:
            runs["before"] = lambda: _run_child(folder, 0, before)
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeat):
            for name, run in runs.items():
                result = run()
                # each run as it ends (a 1M-entry run takes long on a loaded machine)
                print(f"  ({name}: {json.dumps(result)})", flush=True)
                if name not in best:
                    best[name] = result
                else:
                    for metric in ("wall", "cpu"):
                        best[name][metric] = min(best[name][metric], result[metric])
                    if "rss_mb" in result:
                        best[name]["rss_mb"] = max(best[name]["rss_mb"], result["rss_mb"])

    print(f"entries: {entries:,} ({size_mb:.1f} MB of entries.jsonl, checkpoint cosigned by 3 "
          f"witnesses; generated in {generated:.1f} s, not timed); cpus: {os.cpu_count()}; "
          f"load average: {os.getloadavg()[0]:.1f}")
    labels = {"baseline": "baseline: raw PyNaCl verify, 1 thread",
              "pooled": f"audit verify ({workers} signature worker processes)",
              "single": "audit verify (no worker process)"}
    for name, label in labels.items():
        if name not in best:
            continue
        result = best[name]
        wall = result["wall"]
        memory = f"  peak RSS {result['rss_mb']:.0f} MB" if "rss_mb" in result else ""
        print(f"  {label:<46} {wall:8.3f} s  {entries / wall:>9,.0f} entries/s  "
              f"{wall / entries * 1e6:6.1f} us/entry  (CPU in its process {result['cpu']:7.3f} s)"
              f"{memory}")
    base = best["baseline"]["wall"]
    pooled = (f"{base / best['pooled']['wall']:.2f} with {workers} worker process(es), "
              if "pooled" in best else "")
    print(f"ratio (baseline time / verify time, target >= 0.80): {pooled}"
          f"{base / best['single']['wall']:.2f} with none; CPU-time ratio with none: "
          f"{best['baseline']['cpu'] / best['single']['cpu']:.2f}")
    print(f"single core (no worker process) vs raw PyNaCl verification on one core, same run: "
          f"{best['baseline']['cpu'] / best['single']['cpu']:.2f} (CPU time), "
          f"{base / best['single']['wall']:.2f} (wall)")
    if "before" in best:
        print(f"before ({args.before}), no worker process, same run: CPU-time ratio "
              f"{best['baseline']['cpu'] / best['before']['cpu']:.2f} "
              f"({best['before']['cpu'] / entries * 1e6:.1f} us/entry of CPU vs "
              f"{best['single']['cpu'] / entries * 1e6:.1f} now, "
              f"{best['baseline']['cpu'] / entries * 1e6:.1f} raw PyNaCl)")
    peak = max(result["rss_mb"] for name, result in best.items() if "rss_mb" in result
               and name != "before")
    print(f"peak RSS of a verifying process: {peak:.0f} MB (target <= 200 MB at 1,000,000 entries)")


if __name__ == "__main__":
    main()
