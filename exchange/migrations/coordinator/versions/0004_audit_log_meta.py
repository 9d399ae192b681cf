"""`audit_log_meta`: the log's trust anchors (origin, root operator public key, log public key),
written once when the coordinator first opens the log, so `audit export --db` needs no
separate trust file. Write-once like the other audit tables (triggers from
`audit.store.meta_trigger_ddl`). The table is spelled out here (a migration is a frozen
snapshot); tests/audit/test_store_schema.py compares it with `audit.store.AUDIT_METADATA`.

Downgrade drops it: the anchors are a copy of what the operator holds (trust.json, key
files), not log evidence, and the coordinator records them again on its next start.

Revision ID: 0004_audit_log_meta
Revises: 0003_drop_ledger_balances
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audit.store import drop_meta_trigger_ddl, meta_trigger_ddl

revision = "0004_audit_log_meta"
down_revision = "0003_drop_ledger_balances"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log_meta",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("origin", sa.Text(), nullable=False, comment="the checkpoint origin line"),
        sa.Column("operator_public_key", sa.LargeBinary(32), nullable=False,
                  comment="the root operator key: root of the keyring"),
        sa.Column("log_public_key", sa.LargeBinary(32), nullable=False,
                  comment="signs the checkpoints"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_log_meta_single_row"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log_meta"),
        comment="The log's trust anchors, written once when the log is created (triggers refuse "
                "UPDATE, DELETE, TRUNCATE and a second row).",
    )
    for statement in meta_trigger_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_meta_trigger_ddl(op.get_bind().dialect.name):
        op.execute(statement)
    op.drop_table("audit_log_meta")
