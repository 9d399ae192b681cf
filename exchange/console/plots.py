"""Metrics per round as inline SVG, drawn on the server.

Why not matplotlib (which the demo report uses): a page view must stay cheap, and a line chart
of a few rounds is a handful of SVG elements. Each chart has a <title> and <desc> for screen
readers, and the page shows the same numbers in a table next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 360, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 32


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(name: str, points: Sequence[tuple[int, float]]) -> Markup:
    """An SVG line chart of `points` (round, value), labelled axes, min/max ticks."""
    label = escape(name)
    if not points:
        return Markup(f'<p class="muted">No rounds with {label} yet.</p>')
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"/>' for x, y in points)
    desc = ", ".join(f"round {x}: {_fmt(y)}" for x, y in points)
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'aria-labelledby="chart-{label}-t chart-{label}-d" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="chart-{label}-t">{label} per round</title>'
        f'<desc id="chart-{label}-d">{escape(desc)}</desc>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>'
        f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{LEFT}" y="{HEIGHT - 14}" text-anchor="middle">{x0}</text>'
        f'<text x="{LEFT + plot_w}" y="{HEIGHT - 14}" text-anchor="middle">{x1}</text>'
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 2}" text-anchor="middle">round</text>'
        f'<polyline class="series" points="{path}"/><g class="dots">{dots}</g></svg>'
    )


def metric_series(rounds: Sequence[dict[str, object]]) -> dict[str, list[tuple[int, float]]]:
    """{metric name: [(round, value)]} for every numeric metric the rounds report."""
    series: dict[str, list[tuple[int, float]]] = {}
    for item in rounds:
        number = item.get("round")
        metrics = item.get("metrics")
        if not isinstance(number, int) or not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(str(key), []).append((number, float(value)))
    return series
