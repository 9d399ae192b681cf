"""`audit fetch` over loopback vs a plain HTTP download of the same bytes.

    .venv/bin/python -m tests.bench.bench_audit_fetch            # 100,000 entries
    .venv/bin/python -m tests.bench.bench_audit_fetch --quick    # 10,000 entries

Set-up (not timed): `write_generated_log(DIR, N, seed=1, witnesses=3)`, the same log written as
tiles (`audit tiles`), both served from disk by tests/audit/export_server.py (a threaded
http.server on 127.0.0.1, the contract of docs/audit-log.md "Fetching over HTTP").

Timed, interleaved, best of `--repeat`:
- baseline: one GET of the plain entries.jsonl (the same bytes), streamed to a file with httpx;
- fetch (JSON API): `audit.fetch.fetch_api`, checkpoint + trust + entries in pages of 10,000,
  written as an export folder (fsynced, renamed into place), without verifying;
- fetch (tiles): `audit.fetch.fetch_tiles`, checkpoint + entry bundles, 8 in parallel;
- verify: `verify_export` of the fetched folder with the default workers (what `audit fetch`
  runs after downloading), for scale.
Ratio = baseline time / fetch time (1.0: as fast as the plain download).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from audit.fetch import fetch_api, fetch_tiles
from audit.generate import write_generated_log
from audit.tiles import write_tiles
from audit.verify import default_workers, verify_export
from tests.audit.export_server import API_KEY, ExportServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 entries")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    entries = args.entries or (10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-audit-fetch-") as tmp:
        root = Path(tmp)
        export = root / "served"
        started = time.perf_counter()
        write_generated_log(export, entries, seed=1, witnesses=3)
        lines = (raw[:-1] for raw in (export / "entries.jsonl").open("rb"))
        write_tiles(root / "tiles", lines, (export / "checkpoint").read_text(), None)
        shutil.copy(export / "trust.json", root / "tiles" / "trust.json")
        generated = time.perf_counter() - started
        size = (export / "entries.jsonl").stat().st_size
        with ExportServer(export, root / "tiles") as server:

            def baseline() -> None:
                with httpx.Client() as client, (root / "plain.jsonl").open("wb") as out, \
                        client.stream("GET", server.url + "/raw/entries.jsonl") as response:
                    for chunk in response.iter_bytes(1 << 16):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())

            def api() -> None:
                fetch_api(server.url, root / "api", api_key=API_KEY, overwrite=True)

            def tiles() -> None:
                fetch_tiles(server.url + "/tiles", root / "tiled", parallel=8, overwrite=True)

            runs: dict[str, Callable[[], None]] = {"baseline": baseline, "api": api,
                                                   "tiles": tiles}
            best = {name: float("inf") for name in runs}
            for _ in range(args.repeat):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - started)
            assert (root / "api" / "entries.jsonl").read_bytes() == (root / "plain.jsonl").read_bytes()
            assert (root / "tiled" / "entries.jsonl").read_bytes() == (root / "plain.jsonl").read_bytes()
            started = time.perf_counter()
            report = verify_export(root / "api", workers=default_workers())
            verified = time.perf_counter() - started
            assert report.ok, report.problem
    print(f"entries: {entries:,} ({size / 1e6:.1f} MB of entries.jsonl; generated in "
          f"{generated:.1f} s, not timed); cpus: {os.cpu_count()}; load average: "
          f"{os.getloadavg()[0]:.1f}")
    labels = {"baseline": "baseline: one plain GET of entries.jsonl",
              "api": "audit fetch, JSON API (pages of 10,000)",
              "tiles": "audit fetch --tiles (8 bundles in parallel)"}
    for name, label in labels.items():
        wall = best[name]
        print(f"  {label:<45} {wall:7.3f} s  {size / wall / 1e6:7.1f} MB/s  "
              f"{entries / wall:>10,.0f} entries/s  ratio {best['baseline'] / wall:.2f}")
    print(f"  then verifying the fetched export ({default_workers()} worker(s)): {verified:.3f} s "
          f"({entries / verified:,.0f} entries/s)")


if __name__ == "__main__":
    main()
