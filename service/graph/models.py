"""ORM models of the kNN graph's directed edges and of requested graph rebuilds."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import REAL, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, QueuedWork


class GraphEdge(Base):
    """source -> target: target is one of source's k nearest images (same collection, model)."""

    __tablename__ = "graph_edges"

    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    source_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    target_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True,
        index=True)
    distance: Mapped[float] = mapped_column(REAL, nullable=False)


class GraphRebuild(QueuedWork, Base):
    """A requested exact rebuild of one collection's graph: queued until a task has done it.

    The sweeper re-sends a rebuild still queued whose message was lost (service/recovery.py).
    """

    __tablename__ = "graph_rebuilds"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'done', 'failed')", name="status"),
        # The rebuild task looks for the other queued requests of the same graph.
        Index("ix_graph_rebuilds_queued", "collection", "model_id",
              postgresql_where=sql_text("status = 'queued'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          default=uuid.uuid4)
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    edges: Mapped[int | None] = mapped_column(Integer)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
