"""Privacy ledger of the hospital node: total budget, studies' DP plans, per-round charges.

The tables are defined in federated/privacy_ledger.py (federated's own MetaData); this migration
spells them out so that later changes to that module do not rewrite history.

Revision ID: 0001_privacy_ledger
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_privacy_ledger"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_budget",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("total_budget", sa.Float(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_budget")),
    )
    op.create_table(
        "privacy_studies",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("target_epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("steps_per_round", sa.Integer(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("n_records", sa.Integer(), nullable=False),
        sa.Column("accountant", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_privacy_studies")),
    )
    op.create_table(
        "privacy_charges",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("increment", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["privacy_studies.study_id"],
                                name=op.f("fk_privacy_charges_study_id_privacy_studies")),
        sa.PrimaryKeyConstraint("study_id", "round", name=op.f("pk_privacy_charges")),
    )
    # The one budget row every charge locks (see federated/privacy_ledger.py).
    op.execute("INSERT INTO privacy_budget (id, total_budget, version) VALUES (1, NULL, 0)")


def downgrade() -> None:
    op.drop_table("privacy_charges")
    op.drop_table("privacy_studies")
    op.drop_table("privacy_budget")
