"""The noised eligible-patient count each study's decision is taken on, and the patients charged
its epsilon (docs/privacy.md, "Decision count").

The tables are defined in federated/privacy_ledger.py; this migration spells them out so that
later edits of that module do not rewrite history.

Revision ID: 0006_decision_counts
Revises: 0005_evaluation_statistics
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_decision_counts"
down_revision = "0005_evaluation_statistics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_decisions",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("noisy_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_privacy_decisions")),
    )
    op.create_table(
        "privacy_decision_patients",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("pseudonym", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["privacy_decisions.study_id"],
                                name=op.f("fk_privacy_decision_patients_study_id_privacy_decisions")),
        sa.PrimaryKeyConstraint("study_id", "pseudonym", name=op.f("pk_privacy_decision_patients")),
    )
    op.create_index("ix_privacy_decision_patients_pseudonym", "privacy_decision_patients", ["pseudonym"])


def downgrade() -> None:
    op.drop_index("ix_privacy_decision_patients_pseudonym", table_name="privacy_decision_patients")
    op.drop_table("privacy_decision_patients")
    op.drop_table("privacy_decisions")
