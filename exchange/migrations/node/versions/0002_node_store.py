"""Node store: records, column categories, consent contract versions, studies, decisions,
rounds, errors, daemon state.

Revision ID: 0002_node_store
Revises: 0001_privacy_ledger
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_node_store"
down_revision = "0001_privacy_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "import_batches",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_import_batches"),
    )
    op.create_table(
        "records",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pseudonym", sa.String(256), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_records"),
        sa.ForeignKeyConstraint(["batch_id"], ["import_batches.id"],
                                name="fk_records_batch_id_import_batches"),
    )
    op.create_index("ix_records_pseudonym", "records", ["pseudonym"])
    op.create_index("ix_records_batch_id", "records", ["batch_id"])
    op.create_table(
        "column_categories",
        sa.Column("column", sa.String(256), nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("column", name="pk_column_categories"),
    )
    op.create_table(
        "consent_contracts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("contract_hash", sa.String(64), nullable=False),
        sa.Column("source_hash", sa.String(64), nullable=False),
        sa.Column("pseudonym", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("signed", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_consent_contracts"),
        sa.UniqueConstraint("contract_hash", name="uq_consent_contracts_contract_hash"),
        sa.UniqueConstraint("pseudonym", "version", name="uq_consent_contracts_pseudonym"),
    )
    op.create_index("ix_consent_contracts_pseudonym", "consent_contracts", ["pseudonym"])
    op.create_table(
        "studies",
        sa.Column("study_id", sa.String(128), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_id", name="pk_studies"),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.String(128), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decided_by", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("eligible_records", sa.Integer(), nullable=False),
        sa.Column("envelope", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.study_id"],
                                name="fk_decisions_study_id_studies"),
    )
    op.create_index("ix_decisions_study_id", "decisions", ["study_id"])
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("records_used", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rounds"),
        sa.UniqueConstraint("study_id", "round", name="uq_rounds_study_id"),
    )
    op.create_index("ix_rounds_study_id", "rounds", ["study_id"])
    op.create_table(
        "errors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("component", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_errors"),
    )
    op.create_table(
        "daemon_state",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("key", name="pk_daemon_state"),
    )


def downgrade() -> None:
    for table in ("daemon_state", "errors", "rounds", "decisions", "studies", "consent_contracts",
                  "column_categories", "records", "import_batches"):
        op.drop_table(table)
