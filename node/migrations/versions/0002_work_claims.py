"""Work claims for several nodes on one database: owner and lease of jobs, corrections and
deliveries; the node that recorded each job event; a retry time and a failure count for corrections.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_CLAIMED = ("jobs", "corrections", "deliveries")


def upgrade() -> None:
    """Add the claim columns and their indexes."""
    for table in _CLAIMED:
        op.add_column(table, sa.Column("owner", sa.String(64), nullable=True))
        op.add_column(table, sa.Column("lease_until", sa.Float, nullable=True))
        op.create_index(f"ix_{table}_owner", table, ["owner"])
    op.add_column("corrections", sa.Column("not_before", sa.Float, nullable=False, server_default="0"))
    op.add_column("corrections", sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_corrections_state", "corrections", ["state"])
    op.add_column("job_events", sa.Column("node", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    """Remove them."""
    op.drop_column("job_events", "node")
    op.drop_index("ix_corrections_state", "corrections")
    op.drop_column("corrections", "failures")
    op.drop_column("corrections", "not_before")
    for table in _CLAIMED:
        op.drop_index(f"ix_{table}_owner", table)
        op.drop_column(table, "lease_until")
        op.drop_column(table, "owner")
