"""Coordinator registry and studies: organisations, researchers, API keys, hospitals, studies,
decisions, rounds, receipts, ledger balance projection, request nonces.

Revision ID: 0002_coordinator
Revises: 0001_audit_log
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_coordinator"
down_revision = "0001_audit_log"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "organisations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("region", sa.String(2), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("name", name="uq_organisations_name"),
    )
    op.create_table(
        "researchers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organisation_id", sa.String(64), sa.ForeignKey("organisations.id"), nullable=False,
                  index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("role", _enum("api_key_role", "operator", "researcher", "hospital", "auditor"),
                  nullable=False),
        sa.Column("organisation_id", sa.String(64), sa.ForeignKey("organisations.id"), index=True),
        sa.Column("researcher_id", sa.String(64), sa.ForeignKey("researchers.id")),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_table(
        "hospitals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organisation_id", sa.String(64), sa.ForeignKey("organisations.id"), nullable=False,
                  index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("signing_public_key", sa.String(64), nullable=False),
        sa.Column("signing_key_id", sa.String(32), nullable=False),
        sa.Column("flower_public_key", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("signing_key_id", name="uq_hospitals_signing_key_id"),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organisation_id", sa.String(64), sa.ForeignKey("organisations.id"), nullable=False,
                  index=True),
        sa.Column("researcher_id", sa.String(64), sa.ForeignKey("researchers.id")),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("status", _enum("study_status", "submitted", "running", "completed", "failed",
                                  "cancelled"), nullable=False, index=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("token_budget", sa.BigInteger, nullable=False),
        sa.Column("min_hospitals", sa.Integer, nullable=False),
        sa.Column("rounds_planned", sa.Integer, nullable=False),
        sa.Column("submitted_at", TZ, nullable=False, index=True),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
        sa.Column("outcome_reason", sa.Text),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("model", sa.LargeBinary),
        sa.Column("submit_entry_index", sa.BigInteger),
    )
    op.create_table(
        "study_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("hospital_id", sa.String(64), sa.ForeignKey("hospitals.id"), nullable=False),
        sa.Column("decision", _enum("decision_kind", "approve", "refuse"), nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("eligible_records", sa.Integer),
        sa.Column("decided_at", TZ, nullable=False),
        sa.Column("entry_index", sa.BigInteger),
        sa.UniqueConstraint("study_id", "hospital_id", name="uq_study_decisions_study_id"),
    )
    op.create_table(
        "study_rounds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("finished_at", TZ, nullable=False),
        sa.Column("entry_index", sa.BigInteger),
        sa.UniqueConstraint("study_id", "round", name="uq_study_rounds_study_id"),
    )
    op.create_table(
        "receipts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("hospital_id", sa.String(64), sa.ForeignKey("hospitals.id"), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("records_used", sa.Integer, nullable=False),
        sa.Column("epsilon_spent", sa.Float),
        sa.Column("commitment", sa.String(128), nullable=False),
        sa.Column("entry", sa.JSON, nullable=False),
        sa.Column("entry_index", sa.BigInteger),
        sa.UniqueConstraint("study_id", "round", "hospital_id", name="uq_receipts_study_id"),
    )
    op.create_table(
        "ledger_balances",
        sa.Column("account", sa.String(200), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.CheckConstraint("balance >= 0", name="balance_non_negative"),
    )
    op.create_table(
        "request_nonces",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("created_at", TZ, nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("request_nonces", "ledger_balances", "receipts", "study_rounds", "study_decisions",
                  "studies", "hospitals", "api_keys", "researchers", "organisations"):
        op.drop_table(table)
