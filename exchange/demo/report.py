"""The demo's report: `report.json` (machine-readable) and `report.html` (plots, offline).

The HTML page embeds its plots as inline SVG (matplotlib, Agg backend), so it opens with no
network access and no external assets.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

REQUIRED_HOSPITAL_FIELDS = ("id", "records_used", "records_excluded", "epsilon_spent", "delta",
                            "noise_multiplier", "sample_rate", "steps", "tokens_paid")


class ReportError(ValueError):
    """The report data lacks a field the report promises."""


def validate_report(report: dict[str, Any]) -> None:
    """Check the shape promised in the README before anything is written."""
    for key in ("study", "rounds", "hospitals"):
        if key not in report:
            raise ReportError(f"report: missing {key!r}")
    for i, round_ in enumerate(report["rounds"]):
        if not isinstance(round_.get("round"), int) or not isinstance(round_.get("accuracy"), float):
            raise ReportError(f"rounds[{i}]: needs integer 'round' and float 'accuracy'")
    for i, hospital in enumerate(report["hospitals"]):
        missing = [name for name in REQUIRED_HOSPITAL_FIELDS if name not in hospital]
        if missing:
            raise ReportError(f"hospitals[{i}]: missing {missing}")


def _svg(fig: Any) -> Markup:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])  # drop the XML prolog: inline in HTML


def _accuracy_plot(rounds: list[dict[str, Any]]) -> Markup:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["round"] for r in rounds], [r["accuracy"] for r in rounds], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("global accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _svg(fig)


def _bar_plot(labels: list[str], values: list[float], ylabel: str) -> Markup:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color="#4878a8")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def _records_plot(hospitals: list[dict[str, Any]]) -> Markup:
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [h["id"] for h in hospitals]
    used = [h["records_used"] for h in hospitals]
    ax.bar(labels, used, label="used")
    bottom = list(used)
    reasons = sorted({reason for h in hospitals for reason in h["records_excluded"]})
    for reason in reasons:
        counts = [h["records_excluded"].get(reason, 0) for h in hospitals]
        ax.bar(labels, counts, bottom=bottom, label=f"excluded: {reason}")
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylabel("records")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def render_html(report: dict[str, Any]) -> str:
    validate_report(report)
    hospitals = report["hospitals"]
    env = Environment(loader=PackageLoader("exchange.demo", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    payouts = report.get("payouts", {})
    return env.get_template("report.html.j2").render(
        report=report,
        accuracy_svg=_accuracy_plot(report["rounds"]) if report["rounds"] else None,
        epsilon_svg=_bar_plot([h["id"] for h in hospitals],
                              [h["epsilon_spent"] for h in hospitals], "epsilon spent"),
        records_svg=_records_plot(hospitals),
        payouts_svg=_bar_plot(list(payouts), list(payouts.values()), "tokens") if payouts else None,
    )


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `out_dir`; returns their paths."""
    html = render_html(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    html_path = out_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    html_path.write_text(html)
    return json_path, html_path
