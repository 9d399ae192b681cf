"""The plot of `bench_scale`: round overhead and memory per hospital against the number of
hospitals, with the issue's targets drawn in (issue "Scale": a plot of each figure against its
size, so the growth is visible).

    .venv/bin/python -m tests.bench.scale_plot h3.json h10.json h25.json docs/benchmarks/scale-hospitals.svg

Each `results.json` is a list of `bench_scale` result objects (what `bench_scale --json` writes);
the rows of several files are drawn together (`merge_rows`: a size measured in several runs, one
file per size, is drawn from the last file that has it), so sizes measured in separate runs (25
hospitals needs the machine to itself) share one plot. The rows the docs draw are kept in
docs/benchmarks/data/scale-hospitals.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Targets of the issue: round overhead at 3 hospitals (warm) and at 25, memory per hospital.
OVERHEAD_TARGETS = ((3, 1.0), (25, 3.0))
MEMORY_TARGET_MB = 400.0


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The result objects of one `bench_scale --json` file (a JSON list, or one object)."""
    loaded = json.loads(path.read_text())
    return list(loaded) if isinstance(loaded, list) else [loaded]


def merge_rows(groups: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (hospitals, secure aggregation), the last group's where several have it (a
    rerun replaces the earlier measurement), sorted by hospitals then plain before SecAgg+;
    rows without a round measurement (a run whose study never trained) are left out."""
    merged: dict[tuple[int, bool], dict[str, Any]] = {}
    for group in groups:
        for row in group:
            if row.get("overhead_s") is None or row["overhead_s"] != row["overhead_s"]:  # None or NaN
                continue
            merged[(int(row["hospitals"]), bool(row.get("secure_aggregation")))] = row
    return [merged[key] for key in sorted(merged)]


def _series(rows: Sequence[dict[str, Any]], secure: bool) -> list[dict[str, Any]]:
    chosen = [r for r in rows if bool(r.get("secure_aggregation")) == secure]
    return sorted(chosen, key=lambda r: r["hospitals"])


#: the parts whose CPU seconds per round `bench_scale` measures (`cpu_by_round`)
CPU_PARTS = ("superlink", "coordinator", "hospitals")


def cpu_per_round(row: dict[str, Any]) -> dict[str, float] | None:
    """The mean CPU seconds per round (rounds 2+, else all) of each of `CPU_PARTS`, from a
    row's `cpu_by_round`; None for a row measured before the bench took it."""
    rounds = row.get("cpu_by_round") or []
    steady = [r for r in rounds if r.get("round", 0) >= 2] or rounds
    if not steady:
        return None
    return {who: sum(float(r[f"{who}_cpu_s"]) for r in steady) / len(steady) for who in CPU_PARTS}


def plot(results: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Three panels, each against the number of hospitals: per-round overhead beyond training
    (rounds 2+, and the whole first round's overhead), the CPU seconds per round of the
    SuperLink, the coordinator (with the ServerApp) and all hospitals together, and memory per
    hospital (peak RSS and PSS of daemon + Flower process); SecAgg+ rows, where there are any,
    as a second overhead line. Each point of the overhead panel is labelled with the load average
    its run started at (a 2-core machine shared with other work: the load moves the timings
    more than the size; CPU seconds much less)."""
    rows = _series(results, secure=False)
    secure_rows = _series(results, secure=True)
    xs = [r["hospitals"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(12, 3.4))
    left.plot(xs, [r["overhead_s"] for r in rows], marker="o", label="overhead per round (rounds 2+)")
    for r in rows:
        if r.get("load_start") is not None:
            left.annotate(f"load {r['load_start']:.0f}", (r["hospitals"], r["overhead_s"]), fontsize=6,
                          textcoords="offset points", xytext=(3, -9))
    first = [(r["hospitals"], r["first_round"]["overhead_s"]) for r in rows if r.get("first_round")]
    if first:
        left.plot([h for h, _ in first], [v for _, v in first], marker="s", linestyle="--",
                  label="first round, beyond training")
    if secure_rows:
        left.plot([r["hospitals"] for r in secure_rows], [r["overhead_s"] for r in secure_rows], marker="^",
                  linestyle=":", label="overhead per round, SecAgg+")
    left.scatter([h for h, _ in OVERHEAD_TARGETS], [v for _, v in OVERHEAD_TARGETS], marker="x", color="red",
                 zorder=3, label="target")
    left.set_xlabel("hospitals")
    left.set_ylabel("seconds")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7)
    cpu = [(r["hospitals"], parts) for r in rows if (parts := cpu_per_round(r)) is not None]
    for who, marker in zip(CPU_PARTS, ("o", "s", "^"), strict=True):
        middle.plot([h for h, _ in cpu], [parts[who] for _, parts in cpu], marker=marker, label=who)
    middle.set_xlabel("hospitals")
    middle.set_ylabel("CPU seconds per round (rounds 2+)")
    middle.set_ylim(bottom=0)
    middle.legend(fontsize=7)
    right.plot(xs, [r["rss_per_hospital_mb"] for r in rows], marker="o", label="RSS (own host)")
    right.plot(xs, [r.get("pss_per_hospital_mb") for r in rows], marker="s", linestyle="--",
               label="PSS (share on one machine)")
    right.axhline(MEMORY_TARGET_MB, color="red", linewidth=0.8, label="target")
    right.set_xlabel("hospitals")
    right.set_ylabel("MiB per hospital")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    for ax in (left, middle, right):
        ax.set_xticks(sorted({*xs, *(r["hospitals"] for r in secure_rows)}))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # no timestamp and text kept as text: a stable, smaller file that diffs in git
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="draw bench_scale results against the number of hospitals")
    parser.add_argument("results", type=Path, nargs="+", help="bench_scale --json files (later ones win)")
    parser.add_argument("out", type=Path, help="the SVG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--save-rows", type=Path, default=None, metavar="JSON",
                        help="also write the merged rows here (docs/benchmarks/data/scale-hospitals.json)")
    args = parser.parse_args(argv)
    rows = merge_rows(read_rows(path) for path in args.results)
    if args.save_rows is not None:
        args.save_rows.write_text(json.dumps(rows, indent=1) + "\n")
    print(plot(rows, args.out, title=args.title))


if __name__ == "__main__":
    main()
