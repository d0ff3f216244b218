"""Waiting for the runtime HNSW indexes of a model, for tests that rank by the graph."""

from __future__ import annotations

import time

from sqlalchemy import Engine, select

from service.embedding.indexes import build_now
from service.embedding.models import IndexBuild


def wait_for_indexes(engine: Engine, model_id: int, timeout: float = 90.0) -> None:
    """Build the model's pending indexes here (the worker's if it has them), until all are ready.

    Call with no transaction of the caller open: CONCURRENTLY waits for the older ones.
    """
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            pending = list(conn.scalars(select(IndexBuild.id).where(
                IndexBuild.model_id == int(model_id), IndexBuild.status != "ready")))
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"indexes of model {model_id} not built: {pending}")
        if "busy" in build_now(pending, engine=engine):
            time.sleep(0.1)  # the worker is building it
