"""ORM model of an API key: only a salted hash of its secret is stored."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, LargeBinary, String, UniqueConstraint, func
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base

SCOPES = ("read", "write", "admin")


class ApiKey(Base):
    """One API key (migration 0006)."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("scope IN ('read', 'write', 'admin')", name="scope"),
        UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          default=uuid.uuid4)
    prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    salt: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False, server_default="")
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    # None: every collection (admin keys); otherwise the only collections the key sees.
    collections: Mapped[list[str] | None] = mapped_column(ARRAY(String(128)))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
