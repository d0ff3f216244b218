"""The default model: stored in the database so that a switch is atomic for every process."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import current_app
from sqlalchemy import DateTime, String, func, select
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.db import Base

DEFAULT_MODEL_KEY = "default_model"


class ServiceSetting(Base):
    """A runtime setting shared by the API and the workers."""

    __tablename__ = "service_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())


def default_model(*, session: Session) -> str:
    """The switched-to default model if one was set, else the configured DEFAULT_MODEL."""
    value = session.scalar(select(ServiceSetting.value).where(
        ServiceSetting.key == DEFAULT_MODEL_KEY))
    return str(value) if value else str(current_app.config["DEFAULT_MODEL"])


def set_default_model(name: str, *, session: Session) -> None:
    """Make `name` the default in one statement: every process sees the switch at once."""
    stmt = insert(ServiceSetting).values(key=DEFAULT_MODEL_KEY, value=name)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["key"], set_={"value": stmt.excluded.value, "updated_at": func.now()}))
    session.commit()
