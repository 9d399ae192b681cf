"""FHIR Consent updates: each contract version imported from a FHIR Consent keeps the Consent's
`meta.versionId` and `meta.lastUpdated`, so a re-imported older export is told apart from an
update (a stale copy never re-activates a revoked consent).

Revision ID: 0007_fhir_consent_versions
Revises: 0005_evaluation_statistics
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_fhir_consent_versions"
down_revision = "0006_decision_counts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("consent_contracts") as batch:
        batch.add_column(sa.Column("fhir_version_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("fhir_last_updated", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consent_contracts") as batch:
        batch.drop_column("fhir_last_updated")
        batch.drop_column("fhir_version_id")
