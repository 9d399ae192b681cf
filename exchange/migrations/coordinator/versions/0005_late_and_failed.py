"""`study_decisions.late` and `study_rounds.failed`.

- `late`: a hospital's refusal that reached the coordinator after the study had left
  `submitted` (started, or already ended). It is recorded (the hospital's signed
  `study.decision` entry is appended as every decision is) so that the researcher sees its
  reasons, but it changes nothing about the study.
- `failed`: a round the run reported with `metrics["round_failed"] == 1.0` (federated's
  ServerApp, right before `on_failed`). Its receipts are logged (they are privacy spent), but
  the round is not counted in `rounds_completed` nor listed among the completed rounds.

Both default to false, so existing rows keep their meaning. Batch mode (SQLite rebuilds the
table). Downgrade deletes the late-decision and failed-round rows before dropping the columns:
a 0004 coordinator has no way to tell them apart and would count a failed round as completed.
The log keeps every entry they were made from (the rows are a projection of it).

Revision ID: 0005_late_and_failed
Revises: 0004_audit_log_meta
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_late_and_failed"
down_revision = "0004_audit_log_meta"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_decisions") as batch:
        batch.add_column(sa.Column("late", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("study_rounds") as batch:
        batch.add_column(sa.Column("failed", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    decisions = sa.table("study_decisions", sa.column("late", sa.Boolean()))
    rounds = sa.table("study_rounds", sa.column("failed", sa.Boolean()))
    op.execute(sa.delete(decisions).where(decisions.c.late.is_(True)))
    op.execute(sa.delete(rounds).where(rounds.c.failed.is_(True)))
    with op.batch_alter_table("study_rounds") as batch:
        batch.drop_column("failed")
    with op.batch_alter_table("study_decisions") as batch:
        batch.drop_column("late")
