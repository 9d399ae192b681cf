"""How `exchange study list|watch|report` show studies in a terminal (rich tables, a live
progress bar). Kept apart from the command bodies so the polling loop and the rendering can be
tested without a terminal, and the commands stay argument parsing and printing."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

#: States a study does not leave.
FINAL = frozenset({"completed", "failed", "cancelled", "expired"})


def _console() -> Console:
    # soft_wrap keeps long ids whole when the output is captured (pipes, tests)
    return Console(soft_wrap=True)


def print_list(items: list[Mapping[str, Any]]) -> None:
    """One line per study: id, state, submitted, organisation, title."""
    table = Table("id", "status", "submitted", "organisation", "title", title=f"{len(items)} studies")
    for item in items:
        table.add_row(str(item["id"]), str(item["status"]), str(item["submitted_at"])[:19],
                      str(item["organisation_id"]), str(item["title"]))
    _console().print(table)


def study_panel(study: Mapping[str, Any]) -> Group:
    """What `watch` shows for one poll: the state line, a bar of rounds done and one row per
    hospital that decided (its decision and first reason)."""
    planned = int(study.get("rounds_planned") or 0)
    done = int(study.get("rounds_completed") or 0)
    progress = Progress(TextColumn("rounds"), BarColumn(), TaskProgressColumn(),
                        TextColumn(f"{done}/{planned}"))
    progress.add_task("rounds", total=max(planned, 1), completed=min(done, planned))
    header = (f"[bold]{study.get('id')}[/bold] {study.get('title', '')}: {study.get('status')} "
              f"({study.get('approvals', 0)} approved of {study.get('min_hospitals')} needed, "
              f"{study.get('refusals', 0)} refused)")
    hospitals = Table("hospital", "decision", "reason", expand=False)
    for decision in study.get("decisions") or []:
        reasons = decision.get("reasons") or [""]
        late = " (late)" if decision.get("late") else ""
        hospitals.add_row(str(decision.get("hospital_id")), f"{decision.get('decision')}{late}",
                          str(reasons[0])[:100])
    parts: list[Any] = [header, progress, hospitals]
    if study.get("outcome_reason"):
        parts.append(f"reason: {study['outcome_reason']}")
    return Group(*parts)


def watch_study(fetch: Callable[[], Mapping[str, Any]], *, interval: float, timeout: float | None,
                console: Console | None = None) -> Mapping[str, Any] | None:
    """Poll `fetch` every `interval` seconds and redraw until the study is in a final state;
    returns its last view, or None when `timeout` passed first."""
    console = console or _console()
    deadline = None if timeout is None else time.monotonic() + timeout
    study = fetch()
    with Live(study_panel(study), console=console, refresh_per_second=4, transient=False) as live:
        while str(study.get("status")) not in FINAL:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval)
            study = fetch()
            live.update(study_panel(study))
    return study


def print_report(report: Mapping[str, Any]) -> None:
    """The privacy report as tables: the terms, one row per hospital, one row per round."""
    console = _console()
    terms = report.get("terms", {})
    console.print(f"[bold]{report.get('study_id')}[/bold] ({report.get('status')}), privacy per "
                  f"{report.get('unit', 'patient')}: target epsilon {terms.get('epsilon')}, delta "
                  f"{terms.get('delta')}, {terms.get('rounds')} rounds of {terms.get('steps_per_round')} "
                  f"steps, accountant {terms.get('accountant')}")
    hospitals = Table("hospital", "decision", "rounds", "epsilon spent", "of which decision", "delta",
                      "steps", "noise", "sample rate", "accountant", title="per hospital")

    def number(value: Any, form: str) -> str:
        return "" if value is None else format(value, form)

    for h in report.get("hospitals", []):
        hospitals.add_row(str(h["hospital_id"]), str(h.get("decision")), str(h["rounds_trained"]),
                          f"{h['epsilon_spent']:.4g}", number(h.get("decision_epsilon"), ".4g"),
                          number(h.get("delta"), "g"), str(h["steps"]),
                          number(h.get("noise_multiplier"), ".3g"), number(h.get("sample_rate"), ".3g"),
                          str(h["accountant"]))
    console.print(hospitals)
    for hospital, reasons in (report.get("exclusions", {}).get("refused_by") or {}).items():
        console.print(f"{hospital} refused: " + "; ".join(reasons))
    rounds = Table("round", "contributors", "no data", "refused", "dropped", "epsilon max", title="per round")
    for r in report.get("rounds", []):
        metrics, out = r.get("metrics", {}), r.get("hospitals_excluded", {})
        rounds.add_row(str(r["round"]) + (" (failed)" if r.get("failed") else ""),
                       f"{metrics.get('contributors', 0):g}", str(out.get("no_data", 0)),
                       str(out.get("refused", 0)), str(out.get("dropped", 0)),
                       f"{metrics.get('epsilon_max', 0):.4g}")
    console.print(rounds)
    console.print(f"withheld: {report.get('withheld')}")
    console.print(f"exclusions: {report.get('exclusions', {}).get('note')}")
