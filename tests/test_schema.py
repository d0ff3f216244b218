"""The ORM models are the schema: autogenerate against a migrated database proposes nothing."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine

from service.db import sqlalchemy_url
from service.schema import include_object, metadata
from service.services.stack import ServiceStack


def _differences(url: str, target: MetaData) -> list[Any]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "compare_type": True, "include_object": include_object})
            return compare_metadata(context, target)
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference(stack: ServiceStack) -> None:
    diff = _differences(stack.postgres.url(), metadata)
    assert diff == [], f"the models and the migrations disagree: {diff}"


def test_every_migrated_table_is_in_the_metadata(stack: ServiceStack) -> None:
    """The comparison sees tables at all: an empty metadata would drop every one."""
    dropped = {d[1].name for d in _differences(stack.postgres.url(), MetaData())
               if d[0] == "remove_table"}
    assert dropped == set(metadata.tables), dropped ^ set(metadata.tables)
