"""The charged hold-out release carries the sufficient statistics of the study's metrics
(federated.eval_stats: a binned survival histogram and Brier sum, or a confusion matrix), stored
with it so that a repeated request gets the same noised values back.

Revision ID: 0005_evaluation_statistics
Revises: 0004_reward_openings
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_evaluation_statistics"
down_revision = "0004_reward_openings"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("privacy_evaluations") as batch:
        batch.add_column(sa.Column("stats", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("privacy_evaluations") as batch:
        batch.drop_column("stats")
