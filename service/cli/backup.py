"""`lookalike backup DIR` and `lookalike restore DIR`: the database and every stored object."""

from __future__ import annotations

import json
from typing import Any

import click

from service.cli.console import domain_errors, stage_progress
from service.config import load_settings


def _target() -> tuple[str, Any]:
    """DATABASE_URL and the content store the settings name."""
    from service.images.storage import open_store

    settings = load_settings()
    url = settings.get("DATABASE_URL")
    if not url:
        raise click.ClickException("DATABASE_URL is not set and no embedded services are "
                                   "running: run `lookalike services start` first")
    return str(url), open_store(settings)


@click.command("backup")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--pg-bin", type=click.Path(file_okay=False), default=None,
              help="Folder of pg_dump (default: the embedded wheel's, else PATH).")
def backup(directory: str, pg_bin: str | None) -> None:
    """Write a consistent dump and a copy of every original and thumbnail into DIRECTORY."""
    from service.backup.service import backup as run_backup

    url, store = _target()
    with domain_errors():
        result = run_backup(directory, database_url=url, store=store, pg_bin=pg_bin,
                            progress=stage_progress())
    click.echo(json.dumps({"directory": str(result.directory), "originals": result.originals,
                           "thumbnails": result.thumbnails, "bytes": result.bytes,
                           "referenced_missing": len(result.referenced_missing),
                           "corrupt": len(result.corrupt), "timings": result.timings}))
    if result.referenced_missing or result.corrupt:
        click.echo(f"warning: {len(result.referenced_missing)} referenced originals were "
                   f"missing and {len(result.corrupt)} did not match their digest (named in "
                   "backup.json); `lookalike check` reports them", err=True)


@click.command("restore")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--pg-bin", type=click.Path(file_okay=False), default=None,
              help="Folder of pg_restore (default: the embedded wheel's, else PATH).")
def restore(directory: str, pg_bin: str | None) -> None:
    """Restore a backup into an empty installation (verified before anything is written)."""
    from service.backup.restore import restore as run_restore

    url, store = _target()
    with domain_errors():
        result = run_restore(directory, database_url=url, store=store, pg_bin=pg_bin,
                             progress=stage_progress())
    click.echo(json.dumps({"originals": result.originals, "thumbnails": result.thumbnails,
                           "bytes": result.bytes, "timings": result.timings}))
