"""The node's own database (SQLAlchemy 2 declarative, on `NodeBase`; schema by Alembic).

One SQLite file per hospital by default. It holds everything the daemon needs to resume
after a crash: the records and their consent, every study seen and every decision, the
rounds joined, recent errors and a small key/value table of daemon state. The privacy
ledger (owned by `federated`) lives in the same database, in its own migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from exchange.db.base import NodeBase


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImportBatch(NodeBase):
    """One imported file: every record points at the batch it came from."""

    __tablename__ = "import_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    record_count: Mapped[int] = mapped_column(Integer)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Record(NodeBase):
    """One patient record: a hospital-scoped pseudonym and its column values (JSON).

    Values stay here; nothing in this table ever leaves the hospital."""

    __tablename__ = "records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(256), index=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("import_batches.id"), index=True)
    source_row: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)


class ColumnCategory(NodeBase):
    """Which data category (consent vocabulary) a column belongs to. A study asks for
    columns; consent permits categories; this mapping joins the two."""

    __tablename__ = "column_categories"

    column: Mapped[str] = mapped_column(String(256), primary_key=True)
    category: Mapped[str] = mapped_column(String(128))
    # The value type the import mappings declare (widened when two differ: integer and number
    # give number, anything else mixed gives string). The published catalog shows it, so the
    # type follows the mappings, never one record's value. NULL on a store imported before
    # migration 0009.
    value_type: Mapped[str | None] = mapped_column(String(16), nullable=True)


class ConsentContractRow(NodeBase):
    """One version of one patient's consent contract. Versions are never updated or
    deleted: a revocation is a new version that permits nothing."""

    __tablename__ = "consent_contracts"
    __table_args__ = (UniqueConstraint("pseudonym", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contract_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # the hash as received: differs from contract_hash when the node signed it on import
    source_hash: Mapped[str] = mapped_column(String(64))
    pseudonym: Mapped[str] = mapped_column(String(256), index=True)
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    # the signed envelope (consent-contract-signed/1): the issuer's, or the node's when it
    # arrived unsigned
    signed: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(1024))
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # for a version imported from a FHIR Consent: its meta.versionId and meta.lastUpdated, which
    # order updates of the same Consent (consent_store.py)
    fhir_version_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fhir_last_updated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StudyRow(NodeBase):
    """A study seen at the coordinator, and where this node stands on it.

    status: pending (waiting for the steward) | approved | refused | running | completed |
    failed | cancelled."""

    __tablename__ = "studies"

    study_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32))
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DecisionRow(NodeBase):
    """A decision on a study, signed with the node key. posted_at is set once the
    coordinator acknowledged it; until then the daemon retries (also after a restart)."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.study_id"), index=True)
    decision: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str]] = mapped_column(JSON)
    eligible_records: Mapped[int] = mapped_column(Integer)
    envelope: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    posted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RoundRow(NodeBase):
    """A training round this node took part in (one row per study and round)."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("study_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(String(128), index=True)
    round: Mapped[int] = mapped_column(Integer)
    records_used: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ErrorRow(NodeBase):
    """Something that went wrong, for `exchange node status` (also in the JSON log)."""

    __tablename__ = "errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    component: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)


class DaemonState(NodeBase):
    """Small key/value state the daemon resumes from (registration, supernode restarts)."""

    __tablename__ = "daemon_state"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
