"""Plots of the scale benchmarks' figures against their size (issue "Scale": "a table and a plot
of each figure against its size, so the growth is visible").

    .venv/bin/python -m tests.bench.plot_scale            # both, from docs/benchmarks/data/
    .venv/bin/python -m tests.bench.plot_scale --log results.jsonl --studies studies.jsonl

Inputs: the JSON lines `bench_log_scale --json` and `bench_studies --json` write (one object per
size, or per mode). Outputs: SVG files next to the Markdown pages that show them
(docs/benchmarks/log-scale.svg, docs/benchmarks/studies.svg). matplotlib (already a dependency:
the demo report draws with it), Agg backend, SVG without embedded fonts (`svg.fonttype` none)
and without a date in the metadata, so a re-run with the same numbers gives the same file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure(rows: int, cols: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "exchange"})
    return plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), constrained_layout=True)


def _save(fig: Any, out: Path) -> None:
    fig.savefig(out, format="svg", metadata={"Date": None})
    print(f"wrote {out}")


def plot_log(results: list[dict[str, Any]], out: Path) -> None:
    """Four panels against entries (log-log): append rates, proof latencies, times, sizes."""
    # Each figure from the latest row of its size that has it (the file is appended to, run
    # after run; a later run may skip export and verify).
    merged: dict[int, dict[str, Any]] = {}
    for result in results:
        merged.setdefault(result["entries"], {}).update(result)
    rows = sorted(merged.values(), key=lambda r: r["entries"])
    n = [r["entries"] for r in rows]
    fig, axes = _figure(2, 2)
    Key = str | tuple[str, str]
    panels: list[tuple[Any, str, list[tuple[str, Key]]]] = [
        (axes[0][0], "append (entries/s)", [("group commit, PostgreSQL", "append_per_s"),
                                            ("sign + group fsync (baseline)", "baseline_per_s")]),
        (axes[0][1], "proof latency over HTTP (ms)", [("inclusion p50", ("inclusion", "p50_ms")),
                                                      ("inclusion p99", ("inclusion", "p99_ms")),
                                                      ("consistency p50", ("consistency", "p50_ms")),
                                                      ("consistency p99", ("consistency", "p99_ms"))]),
        (axes[1][0], "time (s)", [("checkpoint", "checkpoint_s"), ("coordinator start-up", "startup_s"),
                                  ("audit export", "export_s"), ("audit verify", "verify_s")]),
        (axes[1][1], "size / memory (MB)", [("database", "database_mb"), ("export", "export_mb"),
                                            ("export peak RSS", "export_rss_mb"),
                                            ("verify peak RSS", "verify_rss_mb")]),
    ]
    for row in rows:
        row["checkpoint_s"] = row["checkpoint_ms"] / 1000
    for axis, title, series in panels:
        for label, key in series:
            values = [(x, _value(r, key)) for x, r in zip(n, rows, strict=True)]
            values = [(x, v) for x, v in values if v is not None]
            if values:
                axis.plot(*zip(*values, strict=True), marker="o", label=label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("entries in the log")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][1].axhline(20, color="grey", linestyle="--", linewidth=0.8)  # the inclusion p99 target
    _save(fig, out)


def _value(row: dict[str, Any], key: str | tuple[str, str]) -> float | None:
    if isinstance(key, tuple):
        inner = row.get(key[0])
        return None if inner is None else inner.get(key[1])
    value = row.get(key)
    return None if value is None else float(value)


def plot_studies(results: list[dict[str, Any]], out: Path) -> None:
    """Wall time against the number of studies, at once and one after another, per set-up."""
    fig, axes = _figure(1, 2)
    setups = sorted({(r["hospitals"], r["rounds"], r.get("code", "")) for r in results})
    for hospitals, rounds, code in setups:
        for mode, marker in (("at-once", "o"), ("one-after-another", "s")):
            points = sorted((r["studies"], r["wall_s"]) for r in results
                            if (r["hospitals"], r["rounds"], r.get("code", "")) == (hospitals, rounds, code)
                            and r["mode"] == mode)
            if points:
                axes[0].plot(*zip(*points, strict=True), marker=marker,
                             label=f"{mode}, {hospitals} hospitals, {rounds} rounds {code}".strip())
            loads = sorted((r["studies"], r["load"]) for r in results
                           if (r["hospitals"], r["rounds"], r.get("code", "")) == (hospitals, rounds, code)
                           and r["mode"] == mode)
            if loads:
                axes[1].plot(*zip(*loads, strict=True), marker=marker, linestyle=":",
                             label=f"{mode}, {hospitals} hospitals {code}".strip())
    axes[0].set_xlabel("studies")
    axes[0].set_ylabel("wall time, first submission to last end (s)")
    axes[0].set_title("studies at once vs one after another")
    axes[1].set_xlabel("studies")
    axes[1].set_ylabel("load average (2 cores) at the end of the mode")
    axes[1].set_title("machine load during each mode")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, default=DOCS / "data" / "log-scale.jsonl")
    parser.add_argument("--studies", type=Path, default=DOCS / "data" / "studies.jsonl")
    args = parser.parse_args(argv)
    if args.log.exists():
        plot_log(_read(args.log), DOCS / "log-scale.svg")
    if args.studies.exists():
        plot_studies(_read(args.studies), DOCS / "studies.svg")


if __name__ == "__main__":
    main()
