"""Engine, sessions and the declarative base."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from flask import Flask, current_app
from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import Pool

from service.metrics import DB_POOL_CHECKED_OUT, DB_POOL_SIZE

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every ORM model."""

    metadata = MetaData(naming_convention=NAMING)


class QueuedWork:
    """Columns of a row of work done by a task: when it was created and its task last sent.

    The sweeper re-sends the task of work whose message was lost (service/recovery.py).
    """

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                              server_default=func.now())


def sqlalchemy_url(url: str) -> str:
    """Pin the psycopg 3 driver whatever scheme the deployment wrote."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, **kwargs: object) -> Engine:
    """Create an engine with connection checks so a restarted server is survived."""
    options: dict[str, object] = {"pool_size": 5, "max_overflow": 5}
    options.update(kwargs)
    if "poolclass" in options:
        options.pop("pool_size")
        options.pop("max_overflow")
    return create_engine(
        sqlalchemy_url(url), pool_pre_ping=True, connect_args={"connect_timeout": 5}, **options
    )


def init_db(app: Flask) -> None:
    """Attach an engine and a session factory to the app."""
    url = app.config.get("DATABASE_URL")
    if not url:
        raise RuntimeError(
            "DATABASE_URL is not set and no embedded services are running: "
            "run `lookalike services start` or set DATABASE_URL"
        )
    engine = make_engine(url)
    watch_pool(engine.pool)
    app.extensions["db_engine"] = engine
    app.extensions["db_sessionmaker"] = sessionmaker(engine, expire_on_commit=False)


def watch_pool(pool: Pool) -> None:
    """Keep the pool gauges current: checked out and size, updated on every checkout and return.

    Counted here rather than read at scrape time, since a scrape reaches one process and the
    gauges add up every live process's pool (service/metrics.py).
    """
    size = getattr(pool, "size", None)

    @event.listens_for(pool, "checkout")
    def _checkout(*_: object) -> None:
        DB_POOL_CHECKED_OUT.inc()
        if callable(size):
            DB_POOL_SIZE.set(size())

    @event.listens_for(pool, "checkin")
    def _checkin(*_: object) -> None:
        DB_POOL_CHECKED_OUT.dec()


def get_engine() -> Engine:
    """The current app's engine."""
    return current_app.extensions["db_engine"]


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session: Session = current_app.extensions["db_sessionmaker"]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
