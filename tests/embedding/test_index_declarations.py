"""The migration to index_builds declares the runtime indexes a database already has."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.schema import CreateIndex

from service.db import sqlalchemy_url
from service.embedding.models import hnsw_index, hnsw_index_name
from service.hashing.models import code_index, code_index_name
from service.migrate import upgrade
from service.services.stack import ServiceStack


@pytest.fixture
def old_database(stack: ServiceStack) -> Iterator[str]:
    """A database of its own, migrated to the revision before index_builds."""
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(sqlalchemy_url(stack.postgres.url()), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = stack.postgres.url(name)
    try:
        upgrade(url, "0013")
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _old_indexes(engine: Engine) -> tuple[int, int]:
    """A model and a code set whose indexes were built the old way, in their transaction."""
    with engine.begin() as conn:
        model_id = conn.scalar(text("INSERT INTO models (name, version, dim, sha256) "
                                    "VALUES ('old', '1', 8, :s) RETURNING id"), {"s": "0" * 64})
        set_id = conn.scalar(text(
            "INSERT INTO code_sets (name, model_id, method, bits, seed, status) "
            "VALUES ('old', :m, 'lsh', 64, 0, 'ready') RETURNING id"), {"m": model_id})
        conn.execute(CreateIndex(hnsw_index(model_id, 8, "cosine")))
        conn.execute(CreateIndex(code_index(set_id, 64)))
    return int(model_id), int(set_id)


def test_existing_runtime_indexes_are_declared_ready(old_database: str) -> None:
    engine = create_engine(sqlalchemy_url(old_database))
    try:
        model_id, set_id = _old_indexes(engine)
        upgrade(old_database)
        with engine.connect() as conn:
            rows = {r.name: r for r in conn.execute(text(
                "SELECT name, model_id, status, ddl, built_at FROM index_builds"))}
        assert set(rows) == {hnsw_index_name(model_id, "cosine"), code_index_name(set_id)}
        for row in rows.values():
            assert row.model_id == model_id and row.status == "ready" and row.built_at
            assert row.ddl.startswith("CREATE INDEX CONCURRENTLY IF NOT EXISTS "), row.ddl
        # The declared statement rebuilds the same index, CONCURRENTLY, outside a transaction.
        name = hnsw_index_name(model_id, "cosine")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            before = conn.scalar(text("SELECT pg_get_indexdef(to_regclass(:n))"), {"n": name})
            conn.execute(text(f'DROP INDEX CONCURRENTLY "{name}"'))
            conn.execute(text(rows[name].ddl))
            after = conn.scalar(text("SELECT pg_get_indexdef(to_regclass(:n))"), {"n": name})
        assert after == before
    finally:
        engine.dispose()
