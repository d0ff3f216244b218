"""Graph rebuilds are rows of work: a lost message is sent again by the sweeper, and finished."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from service.db import session_scope
from service.graph.models import GraphEdge, GraphRebuild
from service.graph.rebuilds import request_rebuild, run_rebuild
from service.graph.service import GRAPH_K
from service.queue import REBUILD_GRAPH, SWEEP_JOBS, enqueue
from tests.graph.test_service import world  # noqa: F401  (the fixture)


def edges_of(app: Flask, model_id: int) -> int:
    with app.app_context(), session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(GraphEdge)
                                  .where(GraphEdge.model_id == model_id)) or 0)


def rebuilds_of(app: Flask, model_id: int) -> list[GraphRebuild]:
    with app.app_context(), session_scope() as session:
        return list(session.scalars(select(GraphRebuild).where(
            GraphRebuild.model_id == model_id).order_by(GraphRebuild.created_at)))


def wait_done(app: Flask, model_id: int, count: int, timeout: float = 60.0) -> list[GraphRebuild]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = rebuilds_of(app, model_id)
        if len(rows) == count and all(r.status == "done" for r in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"rebuilds not done: {[(r.status, r.error) for r in rows]}")


def test_a_lost_rebuild_message_is_sent_again_by_the_sweeper(app: Flask, worker: Any,
                                                             world: Any) -> None:  # noqa: F811
    model, _, ids, collection = world
    with app.app_context(), session_scope() as session:
        # Committed, and its message never sent: what a Redis that lost it leaves behind.
        rebuild_id = request_rebuild(collection, model.id, session=session)
        session.execute(update(GraphRebuild).where(GraphRebuild.id == rebuild_id)
                        .values(sent_at=GraphRebuild.sent_at - timedelta(hours=1)))
    time.sleep(1.0)
    assert edges_of(app, model.id) == 0
    assert [r.status for r in rebuilds_of(app, model.id)] == ["queued"]
    with app.app_context():
        enqueue(SWEEP_JOBS)  # what beat sends every JOB_SWEEP_INTERVAL
    [row] = wait_done(app, model.id, 1)
    assert row.id == rebuild_id and row.edges == len(ids) * GRAPH_K and row.finished_at
    assert edges_of(app, model.id) == len(ids) * GRAPH_K


def test_the_api_queues_a_row_and_the_worker_finishes_it(app: Flask, client: FlaskClient,
                                                         worker: Any,
                                                         world: Any) -> None:  # noqa: F811
    model, _, ids, collection = world
    resp = client.post("/api/v1/graph/rebuild", json={"collection": collection,
                                                      "model": model.name})
    assert resp.status_code == 202, resp.get_json()
    wait_done(app, model.id, 1)
    # A message of the old shape (collection, model id) is still understood.
    with app.app_context():
        enqueue(REBUILD_GRAPH, collection, model.id)
    wait_done(app, model.id, 2)
    assert edges_of(app, model.id) == len(ids) * GRAPH_K


def test_one_pass_answers_every_request_queued_before_it(app: Flask,
                                                         world: Any) -> None:  # noqa: F811
    model, _, ids, collection = world
    with app.app_context(), session_scope() as session:
        first = request_rebuild(collection, model.id, session=session)
        second = request_rebuild(collection, model.id, session=session)
    with app.app_context(), session_scope() as session:
        assert run_rebuild(first, session=session) == "done"
    with app.app_context(), session_scope() as session:
        assert run_rebuild(second, session=session) == "done"  # answered by the first pass
        assert run_rebuild(uuid.uuid4(), session=session) == "gone"
    assert [r.edges for r in rebuilds_of(app, model.id)] == [len(ids) * GRAPH_K] * 2
