"""Studies seen and decisions taken: the daemon's and the steward's side of step 2 of the
study lifecycle (docs/architecture.md).

A decision is a signed envelope (`audit.entry.sign_entry`, kind `study.decision`) so the
coordinator can log it unchanged and anyone can check it came from this hospital's key.
Decisions are stored before they are posted; `posted_at` marks the coordinator's
acknowledgement, and unposted ones are retried, also after a restart, so a crash between
deciding and posting loses nothing and decides nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit.signing import Signer
from exchange.coordinator.client import decision_entry
from exchange.node.eligibility import count_eligible, gate_records
from exchange.node.models import ColumnCategory, DaemonState, DecisionRow, StudyRow
from exchange.node.outcomes import MIN_EVENTS, OutcomeSummary, Usable, min_events, usable_patients
from exchange.node.policy import Budget, Evaluation, StudyView, budget_problems, evaluate
from exchange.node.privacy import budget as compute_budget
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from federated.privacy_ledger import DecisionCount, NoiseSource, PrivacyLedger

PENDING = "pending"
APPROVED = "approved"
REFUSED = "refused"
# "rejected": the coordinator refused our decision (409 other than "already decided", e.g.
# the study had started before ours arrived); the reason is kept (`rejection`). "closed" is
# what older versions of the node stored for the same case.
REJECTED = "rejected"
# A study in a terminal status reserves no privacy budget and is not served by the SuperNode
# (`active_reservations`, `approved_active`): one the coordinator reports cancelled or expired
# (not started by its start deadline) is released when the daemon next polls.
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "closed", REJECTED})
#: The daemon_state row every approval locks (an UPDATE: a row lock on PostgreSQL, the write
#: lock on SQLite) before it re-checks the budget and stores itself.
RESERVATION_LOCK = "privacy.reservation_lock"


def SecureRandom() -> NoiseSource:  # noqa: N802 - stands in for the class (tests replace it)
    """`federated.secure_random.SecureRandom` keyed by the operating system, imported where a
    count is drawn: it needs numpy, which the daemon itself never imports (it decides in a
    forked child, `exchange.node.isolated`)."""
    from federated.secure_random import SecureRandom as Source

    return Source()


class StewardDecisionError(Exception):
    """`exchange node approve|refuse` cannot apply (unknown study, already decided, ...)."""


@dataclass(frozen=True)
class Context:
    """What a decision needs besides the study."""

    settings: NodeSettings
    signer: Signer
    #: evaluate a study in a forked child (`exchange.node.isolated`): the daemon sets it, so
    #: it never imports what gating and the outcome checks need (pyarrow, SciPy, pandas)
    isolate: bool = False


def held_columns(session: Session) -> dict[str, str]:
    return dict(session.execute(select(ColumnCategory.column, ColumnCategory.category)).tuples().all())


def latest_decision(session: Session, study_id: str) -> DecisionRow | None:
    return session.execute(select(DecisionRow).where(DecisionRow.study_id == study_id)
                           .order_by(DecisionRow.id.desc()).limit(1)).scalar()


def active_reservations(session: Session, exclude: str | None = None,
                        decision_epsilon: float = 0.0) -> list[tuple[str, float]]:
    """(study id, target epsilon) of approved studies that have not finished; the target is
    what the study spends per patient with its decision count (`StudyView.spend`)."""
    rows = session.execute(select(StudyRow).where(StudyRow.status.not_in(TERMINAL))).scalars()
    out: list[tuple[str, float]] = []
    for row in rows:
        if row.study_id == exclude:
            continue
        decision = latest_decision(session, row.study_id)
        if decision is not None and decision.decision == "approve":
            out.append((row.study_id, StudyView.from_json(row.document).spend(decision_epsilon)))
    return out


def current_budget(store: NodeStore, settings: NodeSettings, exclude: str | None = None) -> Budget:
    ledger = site_ledger(store.engine, settings.policy)
    with store.sessions() as session:
        return _budget_in(session, ledger, settings, exclude)


def _budget_in(session: Session, ledger: PrivacyLedger, settings: NodeSettings,
               exclude: str | None) -> Budget:
    active = active_reservations(session, exclude, settings.policy.decision_epsilon)
    deltas = [(study_id, StudyView.from_json(row.document).delta) for study_id, _target in active
              if (row := session.get(StudyRow, study_id)) is not None]
    return compute_budget(ledger, settings.policy.total_privacy_budget, active, deltas, exclude)


def evaluate_study(store: NodeStore, settings: NodeSettings, study: StudyView,
                   at: datetime | None = None, noise: NoiseSource | None = None) -> Evaluation:
    """Site policy + consent (and each eligible patient's lifetime budget) for `study`, as of
    `at` (default now). `noise`: the decision count's noise source (default a fresh
    `SecureRandom` keyed by the operating system; tests pass a seeded one)."""
    from exchange.node.patient_budget import lifetime_check

    at = at or datetime.now(UTC)
    budget = current_budget(store, settings, exclude=study.study_id)
    ledger = site_ledger(store.engine, settings.policy)
    lifetime = lifetime_check(ledger, study, settings.policy.total_privacy_budget)
    candidates: dict[str, float | None] = {}

    def remember(caps: Mapping[str, float | None]) -> tuple[int, int]:
        candidates.update(caps)
        return lifetime(caps)

    with store.sessions() as session:
        eligibility = count_eligible(session, study, at, remember)
        columns = held_columns(session)
        usable = _usable(session, study, at, columns)
    if usable is not None:  # only patients with a record the study can use are counted
        candidates = {p: cap for p, cap in candidates.items() if p in usable.patients}
    outcome = _survival_outcome(study, MIN_EVENTS * 10**6) if study.task == "survival" else None
    # The count-free rules first: a study they refuse draws no count and charges nobody.
    # (the smallest count that passes the site minimum also passes 1/n: every delta is below 1)
    passing = replace(eligibility, noisy_patients=max(settings.policy.min_eligible_records, 1))
    first = evaluate(settings.policy, study, passing, budget, columns, outcome=outcome)
    if first.decision == "refuse":
        return first
    events = usable.events if usable is not None and study.task == "survival" else None
    count = decision_count(ledger, settings, study, candidates, noise, events=events)
    if study.task == "survival":
        outcome = _survival_outcome(study, count.noisy_events if count.noisy_events is not None else 0)
    return evaluate(settings.policy, study, replace(eligibility, noisy_patients=count.noisy_count),
                    budget, columns, outcome=outcome)


def decision_count(ledger: PrivacyLedger, settings: NodeSettings, study: StudyView,
                   candidates: Mapping[str, float | None], noise: NoiseSource | None = None, *,
                   events: frozenset[str] | None = None) -> DecisionCount:
    """The study's decision count (and a survival study's event count), drawn at its first
    evaluation with the secure noise source and charged to each patient counted; stored in the
    ledger, so a re-evaluation (the steward's approval, a restart) reads the same count and
    charges nothing. The count's epsilon is part of the study's: the patients counted need room
    in their lifetime cap for the study's epsilon, of which training may spend the rest."""
    epsilon = settings.policy.decision_epsilon
    return ledger.decide(study.study_id, epsilon, study.training_target(epsilon), candidates,
                         settings.policy.total_privacy_budget, noise=noise or SecureRandom(), events=events)


def _usable(session: Session, study: StudyView, at: datetime, held: Mapping[str, str]) -> Usable | None:
    """The eligible patients with a record the study can use (`exchange.node.outcomes.Usable`);
    None when a column the study reads is not held (rule 7 refuses it and names it)."""
    columns = [column for names in study.columns.values() for column in names]
    needed = [*columns, study.label, *([study.event] if study.event is not None else [])]
    if not columns or any(c not in held for c in needed):
        return None
    result = gate_records(session, study, at)
    return usable_patients(session, result.eligible_pseudonyms, label=study.label, task=study.task,
                           classes=study.classes, columns=columns, event=study.event)


def _survival_outcome(study: StudyView, noisy_events: int) -> OutcomeSummary | None:
    """Rule 9's input: the study's noised event count (never the exact events) and whether a
    public subcohort holds its columns. A record whose time or event does not fit is not
    usable (left out, never refused on: `_usable`)."""
    from federated.clinical_data import public_survival_reference

    if study.event is None or not study.columns:
        return None
    columns = [column for names in study.columns.values() for column in names]
    return OutcomeSummary(time_column=study.label, event_column=study.event, records=0,
                          events=noisy_events, needed_events=min_events(len(columns)),
                          subcohort=public_survival_reference(columns, "pretrain") is not None,
                          noised=True)


def reservation_ledger(store: NodeStore, settings: NodeSettings) -> PrivacyLedger:
    """The site's privacy ledger, and the lock row, ready before an approval takes the lock
    (opening the ledger writes the policy's limits into it: not while holding SQLite's lock)."""
    if store.get_state(RESERVATION_LOCK) is None:
        try:
            with store.transaction() as session:
                session.add(DaemonState(key=RESERVATION_LOCK, value=0))
        except IntegrityError:  # another process created it first
            pass
    return site_ledger(store.engine, settings.policy)


def reserve_or_refuse(ledger: PrivacyLedger, settings: NodeSettings, session: Session,
                      view: StudyView) -> list[str]:
    """Take the reservation lock in `session`'s transaction and re-check the budget.

    Evaluating a study (consent gating) is slow and runs outside any lock, so two approvals can
    be evaluated at the same moment against the same budget. Storing one is atomic: under the
    lock, which every approval takes before it stores itself, the budget is read again from
    committed state (the other approvals included) and the reasons it no longer fits are
    returned (none: the caller stores the approval, and commits, releasing the lock)."""
    session.execute(update(DaemonState).where(DaemonState.key == RESERVATION_LOCK)
                    .values(value=datetime.now(UTC).isoformat()))
    return budget_problems(view, _budget_in(session, ledger, settings, view.study_id),
                           settings.policy.decision_epsilon)


def sign_decision(signer: Signer, hospital_id: str, study_id: str, *, decision: str,
                  reasons: list[str], eligible: int) -> dict[str, Any]:
    """The signed `study.decision` envelope, in the coordinator's format (its client helper)."""
    return decision_entry(signer, hospital_id, study_id,
                          decision="approve" if decision == "approve" else "refuse",
                          # the count stays in the node database (DecisionRow): it is not sent
                          reasons=reasons, eligible_records=None).to_json()


def _store_decision(session: Session, ctx: Context, study_id: str, *, decision: str,
                    reasons: list[str], eligible: int, decided_by: str) -> DecisionRow:
    row = DecisionRow(study_id=study_id, decision=decision, decided_by=decided_by, reasons=reasons,
                      eligible_records=eligible, created_at=datetime.now(UTC),
                      envelope=sign_decision(ctx.signer, ctx.settings.hospital_id, study_id,
                                             decision=decision, reasons=reasons, eligible=eligible))
    session.add(row)
    study = session.get(StudyRow, study_id)
    assert study is not None
    study.status = APPROVED if decision == "approve" else REFUSED
    study.updated_at = datetime.now(UTC)
    return row


def observe_study(store: NodeStore, ctx: Context, study_json: dict[str, Any]) -> StudyRow:
    """Record a study seen at the coordinator; decide on it by policy the first time.

    A study already decided keeps its decision (a restart re-reads it, never re-decides);
    its status follows the coordinator's (running, completed, ...)."""
    view = StudyView.from_json(study_json)
    now = datetime.now(UTC)
    with store.transaction() as session:
        row = session.get(StudyRow, view.study_id)
        if row is None:
            row = StudyRow(study_id=view.study_id, document=dict(study_json), status=PENDING,
                           first_seen=now, updated_at=now)
            session.add(row)
            new = True
        else:
            row.document = dict(study_json)
            new = False
        decided = latest_decision(session, view.study_id) is not None
        if not decided and view.status in TERMINAL and row.status != view.status:
            # It ended before this node decided: nothing to decide, nothing reserved.
            row.status = view.status
            row.updated_at = now
        if (decided and view.status in TERMINAL | {"running"}
                and row.status not in (view.status, "closed", REJECTED)):
            decision = latest_decision(session, view.study_id)
            if decision is not None and decision.decision == "approve":
                row.status = view.status
                row.updated_at = now
    if new or not decided:
        if view.status in TERMINAL:
            return row
        # A study waiting for the steward is re-evaluated (the budget or the consent may have
        # changed so that the policy now refuses it), but only when one of its inputs changed:
        # gating a large record set at every poll would be wasted work.
        marker = _evaluation_inputs(store, ctx.settings, view)
        if not new and store.get_state(f"evaluated:{view.study_id}") == marker:
            return row
        if ctx.isolate:
            from exchange.node.isolated import run_isolated

            evaluation = run_isolated(evaluate_study, store, ctx.settings, view, engines=(store.engine,))
        else:
            evaluation = evaluate_study(store, ctx.settings, view)
        store.set_state(f"evaluated:{view.study_id}", marker)
        ledger = reservation_ledger(store, ctx.settings) if evaluation.decision == "approve" else None
        with store.transaction() as session:
            outcome: str | None = evaluation.decision
            reasons = evaluation.reasons
            if ledger is not None:
                late = reserve_or_refuse(ledger, ctx.settings, session, view)
                if late:  # another approval took the budget since the evaluation
                    outcome, reasons = "refuse", late
            row = session.get(StudyRow, view.study_id)
            assert row is not None
            if latest_decision(session, view.study_id) is None and outcome is not None:
                _store_decision(session, ctx, view.study_id, decision=outcome,
                                reasons=reasons, eligible=evaluation.eligible_records,
                                decided_by="policy")
            elif evaluation.decision is None:
                row.status = PENDING
    return row


def _evaluation_inputs(store: NodeStore, settings: NodeSettings, view: StudyView) -> list[Any]:
    from exchange.node.site_export import fingerprint

    budget = current_budget(store, settings, exclude=view.study_id)
    return [*fingerprint(store), round(budget.spent, 9), round(budget.reserved, 9),
            settings.policy.model_dump(mode="json"), view.raw.get("spec"),
            datetime.now(UTC).date().isoformat()]  # validity periods: at least daily


def steward_decide(store: NodeStore, settings: NodeSettings, study_id: str, decision: str,
                   reason: str | None) -> DecisionRow:
    """The steward's decision on a pending study (named by its id or a unique prefix of it). An
    approval is re-checked against the site policy and consent first: it cannot approve what the
    policy would refuse."""
    if decision not in ("approve", "refuse"):
        raise StewardDecisionError(f"decision: must be approve or refuse, not {decision!r}")
    from exchange.node.study_ids import StudyIdError, resolve_study_id

    with store.sessions() as session:
        try:
            study_id = resolve_study_id(session, study_id)
        except StudyIdError as exc:
            raise StewardDecisionError(str(exc)) from exc
        row = session.get(StudyRow, study_id)
        assert row is not None
        previous = latest_decision(session, study_id)
        if previous is not None:
            raise StewardDecisionError(
                f"study {study_id!r} was already {previous.decision}d by {previous.decided_by} at "
                f"{previous.created_at:%Y-%m-%d %H:%M:%S}: {'; '.join(previous.reasons)}")
        view = StudyView.from_json(row.document)
    evaluation = evaluate_study(store, settings, view)
    if decision == "approve" and evaluation.decision == "refuse":
        raise StewardDecisionError(f"study {study_id!r} cannot be approved: "
                                   + "; ".join(evaluation.reasons))
    if decision == "approve":
        reasons = [reason or "approved by the data steward"]
    else:
        reasons = [reason or "refused by the data steward"]
    ctx = Context(settings=settings, signer=Signer.load(settings.signing_key_path))
    ledger = reservation_ledger(store, settings) if decision == "approve" else None
    with store.transaction() as session:
        if ledger is not None:
            late = reserve_or_refuse(ledger, settings, session, view)
            if late:
                raise StewardDecisionError(f"study {study_id!r} cannot be approved: " + "; ".join(late))
        if latest_decision(session, study_id) is not None:
            raise StewardDecisionError(f"study {study_id!r} was decided meanwhile")
        return _store_decision(session, ctx, study_id, decision=decision, reasons=reasons,
                               eligible=evaluation.eligible_records, decided_by="steward")


def unposted(store: NodeStore) -> list[DecisionRow]:
    """Decisions the coordinator has neither acknowledged nor rejected (to be posted)."""
    with store.sessions() as session:
        return list(session.execute(
            select(DecisionRow).join(StudyRow, StudyRow.study_id == DecisionRow.study_id)
            .where(DecisionRow.posted_at.is_(None), StudyRow.status.not_in(("closed", REJECTED)))
            .order_by(DecisionRow.id)).scalars())


def mark_posted(store: NodeStore, decision_id: int) -> None:
    """The coordinator acknowledged the decision (it holds it): only then may an approval
    count (`approved_active`)."""
    with store.transaction() as session:
        row = session.get(DecisionRow, decision_id)
        if row is not None and row.posted_at is None:
            row.posted_at = datetime.now(UTC)


def rejection_key(study_id: str) -> str:
    return f"rejected:{study_id}"


def mark_rejected(store: NodeStore, decision_id: int, status: int, reason: str) -> None:
    """The coordinator refused the decision (e.g. 409: the study started before ours arrived).

    In one transaction: the study becomes `rejected` (terminal: never joined, reserves no
    budget, never re-posted) and the reason is kept for `exchange node status`. The decision
    stays unacknowledged (`posted_at` null): the coordinator does not hold it."""
    with store.transaction() as session:
        decision = session.get(DecisionRow, decision_id)
        if decision is None:
            return
        study = session.get(StudyRow, decision.study_id)
        if study is not None:
            study.status = REJECTED
            study.updated_at = datetime.now(UTC)
        value = {"decision_id": decision_id, "decision": decision.decision, "status": status,
                 "reason": reason, "at": datetime.now(UTC).isoformat()}
        state = session.get(DaemonState, rejection_key(decision.study_id))
        if state is None:
            session.add(DaemonState(key=rejection_key(decision.study_id), value=value))
        else:
            state.value = value


def rejection(session: Session, study_id: str) -> dict[str, Any] | None:
    """Why the coordinator refused our decision on `study_id`, if it did."""
    state = session.get(DaemonState, rejection_key(study_id))
    return None if state is None else dict(state.value)


def approved_active(store: NodeStore) -> list[str]:
    """Studies approved here that have not finished and that the coordinator recorded as
    approved by this hospital (`my_decision` in its study listing; where the listing does not
    say, or said nothing yet, the acknowledgement of our post): the ClientApp's approved list.
    A rejected decision is never acknowledged, so it never counts."""
    out: list[str] = []
    with store.sessions() as session:
        for row in session.execute(select(StudyRow).where(StudyRow.status.not_in(TERMINAL))).scalars():
            decision = latest_decision(session, row.study_id)
            if decision is None or decision.decision != "approve" or decision.posted_at is None:
                continue
            # None: a listing read before our post was acknowledged (the same step): the
            # acknowledgement stands until a later listing says otherwise
            if row.document.get("my_decision") not in (None, "approve"):
                continue
            out.append(row.study_id)
    return out
