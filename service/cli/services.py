"""`lookalike services`: the embedded PostgreSQL and Redis."""

from __future__ import annotations

import sys

import click

from service.cli.console import stack


@click.group()
def services() -> None:
    """The embedded PostgreSQL and Redis used when DATABASE_URL/REDIS_URL are unset."""


@services.command("start")
def services_start() -> None:
    """Start both services under ./var and print their URLs."""
    for name, url in stack().start().items():
        click.echo(f"{name}={url}")


@services.command("stop")
def services_stop() -> None:
    """Stop both services."""
    stack().stop()
    click.echo("stopped")


@services.command("status")
def services_status() -> None:
    """Say which services run; exit 1 if any is down."""
    status = stack().status()
    for name, up in status.items():
        click.echo(f"{name}: {'running' if up else 'stopped'}")
    sys.exit(0 if all(status.values()) else 1)
