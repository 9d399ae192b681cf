"""`studies.start_deadline` and the `expired` study status.

A study that has not started by its start deadline ends as `expired`: its escrow is refunded
and the hospitals' approvals are released (docs/coordinator-api.md, "Deadlines"). Studies
submitted before this migration get the default deadline, seven days after their submission,
so none of them stays escrowed forever.

Batch mode (SQLite rebuilds the table); the status column's CHECK constraint is replaced by one
that allows `expired`. Downgrade turns expired studies into cancelled ones (both refunded; the
log keeps the `study.expire` entry they came from) before dropping the column.

Revision ID: 0006_start_deadline
Revises: 0005_late_and_failed
"""
from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision = "0006_start_deadline"
down_revision = "0005_late_and_failed"
branch_labels = None
depends_on = None

DEFAULT_START_WINDOW = timedelta(days=7)  # as exchange.study.lifecycle at this revision
OLD_STATUSES = ("submitted", "running", "completed", "failed", "cancelled")


def _status(*values: str) -> sa.Enum:
    return sa.Enum(*values, name="study_status", native_enum=False, create_constraint=True, length=32)


STUDIES = sa.table("studies", sa.column("id", sa.String()), sa.column("status", sa.String()),
                   sa.column("submitted_at", sa.DateTime(timezone=True)),
                   sa.column("start_deadline", sa.DateTime(timezone=True)))


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("start_deadline", sa.DateTime(timezone=True), nullable=True))
    connection = op.get_bind()
    for study_id, submitted_at in connection.execute(sa.select(STUDIES.c.id, STUDIES.c.submitted_at)):
        connection.execute(sa.update(STUDIES).where(STUDIES.c.id == study_id)
                           .values(start_deadline=submitted_at + DEFAULT_START_WINDOW))
    with op.batch_alter_table("studies") as batch:
        batch.alter_column("start_deadline", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.alter_column("status", existing_type=_status(*OLD_STATUSES),
                           type_=_status(*OLD_STATUSES, "expired"), existing_nullable=False)
        batch.create_index("ix_studies_start_deadline", ["start_deadline"])


def downgrade() -> None:
    op.execute(sa.update(STUDIES).where(STUDIES.c.status == "expired").values(status="cancelled"))
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_start_deadline")
        batch.alter_column("status", existing_type=_status(*OLD_STATUSES, "expired"),
                           type_=_status(*OLD_STATUSES), existing_nullable=False)
        batch.drop_column("start_deadline")
