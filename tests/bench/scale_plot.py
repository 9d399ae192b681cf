"""The plot of `bench_scale`: round overhead and memory per hospital against the number of
hospitals, with the issue's targets drawn in (issue "Scale": a plot of each figure against its
size, so the growth is visible).

    .venv/bin/python -m tests.bench.scale_plot results.json docs/benchmarks/scale-hospitals.svg

`results.json` is a list of `bench_scale` result objects (what `bench_scale --json` writes).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Targets of the issue: round overhead at 3 hospitals (warm) and at 25, memory per hospital.
OVERHEAD_TARGETS = ((3, 1.0), (25, 3.0))
MEMORY_TARGET_MB = 400.0


def plot(results: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Two panels: per-round overhead beyond training (rounds 2+, and the whole first round's
    overhead) and memory per hospital (peak RSS and PSS of daemon + Flower process), each
    against the number of hospitals; plain rounds only when both kinds are present."""
    rows = sorted((r for r in results if not r.get("secure_aggregation")), key=lambda r: r["hospitals"])
    xs = [r["hospitals"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(xs, [r["overhead_s"] for r in rows], marker="o", label="overhead per round (rounds 2+)")
    first = [(r["hospitals"], r["first_round"]["overhead_s"]) for r in rows if r.get("first_round")]
    if first:
        left.plot([h for h, _ in first], [v for _, v in first], marker="s", linestyle="--",
                  label="first round, beyond training")
    left.scatter([h for h, _ in OVERHEAD_TARGETS], [v for _, v in OVERHEAD_TARGETS], marker="x", color="red",
                 zorder=3, label="target")
    left.set_xlabel("hospitals")
    left.set_ylabel("seconds")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7)
    right.plot(xs, [r["rss_per_hospital_mb"] for r in rows], marker="o", label="RSS (own host)")
    right.plot(xs, [r.get("pss_per_hospital_mb") for r in rows], marker="s", linestyle="--",
               label="PSS (share on one machine)")
    right.axhline(MEMORY_TARGET_MB, color="red", linewidth=0.8, label="target")
    right.set_xlabel("hospitals")
    right.set_ylabel("MiB per hospital")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})  # no timestamp: a stable file in git
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m tests.bench.scale_plot RESULTS.json OUT.svg [TITLE]")
    results = json.loads(Path(args[0]).read_text())
    print(plot(results, Path(args[1]), title=args[2] if len(args) == 3 else ""))


if __name__ == "__main__":
    main()
