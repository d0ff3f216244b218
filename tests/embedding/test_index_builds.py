"""Runtime HNSW indexes are built CONCURRENTLY by the worker: writers go on, search stays exact.

Every build here runs in the real worker; the tests hold no transaction of their own while a
build waits, except the deliberate `blocker`, an open writer on image_embeddings that keeps a
CONCURRENTLY build in its first wait so that it can be watched in progress.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import Engine, delete, insert, select, text, update
from sqlalchemy.engine import Connection

from service.db import get_engine, session_scope
from service.embedding.indexes import concurrent_ddl, request_build, validity
from service.embedding.models import EmbeddingModel, IndexBuild, hnsw_index
from service.embedding.service import index_name, save_vectors
from service.images.models import Image
from service.queue import SWEEP_JOBS, enqueue
from service.search.vectors import search_vectors
from tests.search.test_service import exact_order, make_model

DIM = 32
# Statements of the tests give up instead of hanging when something blocks them.
LOCK_TIMEOUT = "5s"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll until `check` returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def engine_of(app: Flask) -> Engine:
    with app.app_context():
        return get_engine()


def concurrent_build_pid(engine: Engine, name: str) -> int | None:
    """The backend running CREATE INDEX CONCURRENTLY of this index, if one is."""
    with engine.connect() as conn:
        return conn.scalar(text(
            "SELECT pid FROM pg_stat_progress_create_index "
            "WHERE index_relid = to_regclass(:n) AND command = 'CREATE INDEX CONCURRENTLY'"),
            {"n": name})


def index_valid(engine: Engine, name: str) -> bool | None:
    with engine.connect() as conn:
        return validity(conn, name)


def build_row(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(IndexBuild).where(IndexBuild.name == name)).first()


@pytest.fixture
def blocker(app: Flask) -> Iterator[Callable[[], None]]:
    """An open transaction that may write image_embeddings; the call releases it."""
    conn: Connection = engine_of(app).connect()
    conn.begin()
    conn.execute(text("LOCK TABLE image_embeddings IN ROW EXCLUSIVE MODE"))

    def release() -> None:
        if conn.in_transaction():
            conn.rollback()

    yield release
    release()
    conn.close()


def new_model(app: Flask) -> EmbeddingModel:
    """A fresh model row, as the first upload of a model makes it (its build is sent)."""
    with app.app_context(), session_scope() as session:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        return make_model(session, DIM, built=False)


def add_images(app: Flask, model: EmbeddingModel, vectors: np.ndarray,
               collection: str) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(len(vectors))]
    with app.app_context(), session_scope() as session:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        session.execute(insert(Image), [
            {"id": i, "collection": collection, "sha256": uuid.uuid4().hex * 2,
             "mime": "image/png", "format": "PNG", "width": 1, "height": 1, "bytes": 1,
             "status": "pending", "meta": {}} for i in ids])
        save_vectors(model, list(zip(ids, vectors, strict=True)), session=session)
    return ids


def remove(app: Flask, model: EmbeddingModel, collection: str | None = None) -> None:
    with app.app_context(), session_scope() as session:
        if collection is not None:
            session.execute(delete(Image).where(Image.collection == collection))
        session.execute(text(f'DROP INDEX IF EXISTS "{index_name(model.id, "cosine")}"'))
        session.execute(delete(EmbeddingModel).where(EmbeddingModel.id == model.id))


def test_an_insert_goes_through_while_the_index_builds(app: Flask, worker: Any,
                                                       blocker: Callable[[], None]) -> None:
    engine = engine_of(app)
    model = new_model(app)  # a plain CREATE INDEX here would wait for the blocker and time out
    name = index_name(model.id, "cosine")
    collection = f"ib-{uuid.uuid4().hex[:6]}"
    try:
        wait_for(lambda: concurrent_build_pid(engine, name), "the worker's CONCURRENTLY build")
        started = time.perf_counter()
        add_images(app, model, np.random.default_rng(0).normal(size=(3, DIM)), collection)
        waited_ms = (time.perf_counter() - started) * 1000
        print(f"insert during the build: {waited_ms:.1f} ms")
        assert waited_ms < 2000
        assert concurrent_build_pid(engine, name) is not None, "the build is still in progress"
        assert index_valid(engine, name) is not True
        blocker()
        wait_for(lambda: index_valid(engine, name), "the index to turn valid")
        wait_for(lambda: build_row(engine, name).status == "ready", "the build row")
    finally:
        blocker()
        remove(app, model, collection)


def test_search_during_the_build_ranks_like_brute_force(app: Flask, worker: Any,
                                                        blocker: Callable[[], None]) -> None:
    engine = engine_of(app)
    model = new_model(app)
    name = index_name(model.id, "cosine")
    collection = f"ib-{uuid.uuid4().hex[:6]}"
    vectors = np.random.default_rng(1).normal(size=(300, DIM)).astype(np.float16)
    vectors = vectors.astype(np.float32)
    try:
        ids = add_images(app, model, vectors, collection)
        wait_for(lambda: concurrent_build_pid(engine, name), "the worker's CONCURRENTLY build")
        queries = [vectors[5], vectors[120], np.ones(DIM, np.float32)]
        for method in (None, "index"):
            with app.app_context(), session_scope() as session:
                for q in queries:
                    result = search_vectors(q, session=session, model=model, k=10,
                                            force_method=method, explain=True)
                    want = [ids[i] for i in exact_order(vectors, q, list(range(len(ids))))[:10]]
                    assert [h.image.id for h in result.hits] == want
                    assert result.plan.method == "exact", result.plan
                    assert any("being built" in n for n in result.plan.notes), result.plan
        blocker()
        wait_for(lambda: index_valid(engine, name), "the index to turn valid")
        with app.app_context(), session_scope() as session:
            result = search_vectors(queries[0], session=session, model=model, k=10,
                                    explain=True)
            assert result.plan.method == "index"
            assert [h.image.id for h in result.hits][0] == ids[5]
    finally:
        blocker()
        remove(app, model, collection)


def _record_without_sending(app: Flask) -> tuple[EmbeddingModel, int]:
    """A model row whose build request committed and whose message never left."""
    with app.app_context(), session_scope() as session:
        model = EmbeddingModel(name=f"lost-{uuid.uuid4().hex[:8]}", version="1", dim=DIM,
                               sha256="0" * 64)
        session.add(model)
        session.flush()
        build_id = request_build(hnsw_index(model.id, DIM, "cosine"), model_id=model.id,
                                 session=session)
        assert build_id is not None
        session.execute(update(IndexBuild).where(IndexBuild.id == build_id)
                        .values(sent_at=IndexBuild.sent_at - timedelta(hours=1)))
    return model, build_id


def test_a_lost_build_message_is_sent_again_by_the_sweeper(app: Flask, worker: Any) -> None:
    engine = engine_of(app)
    model, build_id = _record_without_sending(app)
    name = index_name(model.id, "cosine")
    try:
        time.sleep(1.0)
        assert index_valid(engine, name) is None  # nothing built it: the message was lost
        with app.app_context():
            enqueue(SWEEP_JOBS)  # what beat sends every JOB_SWEEP_INTERVAL
        wait_for(lambda: index_valid(engine, name), "the swept build")
        row = wait_for(lambda: build_row(engine, name), "the row")
        wait_for(lambda: build_row(engine, name).status == "ready", "the row ready")
        assert row.id == build_id
    finally:
        remove(app, model)


def _cancelled_build(engine: Engine, name: str, ddl: str, release: Callable[[], None]) -> None:
    """Start the index's CONCURRENTLY build by hand and cancel it: it stays, INVALID."""
    failed: list[BaseException] = []

    def run() -> None:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            try:
                conn.execute(text(ddl))
            except Exception as exc:  # noqa: BLE001 (the cancel is the point)
                failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    pid = wait_for(lambda: concurrent_build_pid(engine, name), "the hand-made build")
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT pg_cancel_backend(:p)"), {"p": pid})
    thread.join(30)
    release()
    assert failed and "cancel" in str(failed[0]).lower(), failed


def test_an_invalid_index_is_dropped_and_rebuilt(app: Flask, worker: Any) -> None:
    engine = engine_of(app)
    model = new_model(app)
    name = index_name(model.id, "cosine")
    try:
        wait_for(lambda: index_valid(engine, name), "the first build")
        wait_for(lambda: build_row(engine, name).status == "ready", "the row ready")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP INDEX CONCURRENTLY "{name}"'))
        # A build that failed midway (cancelled here) leaves the index INVALID.
        with engine.connect() as conn:
            conn.begin()
            conn.execute(text("LOCK TABLE image_embeddings IN ROW EXCLUSIVE MODE"))
            _cancelled_build(engine, name, concurrent_ddl(hnsw_index(model.id, DIM, "cosine")),
                             conn.rollback)
        assert index_valid(engine, name) is False
        with engine.connect() as conn:
            invalid_oid = conn.scalar(text("SELECT to_regclass(:n)::oid"), {"n": name})
        with app.app_context():
            enqueue(SWEEP_JOBS)
        wait_for(lambda: index_valid(engine, name), "the repaired index")
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT to_regclass(:n)::oid"), {"n": name}) != invalid_oid
        row = wait_for(lambda: (r := build_row(engine, name)) is not None
                       and r.status == "ready" and r, "the row ready again")
        assert row.attempts >= 2
    finally:
        remove(app, model)
