"""What the command groups share: the app and its session, domain errors as exits, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.config import VAR_DIR, load_settings

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import Session

    from service.services.stack import ServiceStack


def stack() -> ServiceStack:
    """The embedded PostgreSQL and Redis under ./var."""
    from service.services.stack import ServiceStack

    return ServiceStack.in_dir(VAR_DIR)


def model_dir() -> Path:
    """MODEL_DIR from the settings."""
    return Path(load_settings()["MODEL_DIR"])


@contextmanager
def domain_errors() -> Iterator[None]:
    """Refusals of the domain (ApiError, ModelError, ValueError) as a clean exit with the reason."""
    from service.embedding.registry import ModelError
    from service.errors import ApiError

    try:
        yield
    except ApiError as exc:
        raise click.ClickException(exc.message) from exc
    except (ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def app_session() -> Iterator[tuple[Flask, Session]]:
    """The app from the environment, inside its context, with a session that commits at the end."""
    from service.app import create_app
    from service.db import session_scope

    app = create_app()
    with app.app_context(), session_scope() as session:
        yield app, session


def database_session(url: str | None = None) -> Session:
    """A session straight on DATABASE_URL, without the app (keys work before anything else)."""
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from service.db import make_engine

    url = url or load_settings().get("DATABASE_URL")
    if not url:
        raise click.ClickException("DATABASE_URL is not set and no embedded services are "
                                   "running: run `lookalike services start` first")
    return Session(make_engine(url, poolclass=NullPool), expire_on_commit=False)


def stage_progress() -> Callable[[str, int, int], None]:
    """A progress callback drawing one bar per stage; a stage that comes again gets a new bar."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage))
        bar.update(done - bar.n)
        if done == total:
            bar.close()
            bars.pop(stage)

    return progress
