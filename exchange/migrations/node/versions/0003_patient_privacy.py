"""Patient-level privacy: each patient's spend per study (lifetime caps), one charged hold-out
evaluation per round, delta limits, and plans counted in patients.

The tables are defined in federated/privacy_ledger.py; this migration spells the changes out so
that later edits of that module do not rewrite history. Existing plans were record-level: their
record count becomes the patient count (one record per patient was all earlier nodes could train
on without over-counting, and the rename keeps them readable).

Revision ID: 0003_patient_privacy
Revises: 0002_node_store
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_patient_privacy"
down_revision = "0002_node_store"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("privacy_budget") as batch:
        batch.add_column(sa.Column("max_delta", sa.Float(), nullable=True))
        batch.add_column(sa.Column("total_delta", sa.Float(), nullable=True))
    with op.batch_alter_table("privacy_studies") as batch:
        batch.alter_column("n_records", new_column_name="n_patients", existing_type=sa.Integer(),
                           existing_nullable=False)
        batch.add_column(sa.Column("eval_noise_multiplier", sa.Float(), nullable=True))
        batch.add_column(sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "privacy_evaluations",
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("count", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["privacy_studies.study_id"],
                                name=op.f("fk_privacy_evaluations_study_id_privacy_studies")),
        sa.PrimaryKeyConstraint("study_id", "slot", name=op.f("pk_privacy_evaluations")),
    )
    op.create_table(
        "privacy_patient_spend",
        sa.Column("pseudonym", sa.String(length=256), nullable=False),
        sa.Column("study_id", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=8), nullable=False),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["privacy_studies.study_id"],
                                name=op.f("fk_privacy_patient_spend_study_id_privacy_studies")),
        sa.PrimaryKeyConstraint("pseudonym", "study_id", name=op.f("pk_privacy_patient_spend")),
    )
    op.create_index("ix_privacy_patient_spend_study_id", "privacy_patient_spend", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_privacy_patient_spend_study_id", table_name="privacy_patient_spend")
    op.drop_table("privacy_patient_spend")
    op.drop_table("privacy_evaluations")
    with op.batch_alter_table("privacy_studies") as batch:
        batch.drop_column("closed_at")
        batch.drop_column("eval_noise_multiplier")
        batch.alter_column("n_patients", new_column_name="n_records", existing_type=sa.Integer(),
                           existing_nullable=False)
    with op.batch_alter_table("privacy_budget") as batch:
        batch.drop_column("total_delta")
        batch.drop_column("max_delta")
