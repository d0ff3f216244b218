"""The request id that created each ingest job, so its batch tasks can log it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ingest_jobs.request_id (empty for the jobs created before it)."""
    op.add_column("ingest_jobs", sa.Column("request_id", sa.String(128), nullable=True))


def downgrade() -> None:
    """Drop ingest_jobs.request_id."""
    op.drop_column("ingest_jobs", "request_id")
