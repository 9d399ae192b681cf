"""`exchange node status`: one report (a dict, printed as tables or JSON) of where the node
stands: studies and decisions, rounds, privacy budget spent and left (epsilon and delta; the
hospital's worst-case patient as a sum and as the tighter PRV composition; how many patients are
near or at their lifetime cap, never who), the last errors."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from exchange.node.decisions import current_budget, latest_decision, rejection
from exchange.node.models import ConsentContractRow, ErrorRow, Record, RoundRow, StudyRow
from exchange.node.patient_budget import patient_counts
from exchange.node.policy import StudyView
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from exchange.node.witnessing import inclusion_status, witness_status


def study_request_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The request a steward decides on (title, who asks, purpose, disease, columns, label,
    privacy, rounds, the start deadline), from the study as the coordinator sent it."""
    spec: dict[str, Any] = document.get("spec") or {}
    view = StudyView.from_json(document)
    return {
        "title": spec.get("title"),
        "organisation": view.organisation, "region": view.region, "researcher": view.researcher,
        "purpose": view.purpose, "disease": view.disease, "commercial": view.commercial,
        "ethics_approval": spec.get("ethics_approval"),
        "methods_development": spec.get("methods_development"),
        "columns": view.columns, "label": view.label, "event": view.event, "task": view.task,
        "template": spec.get("template"),
        "epsilon": view.epsilon, "delta": view.delta,
        "rounds": view.rounds or document.get("rounds_planned"),
        "min_hospitals": document.get("min_hospitals"),
        "submitted_at": document.get("submitted_at"),
        "start_deadline": document.get("start_deadline") or spec.get("start_deadline"),
    }


def collect_status(store: NodeStore, settings: NodeSettings, errors: int = 5) -> dict[str, Any]:
    ledger = site_ledger(store.engine, settings.policy)
    budget = current_budget(store, settings)
    with store.sessions() as session:
        studies = []
        for row in session.execute(select(StudyRow).order_by(StudyRow.first_seen)).scalars():
            decision = latest_decision(session, row.study_id)
            rounds = session.execute(select(func.count()).select_from(RoundRow)
                                     .where(RoundRow.study_id == row.study_id)).scalar_one()
            studies.append({
                "study_id": row.study_id, "status": row.status,
                # what the study asks, as the coordinator sent it: the steward decides on this
                "request": study_request_summary(row.document),
                "decision": decision.decision if decision else None,
                "decided_by": decision.decided_by if decision else None,
                "reasons": decision.reasons if decision else [],
                "eligible_records": decision.eligible_records if decision else None,
                "posted": bool(decision and decision.posted_at),
                # the coordinator refused our decision (status, reason, when): it does not count
                "rejected": rejection(session, row.study_id),
                "rounds": rounds, "epsilon_spent": ledger.spent(row.study_id),
                "evaluation_epsilon_spent": ledger.evaluation_spent(row.study_id),
            })
        last_errors = [{"at": e.at, "component": e.component, "message": e.message}
                       for e in session.execute(select(ErrorRow).order_by(ErrorRow.id.desc())
                                                .limit(errors)).scalars()]
        records = session.execute(select(func.count()).select_from(Record)).scalar_one()
        contracts = session.execute(select(func.count()).select_from(ConsentContractRow)).scalar_one()
        patients = patient_counts(session, ledger, settings.policy.total_privacy_budget)
    composition = ledger.composition()
    daemon = store.get_state("daemon", {"state": "never started"})
    return {
        "hospital_id": settings.hospital_id,
        "daemon": daemon,
        # the log as this node witnesses it, and its own entries' inclusion (witnessing.py)
        "witness": witness_status(settings),
        "inclusion": inclusion_status(store),
        "registered": store.get_state("registered") is not None,
        "records": records,
        "contracts": contracts,
        "privacy": {"total": budget.total, "spent": budget.spent, "reserved": budget.reserved,
                    "left": budget.left, "delta_total": budget.delta_total,
                    "delta_spent": budget.delta_spent, "delta_reserved": budget.delta_reserved,
                    "max_delta": settings.policy.max_delta,
                    # the worst-case patient over every study, per patient
                    "patient_epsilon_sum": composition.epsilon_sum,
                    "patient_epsilon_composed": composition.epsilon_composed,
                    "patient_delta": composition.delta,
                    "patients": patients},
        "studies": studies,
        "errors": last_errors,
    }
