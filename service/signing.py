"""The server's signing key: LOOKALIKE_SECRET_KEY, else one generated once and kept in the database.

Kept in the database so that every API process and machine of an installation shares it with no
configuration, and a restart does not invalidate the cursors that clients hold.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.db import Base

SIGNING_KEY = "signing"
KEY_BYTES = 32


class ServiceSecret(Base):
    """A secret of the installation, created at first use."""

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 server_default=func.now())


def signing_key(*, session: Session, configured: str | None = None) -> bytes:
    """The key that signs cursors: the configured secret, or the installation's stored one."""
    if configured:
        return hashlib.sha256(configured.encode()).digest()
    session.execute(insert(ServiceSecret).values(name=SIGNING_KEY, value=os.urandom(KEY_BYTES))
                    .on_conflict_do_nothing(index_elements=["name"]))
    key = session.scalar(select(ServiceSecret.value).where(ServiceSecret.name == SIGNING_KEY))
    session.commit()
    assert key is not None  # inserted above, or by a concurrent first start
    return key
