"""Drop `ledger_balances`: balances are the audit package's Ledger fold of the log (DESIGN: one
implementation), served and checked by exchange.coordinator.auditing.LedgerView.

Downgrade recreates the table and fills it by folding the log with that same Ledger, so a
0002 coordinator started on a downgraded database serves the right balances.

Revision ID: 0003_drop_ledger_balances
Revises: 0002_coordinator
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_drop_ledger_balances"
down_revision = "0002_coordinator"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("ledger_balances")


def downgrade() -> None:
    from audit.ledger import Ledger
    from audit.store import entry_from_leaf

    table = op.create_table(
        "ledger_balances",
        sa.Column("account", sa.String(200), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.CheckConstraint("balance >= 0", name="balance_non_negative"),
    )
    ledger = Ledger()  # root: the signer of entry 0, as in a valid log
    rows = op.get_bind().execute(sa.text("SELECT idx, leaf FROM audit_entries ORDER BY idx"))
    for row in rows:
        ledger.apply(entry_from_leaf(bytes(row.leaf)), int(row.idx))
    balances = [{"account": a, "balance": b} for a, b in sorted(ledger.state.balances.items())]
    if balances:
        op.bulk_insert(table, balances)
