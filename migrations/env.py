"""Alembic environment: the URL comes from the same settings as the app."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from service.config import load_settings
from service.db import make_engine, sqlalchemy_url
from service.schema import include_object, metadata

config = context.config
target_metadata = metadata


def database_url() -> str:
    """The URL given by the caller (tests, CLI) or by the settings."""
    url = config.attributes.get("database_url") or load_settings().get("DATABASE_URL")
    if not url:
        raise RuntimeError("DATABASE_URL is not set and no embedded services are running")
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    """Emit SQL without a database connection."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations over a live connection."""
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=include_object)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
