"""Apply Alembic migrations from code (CLI, tests, `make run`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from service.config import PROJECT_ROOT


def alembic_config(database_url: str | None = None) -> Config:
    """The project's Alembic config, optionally bound to a URL."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    if database_url:
        cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the schema to `revision`."""
    command.upgrade(alembic_config(database_url), revision)
