"""Jobs: archives are expanded by a worker (status `expanding`), with a job-level reason.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OLD_STATUSES = "status IN ('queued', 'running', 'done', 'failed', 'cancelled')"
NEW_STATUSES = "status IN ('expanding', 'queued', 'running', 'done', 'failed', 'cancelled')"


def upgrade() -> None:
    """Allow `expanding`, add the job's error code and expansion attempts, widen the index."""
    op.drop_constraint("ck_ingest_jobs_status", "ingest_jobs", type_="check")
    op.create_check_constraint("ck_ingest_jobs_status", "ingest_jobs", NEW_STATUSES)
    op.add_column("ingest_jobs", sa.Column("error_code", sa.String(64)))
    # Starts of the expansion: a worker that dies on an archive every time must not loop.
    op.add_column("ingest_jobs", sa.Column("attempts", sa.Integer(), nullable=False,
                                           server_default="0"))
    op.drop_index("ix_ingest_jobs_active", table_name="ingest_jobs")
    op.create_index("ix_ingest_jobs_active", "ingest_jobs", ["status"],
                    postgresql_where=sa.text("status IN ('expanding', 'queued', 'running')"))


def downgrade() -> None:
    """Back to expansion in the request (expanding jobs become failed)."""
    op.execute("UPDATE ingest_jobs SET status = 'failed', error = 'expansion interrupted by a "
               "downgrade' WHERE status = 'expanding'")
    op.drop_index("ix_ingest_jobs_active", table_name="ingest_jobs")
    op.create_index("ix_ingest_jobs_active", "ingest_jobs", ["status"],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_column("ingest_jobs", "attempts")
    op.drop_column("ingest_jobs", "error_code")
    op.drop_constraint("ck_ingest_jobs_status", "ingest_jobs", type_="check")
    op.create_check_constraint("ck_ingest_jobs_status", "ingest_jobs", OLD_STATUSES)
