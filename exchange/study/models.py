"""The study lifecycle's tables (SQLAlchemy 2, on `CoordinatorBase`, in the coordinator's
database): studies, hospitals' decisions, rounds and receipts. Each row is a projection of the
audit entries the lifecycle appended with it (`exchange.coordinator.journal`); the registry's
tables (organisations, researchers, hospitals) are `exchange.coordinator.models`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from exchange.db.base import CoordinatorBase
from exchange.db.types import UTCDateTime, enum_column


class StudyStatus(enum.StrEnum):
    """submitted -> (hospital decisions) -> running -> completed | failed | cancelled; a
    submitted study not started by its start deadline -> expired."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_STATUSES = frozenset({StudyStatus.COMPLETED, StudyStatus.FAILED, StudyStatus.CANCELLED,
                               StudyStatus.EXPIRED})


class DecisionKind(enum.StrEnum):
    APPROVE = "approve"
    REFUSE = "refuse"




class Study(CoordinatorBase):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    researcher_id: Mapped[str | None] = mapped_column(ForeignKey("researchers.id"))
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(enum_column(StudyStatus, "study_status"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    token_budget: Mapped[int] = mapped_column(BigInteger)
    min_hospitals: Mapped[int] = mapped_column(Integer)
    rounds_planned: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # Not started by then: expired, escrow refunded, approvals released (migration 0006).
    start_deadline: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome_reason: Mapped[str | None] = mapped_column(Text)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    submit_entry_index: Mapped[int | None] = mapped_column(BigInteger)


class StudyDecision(CoordinatorBase):
    __tablename__ = "study_decisions"
    __table_args__ = (UniqueConstraint("study_id", "hospital_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    hospital_id: Mapped[str] = mapped_column(ForeignKey("hospitals.id"))
    decision: Mapped[DecisionKind] = mapped_column(enum_column(DecisionKind, "decision_kind"))
    reasons: Mapped[list[str]] = mapped_column(JSON)
    eligible_records: Mapped[int | None] = mapped_column(Integer)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())
    entry_index: Mapped[int | None] = mapped_column(BigInteger)
    # A refusal that arrived after the study left `submitted` (migration 0005): recorded so the
    # researcher sees its reasons; it never changes the study (nothing starts or stops).
    late: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class StudyRound(CoordinatorBase):
    __tablename__ = "study_rounds"
    __table_args__ = (UniqueConstraint("study_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
    entry_index: Mapped[int | None] = mapped_column(BigInteger)
    # A round the run reported as failed (`metrics["round_failed"] == 1.0`, migration 0005): its
    # receipts are logged (real privacy spend), but it is not a completed round.
    failed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ReceiptRow(CoordinatorBase):
    __tablename__ = "receipts"
    __table_args__ = (UniqueConstraint("study_id", "round", "hospital_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    hospital_id: Mapped[str] = mapped_column(ForeignKey("hospitals.id"))
    round: Mapped[int] = mapped_column(Integer)
    records_used: Mapped[int] = mapped_column(Integer)
    epsilon_spent: Mapped[float | None] = mapped_column(Float)
    commitment: Mapped[str] = mapped_column(String(128))
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)
    entry_index: Mapped[int | None] = mapped_column(BigInteger)
