"""Requested rebuilds of a collection's kNN graph: a row each, done by a task, swept if lost.

A request commits its row with the work that asked for it (a finished job, the API) and its
task is sent after that commit. The task locks the row, so a copy of the message (the
sweeper's) finds it busy; one pass over a graph runs at a time, and it answers every request
of the same graph that was queued before it read the vectors.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.graph.models import GraphRebuild
from service.graph.service import rebuild_graph

# Seed of the advisory lock key of one graph's pass (one bigint from collection and model).
LOCK_SEED = 0x67726268


def request_rebuild(collection: str, model_id: int, *, session: Session) -> uuid.UUID:
    """A queued rebuild of the collection's graph; send REBUILD_GRAPH with it after the commit."""
    row = GraphRebuild(collection=collection, model_id=int(model_id), status="queued")
    session.add(row)
    session.flush()
    return row.id


def run_rebuild(rebuild_id: uuid.UUID, *, session: Session) -> str:
    """Rebuild the graph of a queued request and mark it (and the requests it covers) done."""
    row = session.get(GraphRebuild, rebuild_id)
    if row is None:
        return "gone"
    if row.status != "queued":
        return str(row.status)
    collection, model_id = row.collection, int(row.model_id)
    # One pass over a graph at a time: two would insert the same edges.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(
        f"{model_id}:{collection}", LOCK_SEED))))
    # Queued before the vectors are read below, so this pass sees every image they asked for.
    covered = list(session.scalars(
        select(GraphRebuild.id).where(GraphRebuild.collection == collection,
                                      GraphRebuild.model_id == model_id,
                                      GraphRebuild.status == "queued")
        .with_for_update(skip_locked=True)))
    if rebuild_id not in covered:
        session.rollback()
        again = session.get(GraphRebuild, rebuild_id, populate_existing=True)
        return "gone" if again is None else "busy" if again.status == "queued" else again.status
    model = session.get(EmbeddingModel, model_id)
    assert model is not None  # the request cascades with its model
    edges = rebuild_graph(collection, session=session, model=model)
    session.execute(update(GraphRebuild).where(GraphRebuild.id.in_(covered))
                    .values(status="done", edges=edges, finished_at=func.now()))
    session.commit()
    return "done"


def fail_rebuild(rebuild_id: uuid.UUID, reason: str, *, session: Session) -> None:
    """Record why a rebuild cannot succeed (an error a retry would repeat)."""
    session.execute(update(GraphRebuild).where(GraphRebuild.id == rebuild_id,
                                               GraphRebuild.status == "queued")
                    .values(status="failed", error=reason, finished_at=func.now()))
    session.commit()
