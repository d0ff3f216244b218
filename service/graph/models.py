"""ORM model of the kNN graph's directed edges."""

from __future__ import annotations

import uuid

from sqlalchemy import REAL, ForeignKey, Integer
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base


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
