"""ORM models of ingestion jobs and their items."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base
from service.logs import MAX_REQUEST_ID, current_request_id

JOB_STATUSES = ("expanding", "queued", "running", "done", "failed", "cancelled")
# An uploaded archive waits for a worker to extract it; its items do not exist yet.
EXPANDING = "expanding"
# Jobs whose items batches may claim.
BATCH_JOB_STATUSES = ("queued", "running")
ACTIVE_JOB_STATUSES = (EXPANDING, *BATCH_JOB_STATUSES)
ITEM_STATUSES = ("pending", "running", "done", "failed", "duplicate", "cancelled")
TERMINAL_ITEM_STATUSES = ("done", "failed", "duplicate", "cancelled")
JOB_KINDS = ("archive", "path", "manifest")


class IngestJob(Base):
    """One bulk submission; its counts are derived from its items."""

    __tablename__ = "ingest_jobs"
    __table_args__ = (
        CheckConstraint("status IN ('expanding', 'queued', 'running', 'done', 'failed', "
                        "'cancelled')", name="status"),
        CheckConstraint("kind IN ('archive', 'path', 'manifest')", name="kind"),
        Index("ix_ingest_jobs_created", text("created_at DESC"), text("id DESC")),
        Index("ix_ingest_jobs_active", "status",
              postgresql_where=text("status IN ('expanding', 'queued', 'running')")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    source: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    # Why the job as a whole failed (a bad archive), as an error code and a message.
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # Starts of the archive's expansion; the sweeper gives up after JOB_MAX_ATTEMPTS.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0,
                                          server_default=text("0"))
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Last time a batch committed: the sweeper treats a job without progress as stalled.
    progress_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    # The X-Request-ID of the request that created the job, filled in at INSERT from the log
    # context: the batch tasks log it, including those the sweeper sends again.
    request_id: Mapped[str | None] = mapped_column(String(MAX_REQUEST_ID),
                                                   default=current_request_id)


class IngestItem(Base):
    """One file of a job: where its bytes are, its metadata, and what became of it."""

    __tablename__ = "ingest_items"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed', 'duplicate', 'cancelled')",
            name="status"),
        Index("ix_ingest_items_job_status_id", "job_id", "status", "id"),
        Index("ix_ingest_items_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("ingest_jobs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    # Absolute path of the bytes: the job folder for archives, the server file otherwise.
    source: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    image_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="SET NULL"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Which task message owns a running item; a retry of the same message re-claims it.
    claim_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now())
