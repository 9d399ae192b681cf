"""Each mapped column keeps the value type its import mappings declare, so the published catalog
shows the declared type instead of one computed over the records (docs/privacy.md, "Counts":
a single record's value must not change what leaves the hospital).

Revision ID: 0009_column_value_types
Revises: 0008_decision_events
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_column_value_types"
down_revision = "0008_decision_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("column_categories", sa.Column("value_type", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("column_categories", "value_type")
