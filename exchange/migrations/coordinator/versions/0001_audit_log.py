"""The audit log: entries, complete-subtree hashes, checkpoints; append-only triggers.

The tables are spelled out here (a migration is a frozen snapshot); they match
`audit.store.AUDIT_METADATA` (tests/audit/test_store_schema.py compares them). The trigger DDL
comes from `audit.store.append_only_trigger_ddl`, so the migration and the tests install the
very same triggers.

Revision ID: 0001_audit_log
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from audit.store import append_only_trigger_ddl, drop_append_only_trigger_ddl

revision = "0001_audit_log"
down_revision = None
branch_labels = None
depends_on = None


def _index_type() -> sa.types.TypeEngine[int]:
    # SQLite: INTEGER PRIMARY KEY is the rowid (the table is clustered by idx).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("idx", _index_type(), autoincrement=False, nullable=False,
                  comment="0-based position in the log; contiguous, enforced by a trigger"),
        sa.Column("leaf", sa.LargeBinary(), nullable=False,
                  comment="RFC 8785 encoding of the whole envelope: the Merkle leaf input"),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False, comment="SHA-256(0x00 || leaf)"),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("time", sa.String(32), nullable=False,
                  comment="the envelope's RFC 3339 UTC time"),
        sa.CheckConstraint("idx >= 0", name="ck_audit_entries_idx_nonnegative"),
        sa.PrimaryKeyConstraint("idx", name="pk_audit_entries"),
        sa.UniqueConstraint("leaf_hash", name="uq_audit_entries_leaf_hash"),
        comment="The audit log's entries. Append-only: triggers refuse UPDATE, DELETE, TRUNCATE.",
    )
    op.create_index("ix_audit_entries_kind", "audit_entries", ["kind"])
    op.create_table(
        "audit_tree_nodes",
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("idx", _index_type(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.CheckConstraint("level >= 0 AND level < 64 AND idx >= 0",
                           name="ck_audit_tree_nodes_position"),
        sa.PrimaryKeyConstraint("level", "idx", name="pk_audit_tree_nodes"),
        sqlite_with_rowid=False,
        comment="Hash of every complete subtree over leaves [idx*2^level, (idx+1)*2^level).",
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", _index_type(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False, comment="C2SP signed note, as served"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("size >= 0", name="ck_audit_checkpoints_size_nonnegative"),
        sa.PrimaryKeyConstraint("size", name="pk_audit_checkpoints"),
        comment="Checkpoints the log signed; sizes only grow (trigger).",
    )
    for statement in append_only_trigger_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    # Dropping a log that holds entries would destroy the evidence it exists to keep.
    bind = op.get_bind()
    count = bind.execute(sa.text("SELECT COUNT(*) FROM audit_entries")).scalar_one()
    if count:
        raise RuntimeError(f"audit_entries holds {count} entries: refusing to drop the audit "
                           f"log (export it and drop the tables by hand if you really must)")
    for statement in drop_append_only_trigger_ddl(bind.dialect.name):
        op.execute(statement)
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_tree_nodes")
    op.drop_index("ix_audit_entries_kind", table_name="audit_entries")
    op.drop_table("audit_entries")
