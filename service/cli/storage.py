"""`lookalike storage`: the content store of originals and thumbnails."""

from __future__ import annotations

import click

from service.cli.console import app_session


@click.group()
def storage() -> None:
    """Originals and thumbnails (local disk or S3, see STORAGE_URL)."""


@storage.command("orphans")
@click.option("--remove", is_flag=True, help="Delete them (each under its content lock).")
def storage_orphans(remove: bool) -> None:
    """List stored originals that no image references; with --remove, delete them."""
    from service.images.orphans import orphaned_digests, remove_orphans

    with app_session() as (app, session):
        store = app.extensions["content_store"]
        if remove:
            click.echo(f"removed {remove_orphans(session=session, store=store)} orphans")
            return
        count = 0
        for digest in orphaned_digests(session=session, store=store):
            click.echo(digest)
            count += 1
        click.echo(f"{count} orphans", err=True)
