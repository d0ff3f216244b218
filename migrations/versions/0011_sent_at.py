"""When each evaluation, code-set fit and reindex run last had its task sent (the sweeper).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None
TABLES = ("evaluations", "code_sets", "reindex_runs")


def upgrade() -> None:
    """Add sent_at to the three tables of queued work."""
    for table in TABLES:
        op.add_column(table, sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False,
                                       server_default=sa.func.now()))


def downgrade() -> None:
    """Drop sent_at."""
    for table in TABLES:
        op.drop_column(table, "sent_at")
