"""Bulk ingestion: jobs and their items.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ingest_jobs and ingest_items."""
    op.create_table(
        "ingest_jobs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("collection", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.Text()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("progress_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_jobs"),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')",
                           name="ck_ingest_jobs_status"),
        sa.CheckConstraint("kind IN ('archive', 'path', 'manifest')", name="ck_ingest_jobs_kind"),
    )
    op.create_index("ix_ingest_jobs_created", "ingest_jobs",
                    [sa.text("created_at DESC"), sa.text("id DESC")])
    # The sweeper only looks at unfinished jobs.
    op.create_index("ix_ingest_jobs_active", "ingest_jobs", ["status"],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.create_table(
        "ingest_items",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("job_id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("source", sa.Text()),
        sa.Column("metadata", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("image_id", UUID(as_uuid=True)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claim_token", UUID(as_uuid=True)),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_items"),
        sa.ForeignKeyConstraint(["job_id"], ["ingest_jobs.id"], ondelete="CASCADE",
                                name="fk_ingest_items_job_id_ingest_jobs"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="SET NULL",
                                name="fk_ingest_items_image_id_images"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed', 'duplicate', 'cancelled')",
            name="ck_ingest_items_status"),
    )
    # One index serves claiming (job, pending, id order), paging by status and the counts.
    op.create_index("ix_ingest_items_job_status_id", "ingest_items", ["job_id", "status", "id"])
    # Deleting an image sets image_id to NULL here; without an index that scans every item.
    op.create_index("ix_ingest_items_image_id", "ingest_items", ["image_id"])


def downgrade() -> None:
    """Drop the ingestion tables."""
    op.drop_table("ingest_items")
    op.drop_table("ingest_jobs")
