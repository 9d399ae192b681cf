"""`exchange demo`: a whole consortium on this machine, one study from submission to payout,
then an offline audit and a report (docs/demo.md)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def _render(progress: Any) -> Group:
    """The live view: phase, round, accuracy, per-hospital status, recent events."""
    elapsed = time.monotonic() - progress.started
    head = Text.assemble(("exchange demo  ", "bold"), (f"{elapsed:5.1f}s  ", "dim"),
                         ("phase: ", "dim"), (progress.phase, "bold cyan"))
    study = Text.assemble(("study ", "dim"), (progress.study_id or "-", ""), ("  status ", "dim"),
                          (progress.status, "bold"), ("  round ", "dim"),
                          (f"{progress.round}/{progress.rounds or '-'}", "bold"),
                          (f"  {progress.metric} ", "dim"),
                          (f"{progress.accuracy:.3f}" if progress.accuracy is not None else "-",
                           "bold green"))
    table = Table(box=None, pad_edge=False, header_style="dim")
    for column in ("hospital", "state", "decision", "records", "contracts", "used (record-rounds)",
                   "epsilon"):
        table.add_column(column)
    for hospital_id, row in list(progress.hospitals.items()):  # the main thread may add rows
        epsilon = row.get("epsilon")
        table.add_row(hospital_id, str(row.get("state", "-")), str(row.get("decision", "-")),
                      str(row.get("records", "-")), str(row.get("contracts", "-")),
                      str(row.get("records_used", "-")),
                      f"{epsilon:.3f}" if isinstance(epsilon, float) else "-")
    events = Text("\n".join(list(progress.events)), style="dim")
    return Group(head, study, table, events)


def _holdout_cell(per_hospital: dict[str, dict[str, float]]) -> str:
    """One line per hospital: its charged hold-out metrics (C and IBS, or accuracy and F1)."""
    short = {"concordance": "C", "ibs": "IBS", "accuracy": "acc", "macro_f1": "F1"}
    return "\n".join(f"{h}: " + " ".join(f"{short.get(k, k)} {v:.3f}" for k, v in sorted(m.items()))
                     for h, m in sorted(per_hospital.items())) or "-"


def _summary(console: Console, report: dict[str, Any], out: Path, wall_s: float) -> None:
    study = report["study"]
    console.print(f"\n[bold]Study {study['id']}[/bold]: {study['status']}, {len(report['rounds'])} rounds, "
                  f"target epsilon {study['epsilon']}, delta {study['delta']}")
    rounds = Table(title="Rounds", header_style="bold")
    metric = str(study.get("metric") or "accuracy")
    second, second_key = ("IBS", "ibs") if metric == "concordance" else ("AUROC", "auroc")
    held = any("holdout_by_hospital" in r for r in report["rounds"])
    columns: tuple[str, ...] = ("round", metric, second, "records used")
    if held:
        columns += ("hold-out per hospital (noised)",)
    for column in columns:
        rounds.add_column(column, justify="right")
    for r in report["rounds"]:
        cells = [str(r["round"]), f"{r.get(metric, float('nan')):.4f}",
                 f"{r[second_key]:.4f}" if second_key in r else "-", str(sum(r["records_used"].values()))]
        if held:
            cells.append(_holdout_cell(r.get("holdout_by_hospital", {})))
        rounds.add_row(*cells)
    console.print(rounds)
    hospitals = Table(title="Hospitals (records in record-rounds)", header_style="bold")
    for column in ("hospital", "decision", "used", "excluded", "epsilon", "noise", "q", "steps", "tokens"):
        hospitals.add_column(column, justify="right", no_wrap=column != "excluded")
    for h in report["hospitals"]:
        excluded = "\n".join(f"{n} {reason}" for reason, n in h["records_excluded"].items()) or "-"
        tokens = f"{h['tokens_paid']}" + (f"\n({h['tokens_forwarded']} to reward claim pools)"
                                          if h["tokens_forwarded"] else "")
        hospitals.add_row(h["id"], str(h["decision"]), str(h["records_used"]), excluded,
                          f"{h['epsilon_spent']:.3f}", f"{h['noise_multiplier']:.2f}",
                          f"{h['sample_rate']:.3f}", str(h["steps"]), tokens)
    console.print(hospitals)
    for h in report["hospitals"]:
        if h["decision"] == "refuse":
            console.print(f"[yellow]{h['id']} refused[/yellow]: {'; '.join(h['decision_reasons'])}")
    for item in report.get("revoked_records_excluded_after_import", []):
        after = item["rounds_after_revocation"]
        console.print(f"{item['hospital']}: {item['revoked']} patients revoked consent mid-study; "
                      + (f"rounds {', '.join(map(str, after))} trained without them "
                         f"({item['revoked_still_used']} revoked records used)" if after
                         else "it took effect after the last round"))
    audit = report.get("audit", {})
    console.print(f"Audit log: {audit.get('entries')} entries exported to {audit.get('export')} and verified "
                  f"(`audit verify`): [green]OK[/green]")
    checks = report["checks"]
    console.print(f"Cross-checks: {sum(c['ok'] for c in checks)}/{len(checks)} passed")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.get("timings_s", {}).items())
    console.print(f"Timings: {timings}; total {wall_s:.1f}s")
    console.print(f"Report: {out / 'report.html'} and {out / 'report.json'}")


def demo(  # noqa: PLR0917 (Typer maps parameters to options)
    out: Annotated[Path, typer.Option(
        "--out", help="Output folder (report, audit export, work files).")] = Path("demo-out"),
    db: Annotated[str | None, typer.Option("--db", help="Coordinator database URL (default: SQLite in "
                                                        "OUT/work).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=50, help="Federated rounds.")] = 5,
    epsilon: Annotated[float, typer.Option("--epsilon", min=0.1, max=10.0,
                                           help="The study's privacy target (epsilon).")] = 3.0,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live progress display.")] = True,
    witnesses: Annotated[bool, typer.Option(
        "--witnesses/--no-witnesses",
        help="Hospitals cosign the log's checkpoints; the export verifies with their quorum.")] = True,
    study: Annotated[str, typer.Option(
        "--study", help="Which study: breast-cancer (logistic regression, the default) or survival "
                        "(Cox model on flchain; docs/survival.md).")] = "breast-cancer",
    hosts: Annotated[str, typer.Option(
        "--hosts", help="loopback (every party on 127.0.0.1) or netns: each hospital on a network "
                        "host of its own, the coordinator over HTTPS (needs root; docs/demo.md)."),
    ] = "loopback",
) -> None:
    """Run a whole consortium on this machine: coordinator, SuperLink, three hospital nodes;
    one study from submission to payout; audit export verified; report in OUT."""
    from exchange.demo.consortium import Consortium, DemoConfig, DemoError, Progress
    from exchange.demo.report import failed_checks
    from exchange.demo.studies import STUDIES

    if study not in STUDIES:
        raise typer.BadParameter(f"unknown study {study!r}; choose one of {', '.join(sorted(STUDIES))}",
                                 param_hint="--study")

    if hosts not in ("loopback", "netns"):
        raise typer.BadParameter(f"unknown placement {hosts!r}; choose loopback or netns",
                                 param_hint="--hosts")
    if hosts == "netns":
        from exchange.demo.hosts import netns_available

        why = netns_available()
        if why is not None:
            raise typer.BadParameter(f"netns: {why}", param_hint="--hosts")
    if db is not None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(db)
        except ArgumentError as exc:
            raise typer.BadParameter(f"not a database URL ({exc})", param_hint="--db") from exc
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file, not a folder", param_hint="--out")
    if out.exists() and any(out.iterdir()):
        if not (out / "report.json").exists() and not (out / "work").exists():
            raise typer.BadParameter(f"{out} exists and is not a demo output folder; choose another",
                                     param_hint="--out")
        import shutil

        shutil.rmtree(out)  # a previous demo's output: start clean
    # Not a terminal (a log, CI): wide enough that the summary tables keep their columns.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    progress = Progress()
    consortium = Consortium(DemoConfig(out=out, db_url=db, rounds=rounds, epsilon=epsilon,
                                       witnesses=witnesses, study=study, hosts=hosts), progress)
    progress.metric = STUDIES[study].metric

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    view: Live | None = None
    report: dict[str, Any] | None = None
    try:
        if live and console.is_terminal:
            view = Live(_render(progress), console=console, refresh_per_second=4, transient=False,
                        get_renderable=lambda: _render(progress))
            view.start()
        else:
            last = [""]

            def print_phase() -> None:
                if progress.phase != last[0]:
                    last[0] = progress.phase
                    console.print(f"[{time.monotonic() - started:6.1f}s] {progress.phase}")
            consortium.on_update = print_phase
        report = consortium.run()
    except KeyboardInterrupt:
        if view is not None:
            view.stop()
            view = None
        console.print("[yellow]interrupted: stopping every process the demo started[/yellow]")
        consortium.stop()
        raise typer.Exit(130) from None
    except Exception as exc:  # DemoError says what failed; anything else is named by its type
        if view is not None:
            view.stop()
            view = None
        message = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
        console.print(f"demo failed in phase {progress.phase!r}: {message}", style="red", highlight=False,
                      markup=False)
        console.print(f"logs: {out / 'work'}/*/daemon.log, {out / 'work'}/*/logs/, "
                      f"{out / 'work' / 'superlink' / 'superlink.log'}")
        consortium.stop()
        raise typer.Exit(1) from None
    finally:
        if view is not None:
            view.stop()
        consortium.stop()
        signal.signal(signal.SIGTERM, previous)
    wall = time.monotonic() - started
    _summary(console, report, out, wall)
    bad = failed_checks(report)
    if bad:
        for line in bad:
            console.print(f"[red]check failed:[/red] {line}", highlight=False)
        raise typer.Exit(1)
    sys.stdout.flush()
