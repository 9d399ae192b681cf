"""`hospitals.last_contact_at`: when the hospital last made an authenticated (signed) request,
so the operator sees a node that stopped polling (`GET /v1/hospitals`). Set in the same
transaction that records the request's nonce; null until the first contact.

Revision ID: 0007_hospital_last_contact
Revises: 0005_late_and_failed
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_hospital_last_contact"
down_revision = "0006_start_deadline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hospitals") as batch:
        batch.add_column(sa.Column("last_contact_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hospitals") as batch:
        batch.drop_column("last_contact_at")
