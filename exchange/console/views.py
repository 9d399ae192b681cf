"""What the console's pages show, read through the coordinator's registry, the study lifecycle
and the audit log.

Each function applies the same authorization as the API endpoint that returns the same data:
pages call `allow(...)` with the API's roles, and the services apply the organisation rules.
Nothing here shows a reward account or a patient pseudonym: payouts show per-hospital totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from audit.checkpoint import parse_checkpoint
from audit.note import SIGNATURE_PREFIX
from audit.signing import b64encode
from audit.store import AuditLog, audit_checkpoints
from audit.trust import Trust
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Hospital, RequestNonce, Role
from exchange.coordinator.registry import Principal
from exchange.study.models import StudyStatus

PAYOUT_KINDS = ("study.payout", "study.refund")


def payouts(log: AuditLog, study_id: str, chunk: int = 512) -> list[dict[str, Any]]:
    """The study's payout or refund entries: per hospital what it kept and what went to its
    reward claim pools (payouts name no reward account, docs/rewards.md). Read backwards from
    the log's end in chunks, stopping at the study's own study.submit entry: a payout is always
    appended after it."""
    found: list[dict[str, Any]] = []
    stop = log.size()
    while stop > 0:
        start = max(0, stop - chunk)
        entries = list(log.entries(start, stop))
        for offset in range(len(entries) - 1, -1, -1):
            entry = entries[offset]
            if entry.payload.get("study_id") != study_id:
                continue
            if entry.kind == "study.submit":
                return found
            if entry.kind in PAYOUT_KINDS:
                found.insert(0, _payout(start + offset, entry.kind, entry.payload))
        stop = start
    return found


def _payout(index: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    hospitals = [
        {
            "hospital": h.get("hospital"),
            "records": h.get("records"),
            "amount": h.get("amount"),
            "kept": h.get("kept"),
            # the forward share, put in the hospital's reward claim pools
            "forwarded": int(h.get("pool", 0)),
        }
        for h in payload.get("hospitals", [])
        if isinstance(h, dict)
    ]
    royalty = payload.get("royalty")
    return {
        "index": index,
        "kind": kind,
        "amount": payload.get("amount"),
        "hospitals": hospitals,
        "royalty": royalty.get("amount") if isinstance(royalty, dict) else None,
    }


def privacy_report(study: dict[str, Any], results: dict[str, Any] | None) -> dict[str, Any]:
    """The study's privacy terms against what each hospital reports having spent."""
    spec = study.get("spec") or {}
    rows = []
    for item in (results or {}).get("contributions", []):
        spent = item.get("epsilon_spent")
        rows.append(
            {
                "hospital_id": item["hospital_id"],
                "rounds": item["rounds"],
                "records_used": item["records_used"],
                "epsilon_spent": spent,
                "within": spent is None or spent <= float(spec.get("epsilon", 0)) + 1e-9,
            }
        )
    return {"epsilon": spec.get("epsilon"), "delta": spec.get("delta"), "unit": "patient", "rows": rows}


def progress(study: dict[str, Any]) -> dict[str, Any]:
    """The small JSON the study page polls for its live progress."""
    planned = int(study.get("rounds_planned") or 0)
    done = int(study.get("rounds_completed") or 0)
    status = study["status"]
    return {
        "id": study["id"],
        "status": str(getattr(status, "value", status)),
        "rounds_completed": done,
        "rounds_planned": planned,
        "approvals": study.get("approvals", 0),
        "refusals": study.get("refusals", 0),
        "min_hospitals": study.get("min_hospitals"),
        "terminal": status in (StudyStatus.COMPLETED, StudyStatus.FAILED, StudyStatus.CANCELLED),
        "outcome_reason": study.get("outcome_reason"),
    }


def last_contact(journal: Journal, hospitals: Iterable[Hospital]) -> dict[str, Any]:
    """hospital id -> the time of its latest signed request still on record (request nonces are
    kept for the replay window and a little beyond), or None."""
    by_key = {h.signing_key_id: h.id for h in hospitals}
    if not by_key:
        return {}
    with journal.read_engine.connect() as connection:
        rows = connection.execute(
            select(RequestNonce.key_id, func.max(RequestNonce.created_at))
            .where(RequestNonce.key_id.in_(list(by_key)))
            .group_by(RequestNonce.key_id)
        ).all()
    return {by_key[kid]: when for kid, when in rows}


@dataclass(frozen=True)
class CheckpointView:
    note: str
    size: int
    root_b64: str
    origin: str
    signers: list[str]  # the key names of the note's signature lines
    cosigners: list[str]  # the lines not made by the log key: witnesses' cosignatures


def checkpoint_view(note: str, origin: str) -> CheckpointView:
    parsed = parse_checkpoint(note)
    names = [
        line[len(SIGNATURE_PREFIX) :].split(" ", 1)[0]
        for line in note.rsplit("\n\n", maxsplit=1)[-1].splitlines()
        if line.startswith(SIGNATURE_PREFIX)
    ]
    return CheckpointView(
        note=note,
        size=parsed.size,
        root_b64=b64encode(parsed.root),
        origin=origin,
        signers=names,
        cosigners=[n for n in names if n != origin],
    )


def stored_checkpoints(log: AuditLog, limit: int = 20) -> list[dict[str, Any]]:
    """The latest stored checkpoints (size, time), newest first: the earlier ones an auditor
    checks the current log's consistency with."""
    c = audit_checkpoints.c
    with log.engine.connect() as connection:
        rows = connection.execute(select(c.size, c.created_at).order_by(c.size.desc()).limit(limit)).all()
    return [{"size": r.size, "created_at": r.created_at} for r in rows]


def stored_checkpoint(log: AuditLog, size: int) -> str | None:
    c = audit_checkpoints.c
    with log.engine.connect() as connection:
        note = connection.execute(select(c.note).where(c.size == size)).scalar_one_or_none()
    return None if note is None else str(note)


def can_see_results(principal: Principal) -> bool:
    """As the API: results and the model are for the study's researchers only."""
    return principal.role == Role.RESEARCHER


def current_trust(state: Any) -> Trust:
    """The trust policy now: the log's anchors and the witnesses REGISTERED in the log (the
    checkpointing service replays them from the log's key entries), as /v1/audit/trust serves it;
    the start-up policy when the app runs without checkpointing."""
    checkpointing = getattr(state, "checkpointing", None)
    trust: Trust = checkpointing.trust() if checkpointing is not None else state.trust
    return trust


def witness_column(state: Any, hospital_id: str) -> dict[str, str]:
    """The operator's view of one hospital's witness: matched by the witness key the hospital
    registered in the log (its name, e.g. "h-one.witness", is not the hospital id), with the
    coordinator's record of it (`Checkpointing.witness_states`). {"state", "text"}."""
    checkpointing = getattr(state, "checkpointing", None)
    name = checkpointing.witness_of(hospital_id) if checkpointing is not None else None
    if checkpointing is None or name is None:
        return {"state": "none", "text": "not a witness"}
    seen = checkpointing.witness_states().get(name)
    if seen is None:
        return {"state": "behind", "text": f"{name}: registered, not yet seen"}
    cosigned = "no cosignature yet" if seen.cosigned_size is None else (
        f"last cosigned {seen.cosigned_size} of {seen.newest_size} entries")
    if seen.state == "cosigned":
        return {"state": "cosigned",
                "text": f"{name}: cosigned the latest checkpoint ({seen.newest_size} entries)"}
    if seen.state == "alarm":
        return {"state": "alarm", "text": f"{name}: ALARM, {seen.reason}; {cosigned}"}
    return {"state": "behind", "text": f"{name}: behind, {cosigned}"}


def cosigned_note(state: Any, log: AuditLog) -> str | None:
    """The checkpoint to show with its cosignatures: what /v1/audit/checkpoint serves when
    witnesses are registered (cosignatures live with the checkpointing service, not in the stored
    note), else the latest stored checkpoint."""
    checkpointing = getattr(state, "checkpointing", None)
    if checkpointing is not None and checkpointing.trust().witnesses:
        note: str = checkpointing.served_note()
        return note
    return log.latest_checkpoint()
