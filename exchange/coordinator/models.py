"""Coordinator tables (SQLAlchemy 2, on `CoordinatorBase`).

Why these shapes:
- API keys are never stored: only a public lookup `prefix` and the SHA-256 of the whole
  high-entropy token, so a stolen database does not yield working keys. Revocation is a
  timestamp, never a delete, so the audit trail of who held which key stays intact.
- Hospitals carry two keys: their Ed25519 signing key (requests, decisions, receipts; its
  key id is what the audit log knows) and their Flower SuperNode public key (ECDSA, for
  SuperLink node authentication).
- No balance table: balances are the audit package's Ledger fold of the log
  (exchange.coordinator.auditing.LedgerView), the same code the auditor runs; an escrow the
  fold would refuse (overdraft) is refused before its transaction commits.
- `request_nonces` is the replay cache of signed hospital requests: the primary key makes a
  second use of the same (key, nonce) fail atomically.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from exchange.db.base import CoordinatorBase


class Role(enum.StrEnum):
    """Who a caller is; decides what it may see and do."""

    OPERATOR = "operator"
    RESEARCHER = "researcher"
    HOSPITAL = "hospital"
    AUDITOR = "auditor"


class StudyStatus(enum.StrEnum):
    """submitted -> (hospital decisions) -> running -> completed | failed | cancelled."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({StudyStatus.COMPLETED, StudyStatus.FAILED, StudyStatus.CANCELLED})


class DecisionKind(enum.StrEnum):
    APPROVE = "approve"
    REFUSE = "refuse"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend. SQLite stores no offset, so values
    come back naive there; this type stores UTC and always returns aware UTC datetimes, so the
    API serves RFC 3339 times with an offset on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the coordinator stores aware UTC times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # native_enum=False: a VARCHAR + CHECK on both SQLite and PostgreSQL, easy to extend
    # in a batch migration.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=32,
                values_callable=lambda members: [m.value for m in members])


class Organisation(CoordinatorBase):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    region: Mapped[str] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Researcher(CoordinatorBase):
    __tablename__ = "researchers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(CoordinatorBase):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[Role] = mapped_column(_enum(Role, "api_key_role"))
    organisation_id: Mapped[str | None] = mapped_column(ForeignKey("organisations.id"), index=True)
    researcher_id: Mapped[str | None] = mapped_column(ForeignKey("researchers.id"))
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Hospital(CoordinatorBase):
    __tablename__ = "hospitals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    signing_public_key: Mapped[str] = mapped_column(String(64))
    signing_key_id: Mapped[str] = mapped_column(String(32), unique=True)
    flower_public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Study(CoordinatorBase):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    researcher_id: Mapped[str | None] = mapped_column(ForeignKey("researchers.id"))
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    token_budget: Mapped[int] = mapped_column(BigInteger)
    min_hospitals: Mapped[int] = mapped_column(Integer)
    rounds_planned: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
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
    decision: Mapped[DecisionKind] = mapped_column(_enum(DecisionKind, "decision_kind"))
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


class RequestNonce(CoordinatorBase):
    __tablename__ = "request_nonces"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
