"""`lookalike db`: schema migrations."""

from __future__ import annotations

import click

from service.config import load_settings


@click.group()
def db() -> None:
    """Schema migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from service.migrate import upgrade

    upgrade(load_settings().get("DATABASE_URL"), revision)
    click.echo(f"database at {revision}")
