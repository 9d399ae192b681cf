"""The demo's report: `report.json` (machine-readable) and `report.html` (plots, offline).

`assemble_report` builds the report from the system's own records only: the coordinator's study
(decisions, status), the verified audit log export (round metrics, the hospitals' signed
receipts, the escrow and payout entries), the coordinator's ledger balances, and what each
hospital's node holds (its privacy ledger plan and charges, and the consent gating of its
training records at each receipt's instant, recomputed with the ClientApp's own gate and checked
against the receipt's commitment). Nothing is estimated or invented: a value the records do not
hold is absent, and every cross-check that fails is listed in `checks`.

The HTML page embeds its plots as inline SVG (matplotlib, Agg backend), so it opens with no
network access and no external assets.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from matplotlib.ticker import MaxNLocator

from audit.entry import Entry
from audit.rewards import Receipt as PayoutReceipt
from audit.rewards import StudyTerms, compute_payout, payout_credits, payout_pools

REQUIRED_HOSPITAL_FIELDS = ("id", "records_used", "records_excluded", "epsilon_spent", "delta",
                            "noise_multiplier", "sample_rate", "steps", "tokens_paid")


class ReportError(ValueError):
    """The report data lacks a field the report promises."""


def validate_report(report: dict[str, Any]) -> None:
    """Check the shape promised in the README before anything is written."""
    for key in ("study", "rounds", "hospitals"):
        if key not in report:
            raise ReportError(f"report: missing {key!r}")
    metric = report_metric(report)
    for i, round_ in enumerate(report["rounds"]):
        if not isinstance(round_.get("round"), int) or not isinstance(round_.get(metric), float):
            raise ReportError(f"rounds[{i}]: needs integer 'round' and float {metric!r}")
    for i, hospital in enumerate(report["hospitals"]):
        missing = [name for name in REQUIRED_HOSPITAL_FIELDS if name not in hospital]
        if missing:
            raise ReportError(f"hospitals[{i}]: missing {missing}")


def holdout_by_hospital(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{hospital: {metric: value}} from a round's `eval_{metric}@{hospital}` keys: each hospital's
    metrics computed on its own hold-out patients from its charged, noised release."""
    out: dict[str, dict[str, float]] = {}
    for key, raw in metrics.items():
        if not key.startswith("eval_") or "@" not in key:
            continue
        name, hospital = key[len("eval_"):].split("@", 1)
        value = _float(raw)
        if value is not None and name and hospital:
            out.setdefault(hospital.removeprefix("hospital:"), {})[name] = value
    return dict(sorted(out.items()))


def report_metric(report: Mapping[str, Any]) -> str:
    """The round metric the report leads with: "accuracy", or "concordance" for survival."""
    return str(report.get("study", {}).get("metric") or "accuracy")


def _svg(fig: Any) -> Markup:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])  # drop the XML prolog: inline in HTML


def _accuracy_plot(rounds: list[dict[str, Any]], metric: str = "accuracy") -> Markup:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["round"] for r in rounds], [r[metric] for r in rounds], marker="o")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"global {metric}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _svg(fig)


def _bar_plot(labels: list[str], values: list[float], ylabel: str) -> Markup:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color="#4878a8")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def _payout_groups(payouts: dict[str, int]) -> tuple[list[str], list[float]]:
    """One bar per hospital and author; the (many, pseudonymous) reward accounts as one bar,
    so the plot stays readable with hundreds of contributors (the table lists each)."""
    grouped: dict[str, float] = {}
    rewards = [amount for account, amount in payouts.items() if account.startswith("reward:")]
    for account, amount in sorted(payouts.items()):
        if not account.startswith("reward:"):
            grouped[account] = amount
    if rewards:
        grouped[f"{len(rewards)} reward accounts"] = sum(rewards)
    return list(grouped), list(grouped.values())


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
    payouts = dict(report.get("payouts", {}))
    for hospital, pooled in report.get("claim_pools", {}).items():
        payouts[f"claim pools: {hospital}"] = pooled
    return env.get_template("report.html.j2").render(
        report=report, metric=report_metric(report),
        accuracy_svg=_accuracy_plot(report["rounds"], report_metric(report)) if report["rounds"] else None,
        epsilon_svg=_bar_plot([h["id"] for h in hospitals],
                              [h["epsilon_spent"] for h in hospitals], "epsilon spent"),
        records_svg=_records_plot(hospitals),
        payouts_svg=_bar_plot(*_payout_groups(payouts), "tokens") if payouts else None,
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


# -- assembling the report from real records ---------------------------------------------------

@dataclass(frozen=True)
class RoundGating:
    """What consent allowed at one hospital at one receipt's instant (recomputed with the
    ClientApp's gate over the node's exported site files)."""

    eligible: int
    excluded: Mapping[str, int]
    commitment: str


@dataclass(frozen=True)
class HospitalRecords:
    """One hospital's own records about the study (read from its node)."""

    id: str
    #: federated.accounting.DPPlan as a dict (None: the hospital never trained this study)
    plan: Mapping[str, Any] | None = None
    #: the privacy ledger's charges: {"round", "epsilon" (cumulative), "increment"}
    charges: Sequence[Mapping[str, Any]] = ()
    epsilon_spent: float = 0.0
    train_records: int = 0
    held_out_records: int = 0
    #: round -> gating at that round's receipt instant
    gating: Mapping[int, RoundGating] = field(default_factory=dict)
    #: the node's own latest decision {"decision", "reasons", "eligible_records", "decided_by"}
    node_decision: Mapping[str, Any] | None = None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _study_entries(entries: Sequence[Entry], study_id: str) -> dict[str, list[Entry]]:
    found: dict[str, list[Entry]] = {}
    for entry in entries:
        if isinstance(entry.payload, dict) and entry.payload.get("study_id") == study_id:
            found.setdefault(entry.kind, []).append(entry)
    return found


def assemble_report(*, study: Mapping[str, Any], entries: Sequence[Entry], balances: Mapping[str, Any],
                    hospitals: Sequence[HospitalRecords], audit: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report (see the module docstring). `study` is the coordinator's GET /v1/studies/{id}
    answer, `entries` the verified log export, `balances` GET /v1/ledger/balances (operator).

    Per hospital, `records_used` is the sum of `records_used` over its receipts (the weights the
    payout uses, in record-rounds) and `records_excluded` the sum over the same rounds of the
    records consent excluded, by reason, so that used + excluded = training records x rounds.
    """
    study_id = str(study["id"])
    spec = dict(study.get("spec") or {})
    kinds = _study_entries(entries, study_id)
    receipts = sorted(kinds.get("round.receipt", []),
                      key=lambda e: (e.payload["round"], e.payload["hospital"]))
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    # rounds: the coordinator's signed study.round entries (metrics from the ServerApp)
    rounds: list[dict[str, Any]] = []
    metric = "concordance" if spec.get("task") == "survival" else "accuracy"
    for entry in sorted(kinds.get("study.round", []), key=lambda e: e.payload["round"]):
        metrics = dict(entry.payload.get("metrics") or {})
        number = int(entry.payload["round"])
        row: dict[str, Any] = {"round": number, "time": entry.time}
        # accuracy (survival: concordance): exact on the PUBLIC reference sample when the study
        # has one (no privacy cost), else the hospitals' noised hold-out estimate
        # (federated.evaluation)
        value = _float(metrics.get(f"ref_{metric}"))
        if value is None:
            value = _float(metrics.get(f"eval_{metric}"))
        if value is not None:
            row[metric] = value
        for name, key in (("auroc", "ref_auroc"), ("auroc", "eval_auroc"), ("loss", "ref_loss"),
                          ("loss", "eval_loss"), ("holdout_accuracy", "eval_accuracy"),
                          ("ibs", "ref_ibs"), ("holdout_concordance", "eval_concordance"),
                          ("holdout_ibs", "eval_ibs"), ("holdout_macro_f1", "eval_macro_f1"),
                          ("holdout_anchored_concordance", "eval_anchored_concordance"),
                          ("eval_examples", "eval_examples"), ("eval_epsilon", "eval_epsilon"),
                          ("wall_s", "round_wall_s"), ("compute_max_s", "train_compute_max_s"),
                          ("overhead_s", "overhead_s"),
                          # where a round's time goes (docs/benchmarks/scale.md, "First round")
                          ("start_s", "start_s"), ("setup_s", "setup_s"), ("join_wait_s", "join_wait_s"),
                          ("push_s", "train_push_s"), ("dispatch_s", "train_dispatch_max_s"),
                          ("return_s", "train_return_max_s"), ("aggregate_s", "aggregate_s")):
            if name in row:
                continue
            value = _float(metrics.get(key))
            if value is not None:
                row[name] = value
        # each hospital's charged, noised hold-out metrics (federated.eval_stats), "eval_X@hospital"
        per_hospital = holdout_by_hospital(metrics)
        if per_hospital:
            row["holdout_by_hospital"] = per_hospital
        row["hospitals"] = [h.removeprefix("hospital:") for h in entry.payload.get("hospitals", [])]
        row["records_used"] = {r.payload["hospital"].removeprefix("hospital:"): int(r.payload["records_used"])
                               for r in receipts if r.payload["round"] == number}
        rounds.append(row)
    check(f"every round has an evaluated {metric}", all(metric in r for r in rounds),
          ", ".join(str(r["round"]) for r in rounds if metric not in r))

    # payout: the log's study.payout entry, recomputed from the escrow terms and the receipts
    payout_entries = kinds.get("study.payout", [])
    payout = dict(payout_entries[-1].payload) if payout_entries else None
    escrow = kinds.get("study.escrow", [])
    if payout is not None and escrow:
        terms_payload = escrow[0].payload
        terms = StudyTerms(royalty_account=terms_payload["royalty_account"],
                           royalty_bps=terms_payload["royalty_bps"], forward_bps=terms_payload["forward_bps"])
        expected = compute_payout(study_id, payout["amount"], terms, [
            PayoutReceipt(study_id=study_id, round=r.payload["round"], hospital=r.payload["hospital"],
                          records_used=r.payload["records_used"],
                          rewards=r.payload.get("rewards")) for r in receipts])
        check("payout equals compute_payout(escrow terms, receipts)", expected == payout)
        check("the whole escrow was paid out", payout["amount"] == escrow[0].payload["amount"],
              f"paid {payout['amount']} of {escrow[0].payload['amount']}")
    credits = payout_credits(payout) if payout is not None else {}
    pools = payout_pools(payout) if payout is not None else {}
    held = dict(balances.get("balances") or {})
    if credits:
        wrong = {a: (c, held.get(a)) for a, c in credits.items() if held.get(a) != c}
        check("coordinator balances equal the payout credits", not wrong,
              "; ".join(f"{a}: credited {c}, balance {b}" for a, (c, b) in sorted(wrong.items())))
    minted, in_escrow = balances.get("minted"), balances.get("escrow")
    unclaimed = int(balances.get("unclaimed") or 0)
    if isinstance(minted, int) and isinstance(in_escrow, int):
        check("conservation: minted = sum(balances) + escrow + unclaimed",
              minted == sum(held.values()) + in_escrow + unclaimed,
              f"minted {minted}, balances {sum(held.values())}, escrow {in_escrow}, unclaimed {unclaimed}")
    parts = {p["hospital"].removeprefix("hospital:"): p for p in (payout or {}).get("hospitals", [])}

    decisions = {d["hospital_id"]: d for d in study.get("decisions", [])}
    hospital_rows: list[dict[str, Any]] = []
    for records in sorted(hospitals, key=lambda h: h.id):
        mine = [r for r in receipts if r.payload["hospital"] == f"hospital:{records.id}"]
        excluded: dict[str, int] = {}
        per_round: list[dict[str, Any]] = []
        for receipt in mine:
            number = int(receipt.payload["round"])
            gating = records.gating.get(number)
            item: dict[str, Any] = {"round": number, "records_used": receipt.payload["records_used"],
                                    "epsilon_total": receipt.payload.get("epsilon_total")}
            if gating is not None:
                item["records_excluded"] = dict(sorted(gating.excluded.items()))
                for reason, count in gating.excluded.items():
                    excluded[reason] = excluded.get(reason, 0) + count
                # the receipt's commitment is keyed per study and round (consent.gate); the demo
                # holds the hospitals' keys, as an auditor they authorise would for one round
                check(f"{records.id} round {number}: receipt matches consent gating",
                      gating.commitment == receipt.payload.get("commitment"),
                      f"gating {gating.eligible} records; commitments differ")
            per_round.append(item)
        plan = dict(records.plan) if records.plan is not None else {}
        charged = len(records.charges)
        part = parts.get(records.id)
        decision = decisions.get(records.id)
        source = "coordinator" if decision else None
        if decision is None and records.node_decision is not None:
            # Decided, but the coordinator closed decisions when the study started (enough
            # approvals came first): the node's signed decision is the record of it.
            decision = {"decision": records.node_decision["decision"],
                        "reasons": records.node_decision.get("reasons", []),
                        "eligible_records": records.node_decision.get("eligible_records")}
            source = "node (arrived after the study started; the coordinator did not take it)"
        if source == "coordinator" and records.node_decision is not None:
            check(f"{records.id}: the coordinator's decision is the node's",
                  decision is not None and decision["decision"] == records.node_decision["decision"],
                  f"coordinator {decision and decision['decision']}, "
                  f"node {records.node_decision['decision']}")
        epsilon_receipts = max((float(r.payload.get("epsilon_total") or 0.0) for r in mine), default=0.0)
        if mine:
            check(f"{records.id}: epsilon in receipts equals its privacy ledger",
                  abs(epsilon_receipts - records.epsilon_spent) < 1e-9,
                  f"receipts {epsilon_receipts}, ledger {records.epsilon_spent}")
            check(f"{records.id}: one privacy charge per receipt", charged == len(mine),
                  f"{charged} charges, {len(mine)} receipts")
        hospital_row: dict[str, Any] = {
            "id": records.id,
            "decision": decision["decision"] if decision else None,
            "decision_reasons": list(decision["reasons"]) if decision else [],
            "decision_source": source,
            "eligible_at_decision": decision.get("eligible_records") if decision else None,
            "records_used": sum(int(r.payload["records_used"]) for r in mine),
            "records_excluded": dict(sorted(excluded.items())),
            "training_records": records.train_records,
            "held_out_records": records.held_out_records,
            "rounds_trained": len(mine),
            "epsilon_spent": records.epsilon_spent,
            # the study's epsilon per patient: its DP-SGD target plus the decision count's
            "epsilon_target": spec.get("epsilon", plan.get("target_epsilon")),
            "delta": plan.get("delta", float(spec.get("delta", 0.0))),
            "noise_multiplier": plan.get("noise_multiplier", 0.0),
            "sample_rate": plan.get("sample_rate", 0.0),
            "batch_size": plan.get("batch_size"),
            "steps": int(plan.get("steps_per_round", 0)) * charged,
            "accountant": plan.get("accountant"),
            "tokens_paid": int(part["amount"]) if part else 0,
            "tokens_kept": int(part["kept"]) if part else 0,
            # the forward share goes to the hospital's reward claim pools (no account named)
            "tokens_forwarded": int(part["pool"]) if part else 0,
            "balance": held.get(f"hospital:{records.id}", 0),
            "rounds": per_round,
        }
        hospital_rows.append(hospital_row)

    report: dict[str, Any] = {
        "study": {
            "id": study_id, "title": study.get("title"), "status": str(study.get("status")),
            "purpose": spec.get("purpose"), "disease": spec.get("disease"),
            "commercial": spec.get("commercial"), "template": spec.get("template"),
            "task": spec.get("task"), "label": spec.get("label"), "columns": spec.get("columns"),
            "metric": metric, **({"event": spec["event"]} if spec.get("event") else {}),
            "epsilon": spec.get("epsilon"), "delta": spec.get("delta"),
            # every epsilon and delta in this report is per patient (federated.accounting)
            "privacy_unit": "patient",
            "rounds_planned": study.get("rounds_planned"), "rounds_completed": study.get("rounds_completed"),
            "min_hospitals": study.get("min_hospitals"), "token_budget": study.get("token_budget"),
            "model_sha256": study.get("model_sha256"), "outcome_reason": study.get("outcome_reason"),
            "submitted_at": study.get("submitted_at"), "started_at": study.get("started_at"),
            "finished_at": study.get("finished_at"),
        },
        "rounds": rounds,
        "hospitals": hospital_rows,
        "payouts": dict(sorted(credits.items())),
        # what the payout put in reward claim pools, per hospital (claimed by leaf, no account shown)
        "claim_pools": {h.removeprefix("hospital:"): sum(v for (hh, _r), v in pools.items() if hh == h)
                        for h in sorted({h for h, _r in pools})},
        "payout": payout,
        "ledger": {"minted": minted, "escrow": in_escrow, "unclaimed": unclaimed,
                   "balances": dict(sorted(held.items()))},
        "checks": checks,
    }
    if audit is not None:
        report["audit"] = dict(audit)
    if extra:
        report.update(extra)
    return report


def failed_checks(report: Mapping[str, Any]) -> list[str]:
    """Names (and details) of the report's cross-checks that failed."""
    return [f"{c['check']}" + (f" ({c['detail']})" if c.get("detail") else "")
            for c in report.get("checks", []) if not c.get("ok")]
