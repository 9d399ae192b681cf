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
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from nacl.signing import VerifyKey

from audit.generate import generate_log
from audit.keyring import Keyring
from audit.signing import b64decode
from audit.verify import default_workers, verify_export


def _best(repeat: int, run: object) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
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

        base = _best(args.repeat, baseline)
        pooled = _best(args.repeat, lambda: verify(default_workers()))
        single = _best(args.repeat, lambda: verify(0))

    print(f"entries: {entries:,} ({size_mb:.1f} MB of entries.jsonl; generated in {generated:.1f} s, "
          f"not timed); cpus: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}")
    rows = [("baseline: raw PyNaCl verify, 1 thread", base),
            (f"audit verify (default: {default_workers()} signature processes)", pooled),
            ("audit verify (no worker process)", single)]
    for name, seconds in rows:
        print(f"  {name:<46} {seconds:7.3f} s  {entries / seconds:>9,.0f} entries/s  "
              f"{seconds / entries * 1e6:6.1f} us/entry")
    print(f"ratio (baseline time / verify time): default {base / pooled:.2f}, "
          f"no worker process {base / single:.2f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
