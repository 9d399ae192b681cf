"""Each patient's lifetime privacy budget as the node sees it: at decision time (who could take
part in a study) and in `exchange node status` (counts only).

The spend itself is kept by the ClientApp in the privacy ledger (`federated.privacy_ledger`,
table `privacy_patient_spend`, node migration 0003): every study a patient took part in, and how
far. A patient's cap is their consent contract's `max_epsilon`, or the site's
`total_privacy_budget` when it names none. Nothing here leaves the hospital: status shows how many
patients are near or at their cap, never who.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from exchange.node.eligibility import LifetimeCheck, current_contracts
from exchange.node.policy import StudyView
from federated.privacy_ledger import PrivacyLedger

#: A patient with at least this share of their cap spent is "near" it.
NEAR_SHARE = 0.8
#: ... and with less than this share left, "at" it.
AT_SHARE = 0.01


def lifetime_check(ledger: PrivacyLedger, study: StudyView, default_cap: float) -> LifetimeCheck:
    """What `exchange.node.eligibility.count_eligible` asks: (patients the ledger would admit to
    `study` with its target, patients it would leave out for their lifetime cap)."""
    def check(caps: Mapping[str, float | None]) -> tuple[int, int]:
        admission = ledger.admissible(study.study_id, study.epsilon, caps, default_cap)
        return len(admission.admitted), admission.over_cap

    return check


def patient_counts(session: Session, ledger: PrivacyLedger, default_cap: float) -> dict[str, Any]:
    """How many patients have spent privacy here, and how many are near or at their lifetime
    cap (counts only; a patient's own spend never leaves the node)."""
    spend = ledger.patient_spend()
    caps: dict[str, float] = {}
    for pseudonym, document in current_contracts(session).items():
        cap = document.get("max_epsilon") if isinstance(document, dict) else None
        if isinstance(cap, int | float) and not isinstance(cap, bool):
            caps[pseudonym] = min(float(cap), default_cap)
    near = at = 0
    for pseudonym, patient in spend.items():
        cap = caps.get(pseudonym, default_cap)
        if cap <= 0 or patient.epsilon >= cap * (1 - AT_SHARE):
            at += 1
        elif patient.epsilon >= cap * NEAR_SHARE:
            near += 1
    return {"with_spend": len(spend), "near_cap": near, "at_cap": at,
            "near_cap_share": NEAR_SHARE, "at_cap_share": 1 - AT_SHARE}
