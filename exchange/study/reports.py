"""A study's privacy report, built from what the coordinator holds: the signed receipts, the
hospitals' decisions, the round entries and the study's public terms.

Why a module of its own: the report is a read over the log's own records (never the runner's
bookkeeping), the same figures the auditor can recompute from an export, and it must say
exactly what it cannot show. Per docs/privacy.md ("Counts"), nothing here is an exact count of a
hospital's patients. A hospital's noise multiplier and sample rate are sized from its NOISED
decision count (already released and charged: `federated.accounting.plan_patients`), so each
hospital signs them into its receipts (`accounting`) and the report shows them, with how the
hospital's epsilon composes: its decision count's epsilon plus its DP-SGD epsilon. Exclusions
are released the way the hospitals release them: count-free decision reasons, and per round how
many hospitals had no data, refused or dropped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from exchange.coordinator import problems
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Organisation, Role
from exchange.coordinator.registry import Principal
from exchange.study.models import ReceiptRow, Study, StudyDecision, StudyRound
from exchange.study.spec import AcceptedStudy, study_spec

#: What the report cannot show, and why (docs/privacy.md, "Counts").
WITHHELD = ("no exact patient or record count of any hospital; each hospital's noise_multiplier and "
            "sample_rate are sized from its noised decision count and come from its signed receipts "
            "(null for a hospital whose receipts carry no accounting)")
#: What leaves a hospital about records left out (docs/privacy.md, "Counts").
EXCLUSIONS_NOTE = ("records excluded by consent, the study's terms or lifetime privacy caps are "
                   "counted only inside each hospital; what leaves is count-free: decision "
                   "reasons, and per round how many hospitals had no data, refused or dropped")


def _public_plan(study: Study, region: str) -> dict[str, Any]:
    """The study's DP terms as every hospital plans them: accountant, steps per round, batch."""
    from federated.templates import get_template

    spec = study_spec(AcceptedStudy(study_id=study.id, spec=study.spec, organisation_id=study.organisation_id,
                                    region=region, researcher_id=study.researcher_id))
    defaults = get_template(spec.template).defaults
    return {"accountant": spec.accountant, "steps_per_round": spec.local_steps or defaults.local_steps,
            "batch_size": spec.batch_size or defaults.batch_size, "clip": spec.clip or defaults.clip,
            "epsilon": spec.epsilon, "delta": spec.delta, "rounds": spec.rounds}


def _blank(plan: dict[str, Any]) -> dict[str, Any]:
    """A hospital's figures before any receipt."""
    return {"rounds_trained": 0, "epsilon_spent": 0.0, "decision_epsilon": None, "training_epsilon": None,
            "delta": None, "steps": 0, "accountant": plan["accountant"], "noise_multiplier": None,
            "sample_rate": None}


def _accounting(value: Any) -> dict[str, Any] | None:
    """A receipt's `accounting` (`federated.receipts`), already checked when the receipt was
    logged; None when the receipt carries none."""
    if not isinstance(value, dict):
        return None
    return {"decision_epsilon": float(value["decision_epsilon"]),
            "training_epsilon": float(value["training_epsilon"]),
            "noise_multiplier": float(value["noise_multiplier"]), "sample_rate": float(value["sample_rate"]),
            "steps_per_round": int(value["steps_per_round"]), "accountant": str(value["accountant"])}


def privacy_report(session: Session, study: Study) -> dict[str, Any]:
    """The report of `study` (already checked visible to the caller)."""
    decisions = session.scalars(select(StudyDecision).where(StudyDecision.study_id == study.id)
                                .order_by(StudyDecision.id)).all()
    receipts = session.scalars(select(ReceiptRow).where(ReceiptRow.study_id == study.id)
                               .order_by(ReceiptRow.round, ReceiptRow.hospital_id)).all()
    rounds = session.scalars(select(StudyRound).where(StudyRound.study_id == study.id)
                             .order_by(StudyRound.round)).all()
    organisation = session.get(Organisation, study.organisation_id)
    plan = _public_plan(study, organisation.region if organisation is not None else "")
    hospitals: dict[str, dict[str, Any]] = {}
    for d in decisions:
        hospitals[d.hospital_id] = {
            "hospital_id": d.hospital_id, "decision": d.decision.value, "late": d.late,
            "reasons": list(d.reasons), **_blank(plan)}
    for r in receipts:
        item = hospitals.setdefault(r.hospital_id, {
            "hospital_id": r.hospital_id, "decision": None, "late": False, "reasons": [], **_blank(plan)})
        payload = r.entry.get("payload", {})
        item["rounds_trained"] += 1
        accounting = _accounting(payload.get("accounting"))
        item["steps"] += accounting["steps_per_round"] if accounting else plan["steps_per_round"]
        total = payload.get("epsilon_total")
        if isinstance(total, int | float) and not isinstance(total, bool) and total >= item["epsilon_spent"]:
            # the hospital's accountant composes the rounds: the latest total is the spend
            item["epsilon_spent"] = float(total)
            if accounting:
                item.update({k: accounting[k] for k in ("decision_epsilon", "training_epsilon",
                                                        "noise_multiplier", "sample_rate", "accountant")})
        delta = payload.get("delta")
        if isinstance(delta, int | float) and not isinstance(delta, bool):
            item["delta"] = float(delta)
    per_round = [{"round": r.round, "failed": r.failed, "finished_at": r.finished_at.isoformat(),
                  "metrics": dict(r.metrics),
                  "hospitals_excluded": {key: int(r.metrics.get(key, 0.0) or 0)
                                         for key in ("no_data", "refused", "dropped")}}
                 for r in rounds]
    return {
        "study_id": study.id, "status": study.status.value, "unit": "patient",
        "terms": plan,
        "hospitals": [hospitals[k] for k in sorted(hospitals)],
        "exclusions": {
            "refused_by": {k: v["reasons"] for k, v in sorted(hospitals.items())
                           if v["decision"] == "refuse"},
            "note": EXCLUSIONS_NOTE},
        "withheld": WITHHELD,
        "rounds": per_round,
    }


def study_report(journal: Journal, principal: Principal, study_id: str) -> dict[str, Any]:
    """GET /v1/studies/{id}/report: a researcher sees its organisation's studies only (another's
    answers as a missing one, so ids cannot be probed); operators and auditors see every one."""
    with journal.read() as session:
        study = session.get(Study, study_id)
        if study is None or (principal.role == Role.RESEARCHER
                             and study.organisation_id != principal.organisation_id):
            raise problems.not_found(f"study {study_id!r}")
        return privacy_report(session, study)
