"""A survival study's noised event count, drawn with its decision count (docs/privacy.md,
"Counts"): the Cox template's minimum-events rule reads it, never the exact events.

The column is defined in federated/privacy_ledger.py; this migration spells it out so that later
edits of that module do not rewrite history.

Revision ID: 0008_decision_events
Revises: 0007_fhir_consent_versions
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_decision_events"
down_revision = "0007_fhir_consent_versions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("privacy_decisions", sa.Column("noisy_events", sa.Integer(), nullable=True))


def downgrade() -> None:
    # a plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch copy would drop the table
    # that privacy_decision_patients references
    op.drop_column("privacy_decisions", "noisy_events")
