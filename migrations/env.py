"""Alembic environment: the URL comes from the same settings as the app."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

import service.embedding.defaults  # noqa: F401  (registers tables on Base.metadata)
import service.embedding.models  # noqa: F401
import service.embedding.reindex  # noqa: F401
import service.evaluation.models  # noqa: F401
import service.images.models  # noqa: F401
import service.signing  # noqa: F401
from service.config import load_settings
from service.db import Base, make_engine, sqlalchemy_url

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL given by the caller (tests, CLI) or by the settings."""
    url = config.attributes.get("database_url") or load_settings().get("DATABASE_URL")
    if not url:
        raise RuntimeError("DATABASE_URL is not set and no embedded services are running")
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    """Emit SQL without a database connection."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations over a live connection."""
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
