"""Reward commitments: the hospital keeps the openings (reward account, salt, proof) of each
receipt's salted Merkle commitment, so that a patient can claim a payout without the account
ever appearing in the public log.

Revision ID: 0004_reward_openings
Revises: 0003_patient_privacy
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_reward_openings"
down_revision = "0003_patient_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reward_openings",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("leaf_index", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=256), nullable=False),
        sa.Column("opening", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_id", "round", "leaf_index", name=op.f("pk_reward_openings")),
    )
    op.create_index("ix_reward_openings_account", "reward_openings", ["account"])


def downgrade() -> None:
    op.drop_index("ix_reward_openings_account", table_name="reward_openings")
    op.drop_table("reward_openings")
