"""ORM model of the per-image ImageNet class probabilities."""

from __future__ import annotations

import uuid

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import ForeignKey, Integer
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base

CLASSES = 1000


class ImageClasses(Base):
    """The softmax over the 1,000 ImageNet classes of one image under one model."""

    __tablename__ = "image_classes"

    image_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    probs: Mapped[list[float]] = mapped_column(HALFVEC(CLASSES), nullable=False)
