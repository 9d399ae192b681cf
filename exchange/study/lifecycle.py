"""The study lifecycle: submission (with escrow), hospitals' decisions, start, rounds and
receipts, completion (payout) or failure, cancellation, results; and the queries the API
answers about studies. The coordinator's controllers call it; it runs on the coordinator's
journal and registry.

Every state change goes through the journal (`exchange.coordinator.journal`): one write
transaction holding the change and the signed audit entries that record it, or nothing.
Who may do what, and with which key, is the registry's (`exchange.coordinator.registry`).
How a study becomes what hospitals check and train with is `exchange.study.spec`'s; the run
itself is a `exchange.study.runners.StudyRunner`'s.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
from sqlalchemy import Connection, bindparam, func, insert, select
from sqlalchemy.orm import Session

from audit.entry import Entry
from audit.rewards import PayoutError
from audit.signing import b64decode
from audit.store.admission import Prepared
from exchange.coordinator import problems
from exchange.coordinator.catalogs import CatalogIndex
from exchange.coordinator.journal import Journal, now
from exchange.coordinator.models import Hospital, Organisation, Role
from exchange.coordinator.registry import Principal, Registry
from exchange.coordinator.schemas import StudyCreate, decision_payload_problems
from exchange.logging import get_logger
from exchange.study.models import (
    TERMINAL_STATUSES,
    DecisionKind,
    ReceiptRow,
    Study,
    StudyDecision,
    StudyRound,
    StudyStatus,
)
from exchange.study.receipts import check_receipt
from exchange.study.runners import RunHandle, RunHospital, RunRequest, StudyRunner
from exchange.study.spec import AcceptedStudy, study_spec

log = get_logger("exchange.study")
T = TypeVar("T")
#: A study's start deadline when its spec names none: this long after its submission.
DEFAULT_START_WINDOW = timedelta(days=7)


def _study_view_statement() -> Any:
    """GET /v1/studies/{id}'s statement, built once: see StudyLifecycle.get_study."""
    t, d, r = Study.__table__.c, StudyDecision.__table__.c, StudyRound.__table__.c
    rounds = (select(func.count()).select_from(StudyRound.__table__)
              .where(r.study_id == t.id, r.failed.is_(False)).scalar_subquery())
    # A failed round (its receipts are logged) is not a completed one.
    return (select(*(t[name] for name in StudyLifecycle._STUDY_COLUMNS),
                   rounds.label("rounds_completed"), d.hospital_id, d.decision, d.reasons,
                   d.eligible_records, d.decided_at, d.late)
            .select_from(Study.__table__.outerjoin(StudyDecision.__table__, d.study_id == t.id))
            .where(t.id == bindparam("study_id"))
            .order_by(d.hospital_id))


@dataclass(frozen=True)
class Terms:
    """Payout terms snapshotted into each study's escrow entry (docs/rewards.md)."""

    forward_bps: int = 3000
    royalties: Mapping[str, tuple[str, int]] | None = None  # template -> (account, bps)
    #: how long after the payout patients may claim; then the rest of each claim pool is swept
    claim_window_s: int = 365 * 86_400
    #: where swept rewards go; None: back to the organisation that paid for the study
    unclaimed_to: str | None = None



class StudyLifecycle:
    """The study lifecycle and its queries, over the journal (every state change with its
    audit entry) and the registry (who may do what, with which key); the Litestar
    controllers are thin wrappers around these. It is also the runner's observer
    (`on_round`, `on_complete`, `on_failed`)."""

    def __init__(self, journal: Journal, registry: Registry, runner: StudyRunner, *,
                 terms: Terms | None = None) -> None:
        self.journal = journal
        self.registry = registry
        self.runner = runner
        self.terms = terms or Terms()
        self.handles: dict[str, RunHandle] = {}
        self._handles_lock = threading.Lock()
        #: hospitals' published catalogs: a study none can serve is refused at submission
        self.catalogs = CatalogIndex(self.journal)

    # ------------------------------------------------------------------ studies
    def budget_problem(self, principal: Principal, budget: int) -> str | None:
        available = self.registry.balance(f"org:{principal.organisation_id}")
        if budget > available:
            return f"token budget {budget} exceeds the organisation's balance {available}"
        return None

    def submit_study(self, principal: Principal, data: StudyCreate) -> SubmittedStudy:
        """Submit with escrow. Concurrent submissions share one commit (group commit): each
        runs in its own savepoint, so one refusal rolls back only itself, and none is
        acknowledged before the shared commit is durable.

        Only what depends on the log's state runs in the shared, serialised writer: the balance
        check, the append (with its ledger fold) and the study row. The checks of the request
        itself and the signing of both entries run first, in the caller's thread, concurrently
        with the writer's commits (their content does not depend on the log: a study id, the
        organisation, the spec, the budget, the payout terms)."""
        org = self.registry.organisation(principal)
        self.catalogs.check(data.model_dump(mode="json"), org.id, org.region)
        write = self._prepare_submission(principal, data, org)
        study: SubmittedStudy = self.journal.batcher.run(write, self._submit_many_in)
        self.journal.on_change("study.submit")
        return study

    async def submit_study_async(self, principal: Principal, data: StudyCreate) -> SubmittedStudy:
        """`submit_study` for the event loop: the request checks and the two signatures run on
        the loop; the write is awaited without a thread of its own (SQLite: LoopGroupCommit,
        the batch's statements on the loop; PostgreSQL: GroupCommit's writer thread)."""
        org = self.registry._organisations.get(principal.organisation_id or "")
        if org is None:  # first submission of this organisation: one read, off the loop
            org = await asyncio.to_thread(self.registry.organisation, principal)
        await self.read_async(self.catalogs.check, data.model_dump(mode="json"), org.id, org.region)
        write = self._prepare_submission(principal, data, org)
        batcher = self.journal.loop_batcher or self.journal.batcher
        study: SubmittedStudy = await batcher.submit_async(write, self._submit_many_in)
        self.journal.on_change("study.submit")
        return study

    def _prepare_submission(self, principal: Principal, data: StudyCreate,
                            org: Organisation) -> _Submission:
        account = f"org:{org.id}"
        study_id = f"st-{uuid.uuid4().hex[:20]}"
        spec = data.model_dump(mode="json")
        # The deadline is part of the spec (and so of the logged study.submit entry), the
        # default one too, so the log alone says when the study expires.
        deadline = (data.start_deadline or now() + DEFAULT_START_WINDOW).astimezone(UTC)
        spec["start_deadline"] = deadline.isoformat().replace("+00:00", "Z")
        run_spec = self._check_federated_spec(study_id, spec, org, principal, data)
        prepare = getattr(self.runner, "prepare", None)
        if prepare is not None:  # e.g. the public pre-training, while the hospitals decide
            prepare(run_spec)
        royalty = (self.terms.royalties or {}).get(data.template)
        public_spec = {k: v for k, v in spec.items() if k != "token_budget"}
        entries = (
            self.journal.sign("study.submit", {"study_id": study_id, "organisation": account,
                                        "region": org.region, "spec": public_spec}),
            self.journal.sign("study.escrow", {
                "study_id": study_id, "account": account, "amount": data.token_budget,
                "royalty_account": royalty[0] if royalty else None,
                "royalty_bps": royalty[1] if royalty else 0,
                "forward_bps": self.terms.forward_bps,
                "unclaimed": {"after_s": self.terms.claim_window_s,
                              "to": self.terms.unclaimed_to or account}}))
        return _Submission(self, principal, data, study_id, spec, entries, deadline,
                           tuple(self.journal.audit_log.prepare(entries)))

    def _submit_in(self, connection: Connection, submission: _Submission) -> SubmittedStudy:
        """One submission in its own savepoint: the balance check with a clear answer, the
        append, the study row."""
        principal, data = submission.principal, submission.data
        account = f"org:{principal.organisation_id}"
        # A first check for a clear answer, on the fold this process holds (no read: on
        # PostgreSQL the whole write is then one round trip); a refusal is confirmed on the
        # log as this transaction sees it (another process may have minted meanwhile). The
        # escrow entry's fold (in the append, under the log's write lock) is the one that
        # counts if another escrow raced this one.
        if data.token_budget > self.journal.ledger.known_balance(connection, account):
            available = self.journal.ledger_in(connection).balance(account)
            if data.token_budget > available:
                raise problems.unprocessable([{"field": "token_budget", "reason":
                                               f"token budget {data.token_budget} exceeds the "
                                               f"organisation's balance {available}"}])
        rows: list[dict[str, Any]] = []

        def study_row(first_index: int) -> tuple[Any, list[dict[str, Any]]]:
            # Inserted after the append, with the entry index it records (one INSERT instead
            # of INSERT + UPDATE), in the same transaction (savepoint): a failure of either
            # rolls back both; on PostgreSQL in the append's one string when it can.
            rows[:] = [submission.row(first_index)]
            return _STUDY_INSERT, rows

        self.journal.append(connection, *submission.entries, prepared=submission.prepared,
                            last=True, then=study_row)
        # The caller gets the values written (it only reads them: submitted_view), not an ORM
        # instance; a Core INSERT is far cheaper than the ORM's add + flush unit of work.
        return SubmittedStudy(**rows[0])

    def _submit_many_in(self, connection: Connection,
                        submissions: list[_Submission]) -> list[SubmittedStudy]:
        """Several submissions as one write (GroupCommit's `together`): ONE append of all their
        entries, in order, and one INSERT of all their rows (on PostgreSQL in the append's one
        string when it can: `Journal.append`'s `then`).

        No balance pre-check here: the ledger fold of the appended escrows (in the append) is
        the rule, and if any escrow overdraws, it raises; the group commit then rolls this back
        and makes each submission on its own (`_submit_in`), which refuses that one with its
        reason. The same happens for anything else that fails."""
        rows: list[dict[str, Any]] = []

        def study_rows(first_index: int) -> tuple[Any, list[dict[str, Any]]]:
            rows.clear()
            position = first_index
            for submission in submissions:
                rows.append(submission.row(position))
                position += len(submission.entries)
            return _STUDY_INSERT, rows  # (several rows: an executemany, which SQLAlchemy
            # does not compile anew per call as it would a multi-row VALUES statement)

        self.journal.append(connection, *(e for s in submissions for e in s.entries),
                            prepared=[p for s in submissions for p in s.prepared], last=True,
                            then=study_rows)
        return [SubmittedStudy(**row) for row in rows]

    @staticmethod
    def _check_federated_spec(study_id: str, spec: dict[str, Any], org: Organisation,
                              principal: Principal, data: StudyCreate) -> Any:
        """Build the run's StudySpec (and its consent StudyRequest) now, so that a study the
        federated runner or a hospital's consent engine would refuse is refused at submission,
        with its reasons, rather than failing when it starts. Returns it."""
        from pydantic import ValidationError

        try:
            return study_spec(AcceptedStudy(study_id=study_id, spec=spec, organisation_id=org.id,
                                            region=org.region, researcher_id=principal.researcher_id))
        except ValidationError as exc:
            raise problems.unprocessable([
                {"field": ".".join(str(p) for p in error["loc"]) or "body", "reason": error["msg"]}
                for error in exc.errors()]) from exc
        except ValueError as exc:
            raise problems.unprocessable([{"field": "body", "reason": str(exc)}]) from exc

    def _visible_study(self, session: Session, principal: Principal, study_id: str) -> Study:
        study = session.get(Study, study_id)
        if study is None:
            raise problems.not_found(f"study {study_id!r}")
        if principal.role == Role.RESEARCHER and study.organisation_id != principal.organisation_id:
            # Same answer as a missing study: no probing of other organisations' ids.
            raise problems.not_found(f"study {study_id!r}")
        return study

    _STUDY_COLUMNS = ("id", "title", "organisation_id", "status", "spec", "token_budget", "min_hospitals",
                      "rounds_planned", "submitted_at", "start_deadline", "started_at", "finished_at",
                      "outcome_reason",
                      "model_sha256")

    def submitted_view(self, study: SubmittedStudy) -> dict[str, Any]:
        """What `get_study` answers for a study `submit_study` just committed, without reading it
        back: a new study has no decisions and no rounds yet, and every other field is the row
        this process wrote. Saves a read connection and two queries on the hot POST path;
        tests/exchange/test_lifecycle.py and the benchmark check both give the same StudyOut."""
        out = {name: getattr(study, name) for name in self._STUDY_COLUMNS}
        out.update(rounds_completed=0, decisions=[], approvals=0, refusals=0)
        return out

    async def read_async(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, a short read, from a coroutine: on the loop itself on SQLite (a thread
        hand-off, and the GIL hand-overs that come with it, cost more than an indexed read
        there: docs/benchmarks/api.md), on a worker thread on PostgreSQL (network waits)."""
        if self.journal.reads_on_loop:
            return fn(*args)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    def get_study(self, principal: Principal, study_id: str) -> dict[str, Any]:
        """One study with its decisions and progress: ONE prebuilt Core statement (the hot
        read path: no statement building per call, no ORM identity map, the model blob never
        loaded). The study LEFT JOIN its decisions gives one row per decision (one row with
        NULL decision columns when there is none); the completed rounds come as a scalar
        subquery on each row."""
        with self.journal.read_engine.connect() as connection:
            rows = connection.execute(_STUDY_VIEW, {"study_id": study_id}).all()
        if rows and _overdue(rows[0].status, rows[0].start_deadline):
            self.expire(study_id)  # on access: the sweep may not have come by yet
            with self.journal.read_engine.connect() as connection:
                rows = connection.execute(_STUDY_VIEW, {"study_id": study_id}).all()
        if not rows or (principal.role == Role.RESEARCHER
                        and rows[0].organisation_id != principal.organisation_id):
            # Same answer as a missing study: no probing of other organisations' ids.
            raise problems.not_found(f"study {study_id!r}")
        first = rows[0]
        out = {name: getattr(first, name) for name in self._STUDY_COLUMNS}
        out["rounds_completed"] = first.rounds_completed
        decisions = [{"hospital_id": r.hospital_id, "decision": r.decision, "reasons": r.reasons,
                      "eligible_records": r.eligible_records, "decided_at": r.decided_at,
                      "late": r.late} for r in rows if r.hospital_id is not None]
        out["decisions"] = decisions
        # approvals/refusals: the decisions that counted for the start; late ones are listed
        # (with their reasons) but changed nothing.
        out["approvals"] = sum(x["decision"] == DecisionKind.APPROVE and not x["late"] for x in decisions)
        out["refusals"] = sum(x["decision"] == DecisionKind.REFUSE and not x["late"] for x in decisions)
        return out

    def list_studies(self, principal: Principal, status: StudyStatus | None, offset: int,
                     limit: int) -> tuple[list[Study], int]:
        self.expire_due()
        query = select(Study)
        if principal.role == Role.RESEARCHER:
            query = query.where(Study.organisation_id == principal.organisation_id)
        if status is not None:
            query = query.where(Study.status == status)
        with self.journal.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(Study.submitted_at, Study.id).offset(offset)
                                   .limit(limit)).all()
        return list(rows), total

    def hospital_studies(self, hospital: Hospital, which: str, offset: int,
                         limit: int) -> tuple[list[dict[str, Any]], int]:
        self.expire_due()  # a node sees an overdue study as expired, and releases it
        decided = select(StudyDecision.study_id).where(StudyDecision.hospital_id == hospital.id)
        query = select(Study, Organisation.region).join(
            Organisation, Organisation.id == Study.organisation_id)
        if which == "pending":
            query = query.where(Study.status == StudyStatus.SUBMITTED, Study.id.not_in(decided))
        elif which == "open":
            query = query.where(Study.status.in_([StudyStatus.SUBMITTED, StudyStatus.RUNNING]))
        with self.journal.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.order_by(Study.submitted_at, Study.id).offset(offset)
                                   .limit(limit)).all()
            mine = {d.study_id: d.decision for d in session.scalars(
                select(StudyDecision).where(StudyDecision.hospital_id == hospital.id,
                                            StudyDecision.study_id.in_([r[0].id for r in rows])))}
        items = [{"id": s.id, "organisation_id": s.organisation_id, "organisation_region": region,
                  "researcher_id": s.researcher_id, "status": s.status,
                  "spec": {k: v for k, v in s.spec.items() if k != "token_budget"},
                  "min_hospitals": s.min_hospitals, "rounds_planned": s.rounds_planned,
                  "submitted_at": s.submitted_at, "start_deadline": s.start_deadline,
                  "my_decision": mine.get(s.id)} for s, region in rows]
        return items, total

    def decide(self, hospital: Hospital, study_id: str, entry: Entry) -> int:
        """Record a hospital's signed `study.decision`; start the run when enough approved."""
        payload = entry.payload
        found = self.registry.entry_problems(entry, "study.decision", hospital)
        found.extend(decision_payload_problems(payload, study_id, hospital.id))
        if found:
            raise problems.unprocessable(found)
        self.expire(study_id)  # past its deadline: decisions are closed (a refusal is kept late)
        start = False
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None:
                raise problems.not_found(f"study {study_id!r}")
            # One decision per hospital and study, late or not: a retry or replay is refused.
            if session.scalar(select(StudyDecision).where(StudyDecision.study_id == study_id,
                                                         StudyDecision.hospital_id == hospital.id)):
                raise problems.conflict(f"hospital {hospital.id!r} already decided on {study_id!r}")
            overdue = _overdue(study.status, study.start_deadline)  # expiring meanwhile
            late = study.status != StudyStatus.SUBMITTED or overdue
            if late and payload["decision"] != DecisionKind.REFUSE:
                # A late approval cannot join the run, and the node daemon reads this 409 as
                # "not joined" (exchange/node/daemon.py): refused, nothing recorded.
                state = "past its start deadline" if overdue else study.status.value
                raise problems.conflict(f"study {study_id!r} is {state}; decisions are closed")
            # A late refusal is recorded (log entry and row, `late`) so its reasons reach the
            # researcher; it changes nothing about the study.
            (index,) = self.journal.append(session, entry)
            session.add(StudyDecision(study_id=study_id, hospital_id=hospital.id,
                                      decision=DecisionKind(payload["decision"]),
                                      reasons=list(payload["reasons"]),
                                      eligible_records=payload["eligible_records"], decided_at=now(),
                                      entry_index=index,
                                      late=late))
            session.flush()
            if not late:
                approvals = session.scalar(select(func.count()).select_from(StudyDecision).where(
                    StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                    StudyDecision.late.is_(False))) or 0
                start = approvals >= study.min_hospitals
        if late:
            log.info("study.decision.late", study_id=study_id, hospital=hospital.id,
                     status=study.status.value)
        self.journal.on_change("study.decision")
        if start:
            self.start_study(study_id)
        return index

    def start_study(self, study_id: str) -> None:
        """Mark the study running (with its entry) and hand it to the runner."""
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status != StudyStatus.SUBMITTED or \
                    _overdue(study.status, study.start_deadline):
                return
            approved = session.scalars(select(Hospital).join(
                StudyDecision, StudyDecision.hospital_id == Hospital.id).where(
                StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                StudyDecision.late.is_(False)).order_by(Hospital.id)).all()
            study.status = StudyStatus.RUNNING
            study.started_at = now()
            self.journal.append(session, self.journal.sign("study.start", {
                "study_id": study_id, "hospitals": [f"hospital:{h.id}" for h in approved],
                "rounds": study.rounds_planned}))
            request = RunRequest(study_id=study_id, spec=dict(study.spec),
                                 hospitals=tuple(RunHospital(h.id, h.signing_key_id, h.signing_public_key,
                                                             h.flower_public_key) for h in approved),
                                 rounds=study.rounds_planned, min_hospitals=study.min_hospitals,
                                 organisation_id=study.organisation_id,
                                 region=session.get(Organisation, study.organisation_id).region,  # type: ignore[union-attr]
                                 researcher_id=study.researcher_id)
        try:
            handle = self.runner.start(request, self)
        except Exception as exc:
            self.on_failed(study_id, f"the run could not start: {exc}")
            return
        with self._handles_lock:
            self.handles[study_id] = handle
        log.info("study.start", study_id=study_id, hospitals=len(request.hospitals))

    def cancel_study(self, principal: Principal, study_id: str, reason: str) -> dict[str, Any]:
        with self.journal.write() as session:
            # Lock the row first (PostgreSQL: a completion racing this cancel waits, and the
            # status read below is the committed one), then check who may see it.
            session.get(Study, study_id, with_for_update=True, populate_existing=True)
            study = self._visible_study(session, principal, study_id)
            if study.status in TERMINAL_STATUSES:
                raise problems.conflict(f"study {study_id!r} is already {study.status.value}")
            was_running = study.status == StudyStatus.RUNNING
            self._close(session, study, StudyStatus.CANCELLED, reason, "study.cancel",
                        released=self._approvals(session, study.id))
        if was_running:
            with self._handles_lock:
                handle = self.handles.pop(study_id, None)
            if handle is not None:
                handle.cancel()
        return self.get_study(principal, study_id)

    def expire_due(self, at: datetime | None = None) -> list[str]:
        """Expire every submitted study whose start deadline has passed (at `at`, default now);
        the ids expired. The coordinator's deadline sweep calls this; reads that list studies
        call it too, so no caller sees an overdue study as still open."""
        at = at or now()
        with self.journal.read() as session:
            due = session.scalars(select(Study.id).where(
                Study.status == StudyStatus.SUBMITTED, Study.start_deadline <= at)
                .order_by(Study.start_deadline)).all()
        return [study_id for study_id in due if self.expire(study_id, at)]

    def expire(self, study_id: str, at: datetime | None = None) -> bool:
        """End a submitted study that was not started by its deadline as `expired`, in one
        transaction: a `study.expire` entry naming the hospitals whose approvals (and the
        privacy they reserved) it releases, and the refund of the escrow. False if the study is
        not submitted or not overdue (nothing changes)."""
        at = at or now()
        with self.journal.read() as session:  # the usual answer, without the write lock
            found = session.execute(select(Study.status, Study.start_deadline)
                                    .where(Study.id == study_id)).first()
        if found is None or not _overdue(found.status, found.start_deadline, at):
            return False
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True, populate_existing=True)
            if study is None or not _overdue(study.status, study.start_deadline, at):
                return False
            deadline = study.start_deadline.isoformat().replace("+00:00", "Z")
            self._close(session, study, StudyStatus.EXPIRED,
                        f"not started by its start deadline {deadline}", "study.expire",
                        released=self._approvals(session, study_id),
                        extra={"start_deadline": deadline})
        self.journal.on_change("study.expire")
        log.info("study.expire", study_id=study_id)
        return True

    @staticmethod
    def _approvals(session: Session, study_id: str) -> list[str]:
        """The hospitals whose timely approval of the study stands (their accounts)."""
        return [f"hospital:{h}" for h in session.scalars(select(StudyDecision.hospital_id).where(
            StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
            StudyDecision.late.is_(False)).order_by(StudyDecision.hospital_id))]

    def _close(self, session: Session, study: Study, status: StudyStatus, reason: str,
               kind: str, *, released: list[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> None:
        """Failure, cancellation or expiry: the entry, then the refund of what was not paid
        out. `released`: the hospitals whose approvals the entry releases (a study that ends
        before or while it runs no longer holds their privacy reservations)."""
        study.status = status
        study.finished_at = now()
        study.outcome_reason = reason
        escrow = self.journal.ledger_in(session).studies.get(study.id)
        payload: dict[str, Any] = {"study_id": study.id, "reason": reason, **(extra or {})}
        if released is not None:
            payload["released"] = released
        entries = [self.journal.sign(kind, payload)]
        if escrow is not None and escrow.held > 0:
            entries.append(self.journal.sign("study.refund", {"study_id": study.id, "account": escrow.account,
                                                       "amount": escrow.held}))
        self.journal.append(session, *entries)

    # ------------------------------------------------------------------ observer (runner)
    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Entry]) -> None:
        """Record one round the run reports, with its receipts, in one transaction.

        - Receipts count only from a registered hospital, signed with its current key, that
          APPROVED this study in time (a second line of defence behind GuardedObserver); others
          are skipped with a log line, never appended.
        - A failed round (`metrics["round_failed"] == 1.0`, sent right before `on_failed`):
          receipts and `study.round` are logged as usual, the round row is flagged `failed`
          (not a completed round). The study then fails and is refunded, so they pay nothing.
        - A cancelled study's in-flight round: hospitals trained and spent privacy before the
          stop reached them. The escrow is already refunded (the ledger takes no receipt after
          that), so each receipt is logged wrapped in a coordinator-signed `study.unpaid_receipt`
          entry (the hospital's signed envelope inside, verifiable) and kept as a receipt row
          for the researcher's results; nothing is paid, no round is recorded.
        """
        failed = metrics.get("round_failed") == 1.0
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status not in (StudyStatus.RUNNING, StudyStatus.CANCELLED):
                return
            cancelled = study.status == StudyStatus.CANCELLED
            approved_ids = set(session.scalars(select(StudyDecision.hospital_id).where(
                StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                StudyDecision.late.is_(False))))
            appended: list[Entry] = []
            hospitals: list[str] = []
            for entry in receipts:
                hospital_id = str(entry.payload.get("hospital", "")).removeprefix("hospital:")
                hospital = session.get(Hospital, hospital_id)
                if hospital is None or entry.key_id != hospital.signing_key_id:
                    log.warning("receipt.ignored", study_id=study_id, round=round_number,
                                reason="unknown hospital or key")
                    continue
                if hospital_id not in approved_ids:
                    log.warning("receipt.ignored", study_id=study_id, round=round_number,
                                hospital=hospital_id, reason="hospital did not approve this study")
                    continue
                if hospital_id in hospitals or session.scalar(select(ReceiptRow.id).where(
                        ReceiptRow.study_id == study_id, ReceiptRow.round == round_number,
                        ReceiptRow.hospital_id == hospital_id)) is not None:
                    continue  # already delivered (by the hospital itself, or twice in this call)
                appended.append(entry)
                hospitals.append(hospital_id)
            if cancelled:
                if not appended:
                    return
                wrappers = [self.journal.sign("study.unpaid_receipt", {
                    "study_id": study_id, "round": round_number, "hospital": f"hospital:{h}",
                    "reason": "the study was cancelled (and refunded) before this round was "
                              "reported: evidence of privacy spent, not paid",
                    "receipt": entry.to_json()}) for entry, h in zip(appended, hospitals, strict=True)]
                indexes = self.journal.append(session, *wrappers)
                for entry, hospital_id, index in zip(appended, hospitals, indexes, strict=True):
                    session.add(_receipt_row(study_id, hospital_id, entry, index))
            else:
                round_payload: dict[str, Any] = {
                    "study_id": study_id, "round": round_number, "metrics": dict(metrics),
                    "hospitals": [f"hospital:{h}" for h in hospitals]}
                if metrics.get("secure_aggregation") == 1.0 and not failed:
                    # the hospitals whose inputs formed the secure aggregate: only their receipts
                    # of this round pay (audit.ledger folds this; docs/secure-aggregation.md)
                    round_payload["aggregate_members"] = sorted(
                        {"hospital:" + str(e.payload.get("hospital", "")).removeprefix("hospital:")
                         for e in receipts})
                round_entry = self.journal.sign("study.round", round_payload)
                indexes = self.journal.append(session, *appended, round_entry)
                for entry, hospital_id, index in zip(appended, hospitals, indexes, strict=False):
                    session.add(_receipt_row(study_id, hospital_id, entry, index))
                session.add(StudyRound(study_id=study_id, round=round_number, metrics=dict(metrics),
                                       finished_at=now(), entry_index=indexes[-1], failed=failed))
        if cancelled:
            log.info("round.after_cancel", study_id=study_id, round=round_number, receipts=len(appended))
        self.journal.on_change("study.round")

    def record_receipt(self, hospital: Hospital, entry: Entry) -> int:
        """A hospital delivers its own signed `round.receipt` (e.g. when the run could not)."""
        from federated.receipts import ReceiptError

        found = self.registry.entry_problems(entry, "round.receipt", hospital)
        if not found:
            try:
                receipt = check_receipt(entry, {hospital.id: b64decode(hospital.signing_public_key)},
                                        hospital_id=hospital.id)
            except ReceiptError as exc:
                found.append({"field": "payload", "reason": str(exc)})
        if found:
            raise problems.unprocessable(found)
        study_id, round_number = receipt.study_id, receipt.round
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None:
                raise problems.not_found(f"study {study_id!r}")
            if study.status != StudyStatus.RUNNING:
                raise problems.conflict(f"study {study_id!r} is {study.status.value}; receipts are closed")
            approved = session.scalar(select(StudyDecision.id).where(
                StudyDecision.study_id == study_id, StudyDecision.hospital_id == hospital.id,
                StudyDecision.decision == DecisionKind.APPROVE, StudyDecision.late.is_(False)))
            if approved is None:
                raise problems.forbidden(f"hospital {hospital.id!r} did not join study {study_id!r}")
            if session.scalar(select(ReceiptRow.id).where(
                    ReceiptRow.study_id == study_id, ReceiptRow.round == round_number,
                    ReceiptRow.hospital_id == hospital.id)) is not None:
                raise problems.conflict(f"a receipt for round {round_number} is already recorded")
            (index,) = self.journal.append(session, entry)
            session.add(_receipt_row(study_id, hospital.id, entry, index))
        return index

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        digest = hashlib.sha256(model).hexdigest()
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status != StudyStatus.RUNNING:
                return
            study.status = StudyStatus.COMPLETED
            study.finished_at = now()
            study.model = model
            study.model_sha256 = digest
            study.outcome_reason = None
            entries = [self.journal.sign("study.complete", {"study_id": study_id, "model_sha256": digest,
                                                     "metrics": dict(metrics)})]
            # The payout the auditor's fold expects: the terms recorded in the study's
            # study.escrow entry and the receipts in the log, never today's settings.
            ledger = self.journal.ledger_in(session)
            escrow = ledger.studies.get(study_id)
            try:
                if escrow is None:
                    raise PayoutError(f"study_id: no study.escrow for {study_id!r}")
                payout = ledger.expected_payout(study_id, escrow.held)
            except PayoutError as exc:
                # Nothing was trained on (no records): nothing to pay for, refund instead.
                study.outcome_reason = f"no payout: {exc}"
                if escrow is not None and escrow.held > 0:
                    entries.append(self.journal.sign("study.refund", {
                        "study_id": study_id, "account": escrow.account, "amount": escrow.held}))
            else:
                entries.append(self.journal.sign("study.payout", payout))
            self.journal.append(session, *entries)
        with self._handles_lock:
            self.handles.pop(study_id, None)
        self.journal.on_change("study.complete")
        log.info("study.complete", study_id=study_id, model_sha256=digest)

    def on_failed(self, study_id: str, reason: str) -> None:
        with self.journal.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status in TERMINAL_STATUSES:
                return
            self._close(session, study, StudyStatus.FAILED, reason[:2000], "study.fail")
        with self._handles_lock:
            self.handles.pop(study_id, None)
        self.journal.on_change("study.fail")
        log.warning("study.fail", study_id=study_id, reason=reason[:200])

    # ------------------------------------------------------------------ results
    def results(self, principal: Principal, study_id: str) -> dict[str, Any]:
        with self.journal.read() as session:
            study = self._visible_study(session, principal, study_id)
            rounds = session.scalars(select(StudyRound).where(StudyRound.study_id == study_id)
                                     .order_by(StudyRound.round)).all()
            receipts = session.scalars(select(ReceiptRow).where(ReceiptRow.study_id == study_id)).all()
        per: dict[str, dict[str, Any]] = {}
        for r in receipts:
            item = per.setdefault(r.hospital_id, {"hospital_id": r.hospital_id, "rounds": 0,
                                                  "records_used": 0, "epsilon_spent": None})
            item["rounds"] += 1
            item["records_used"] += r.records_used
            total = r.entry.get("payload", {}).get("epsilon_total")
            if isinstance(total, int | float) and not isinstance(total, bool):
                # epsilon_total: the hospital's spend on this study so far (composed by its
                # accountant, tighter than a sum of rounds): the latest is the study's spend.
                item["epsilon_spent"] = max(item["epsilon_spent"] or 0.0, float(total))
            elif r.epsilon_spent is not None:
                item["epsilon_spent"] = (item["epsilon_spent"] or 0.0) + r.epsilon_spent
        def out(r: StudyRound) -> dict[str, Any]:
            return {"round": r.round, "metrics": r.metrics, "finished_at": r.finished_at}

        # Contributions count every logged receipt (failed and cancelled rounds' too: privacy
        # was spent); `rounds` lists the completed rounds only, `failed_rounds` the others.
        return {"study_id": study.id, "status": study.status, "model_sha256": study.model_sha256,
                "rounds": [out(r) for r in rounds if not r.failed],
                "failed_rounds": [out(r) for r in rounds if r.failed],
                "contributions": [per[k] for k in sorted(per)]}

    def model(self, principal: Principal, study_id: str) -> tuple[bytes, str]:
        with self.journal.read() as session:
            study = self._visible_study(session, principal, study_id)
            if study.status != StudyStatus.COMPLETED or study.model_sha256 is None:
                raise problems.conflict(f"study {study_id!r} has no model (it is {study.status.value})")
            model = session.scalar(select(Study.model).where(Study.id == study_id))
        assert model is not None
        return model, study.model_sha256


@dataclass(frozen=True, slots=True)
class SubmittedStudy:
    """The study row a submission just wrote (a new study: started, finished, outcome and model
    are still empty). Not an ORM instance: building one is a cost the writer thread pays per study."""

    id: str
    organisation_id: str | None
    researcher_id: str | None
    title: str
    status: StudyStatus
    spec: dict[str, Any]
    token_budget: int
    min_hospitals: int
    rounds_planned: int
    submitted_at: datetime
    start_deadline: datetime
    submit_entry_index: int
    started_at: None = None
    finished_at: None = None
    outcome_reason: None = None
    model_sha256: None = None


@dataclass(frozen=True)
class _Submission:
    """A checked and signed study submission waiting for the writer: `write(connection)`."""

    lifecycle: StudyLifecycle
    principal: Principal
    data: StudyCreate
    study_id: str
    spec: dict[str, Any]
    entries: tuple[Entry, Entry]
    start_deadline: datetime
    # The entries checked for form and signature before queueing (AuditLog.prepare), so the
    # writer only does what depends on the log.
    prepared: tuple[Prepared, ...]

    def __call__(self, connection: Connection) -> SubmittedStudy:
        return self.lifecycle._submit_in(connection, self)

    def row(self, submit_entry_index: int) -> dict[str, Any]:
        data = self.data
        return {"id": self.study_id, "organisation_id": self.principal.organisation_id,
                "researcher_id": self.principal.researcher_id, "title": data.title,
                "status": StudyStatus.SUBMITTED, "spec": self.spec, "token_budget": data.token_budget,
                "min_hospitals": data.min_hospitals, "rounds_planned": data.rounds,
                "submitted_at": now(), "start_deadline": self.start_deadline,
                "submit_entry_index": submit_entry_index}


def _receipt_row(study_id: str, hospital_id: str, entry: Entry, index: int) -> ReceiptRow:
    payload = entry.payload
    epsilon = payload.get("epsilon_spent")
    return ReceiptRow(study_id=study_id, hospital_id=hospital_id, round=int(payload["round"]),
                   records_used=int(payload["records_used"]),
                   epsilon_spent=float(epsilon) if isinstance(epsilon, int | float) and
                   not isinstance(epsilon, bool) else None,
                   commitment=str(payload.get("commitment", ""))[:128], entry=entry.to_json(),
                   entry_index=index)



def _overdue(status: StudyStatus, deadline: datetime | None, at: datetime | None = None) -> bool:
    """A submitted study whose start deadline has passed: it can only expire now."""
    return status == StudyStatus.SUBMITTED and deadline is not None and deadline <= (at or now())


_STUDY_VIEW = _study_view_statement()
_STUDY_INSERT = insert(Study)

