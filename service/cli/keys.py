"""`lookalike keys`: create (the token is printed once), revoke, list."""

from __future__ import annotations

import click

from service.cli.console import database_session, domain_errors


@click.group()
def keys() -> None:
    """API keys: create (the token is printed once), revoke, list."""


@keys.command("create")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="read",
              show_default=True, help="read: GET and search; write: + uploads, changes, "
              "jobs; admin: everything, every collection.")
@click.option("--collections", help="Comma-separated collections the key may see "
              "(required unless --scope admin).")
@click.option("--name", default="", help="A label for listings.")
def keys_create(scope: str, collections: str | None, name: str) -> None:
    """Create a key and print its token (shown this once; only a hash is stored)."""
    from service.auth.service import create_key

    names = None if collections is None else [c for c in collections.split(",") if c.strip()]
    if scope != "admin" and not names:
        raise click.UsageError("--collections is required for read and write keys")
    with database_session() as session, domain_errors():
        created = create_key(session=session, scope=scope, collections=names, name=name)
        session.commit()
    key = created.key
    click.echo(f"created key {key.id} (prefix {key.prefix}, scope {key.scope}, collections "
               f"{', '.join(key.collections) if key.collections else 'all'})", err=True)
    click.echo("the token is shown once; store it now:", err=True)
    click.echo(created.token)


@keys.command("revoke")
@click.argument("id_or_prefix")
def keys_revoke(id_or_prefix: str) -> None:
    """Revoke a key by id or prefix: its token stops working at once."""
    from service.auth.service import revoke_key

    with database_session() as session, domain_errors():
        key = revoke_key(id_or_prefix, session=session)
        session.commit()
    click.echo(f"revoked {key.id} (prefix {key.prefix})")


@keys.command("list")
def keys_list() -> None:
    """Every key: id, prefix, scope, collections, name, dates (never a secret)."""
    from service.auth.service import list_keys

    with database_session() as session:
        rows = list_keys(session=session)
    click.echo(f"{'id':36s}  {'prefix':12s}  {'scope':5s}  {'status':7s}  {'last used':19s}  "
               "collections / name")
    for key in rows:
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if key.last_used_at else "never"
        status = "revoked" if key.revoked_at else "active"
        where = ",".join(key.collections) if key.collections else "*"
        click.echo(f"{key.id!s:36s}  {key.prefix:12s}  {key.scope:5s}  {status:7s}  "
                   f"{used:19s}  {where}{'  ' + key.name if key.name else ''}")
