"""`ledger_snapshots`: the coordinator's ledger fold at some log size, signed by its key, so that
start-up folds only the entries after it (exchange/coordinator/ledger_snapshot.py). A cache: it
may be dropped at any time, and start-up then folds the whole log.

Revision ID: 0008_ledger_snapshot
Revises: 0007_hospital_last_contact
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_ledger_snapshot"
down_revision = "0007_hospital_last_contact"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_snapshots",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("fold_format", sa.String(64), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size"),
    )


def downgrade() -> None:
    op.drop_table("ledger_snapshots")
