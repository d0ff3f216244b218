"""Partial compact indexes for the filters a model's searches use most ("hot" filters).

A filter that leaves thousands of rows is the slow case of every route: a scan reads each of
them (1 us a row, most of it the filter's own test), and a walk of the whole compact graph
throws away the rows the filter rejects (a 1% filter, a hundred for each kept). A partial
HNSW index over the rows of one filter makes that query a walk of a graph that holds only
them: measured at 100k rows, 13.7 -> 2.5 ms for a 10% filter and 106 -> 1.3 ms for a 1% one
(docs/benchmarks.md). So each process counts the filters it serves; the HOT_AFTER-th search
with a filter large enough asks for its index, built CONCURRENTLY by the index-build task
(service/embedding/indexes.py), at most MAX_PER_MODEL per model; once valid, searches with
that filter walk it. Each one costs every matching insert an index update: hence the bounds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import JSON, BindParameter, ColumnElement, Text, and_, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import CompileError
from sqlalchemy.orm import Session
from sqlalchemy.sql.visitors import replacement_traverse

from service.embedding.indexes import request_build, send_builds
from service.embedding.models import IndexBuild, compact_partial_index
from service.embedding.projection import Compact
from service.search.sql import model_is, vector_conditions
from service.search.types import QueryPlan

HOT_AFTER = 20
# Smaller filters scan fast; larger shares walk the whole compact graph fast enough.
MIN_ROWS = 2_000
MAX_SELECTIVITY = 0.5
MAX_PER_MODEL = 16
CACHE_SECONDS = 30.0

_lock = threading.Lock()
_counts: Counter[tuple[int, str]] = Counter()
_ready: dict[int, tuple[float, frozenset[str]]] = {}


def filter_key(plan: QueryPlan) -> str:
    """A short digest of what a plan's candidates are (collection and filter document)."""
    doc = json.dumps([plan.collection, plan.filter_doc], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def prefix(model_id: int) -> str:
    """The names of one model's hot-filter indexes begin with this."""
    return f"ix_image_embeddings_hnsw_compact_m{int(model_id)}_h"


def index_name(plan: QueryPlan) -> str:
    """The name of the partial index for a plan's filter."""
    _, model = plan.vector_model()
    return prefix(int(model.id)) + filter_key(plan)


def ready_names(model_id: int, *, session: Session) -> frozenset[str]:
    """The model's valid hot-filter indexes, read at most every CACHE_SECONDS."""
    now = time.monotonic()
    with _lock:
        hit = _ready.get(model_id)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
    names = frozenset(session.scalars(select(IndexBuild.name).where(
        IndexBuild.model_id == model_id, IndexBuild.status == "ready",
        IndexBuild.name.startswith(prefix(model_id)))))
    with _lock:
        _ready[model_id] = (now, names)
    return names


def forget() -> None:
    """Drop the counts and the cached index lists (tests)."""
    with _lock:
        _counts.clear()
        _ready.clear()


def ready_index(plan: QueryPlan, *, session: Session) -> str | None:
    """The valid partial index of this plan's filter, if there is one."""
    if not plan.filtered:
        return None
    _, model = plan.vector_model()
    name = index_name(plan)
    return name if name in ready_names(int(model.id), session=session) else None


def note(plan: QueryPlan, found: Compact, *, session: Session) -> int | None:
    """Count a served filter; the HOT_AFTER-th time, ask for its index. Returns the build id."""
    if not plan.filtered or plan.estimated_rows < MIN_ROWS or (
            plan.estimated_selectivity > MAX_SELECTIVITY):
        return None
    _, model = plan.vector_model()
    key = (int(model.id), filter_key(plan))
    with _lock:
        _counts[key] += 1
        if _counts[key] != HOT_AFTER:
            return None
    where = [model_is(model)] + vector_conditions(
        QueryPlan(strategy="", k=plan.k, model=model, collection=plan.collection,
                  filter_doc=plan.filter_doc))
    index = compact_partial_index(index_name(plan), found.dim, _literal_json(and_(*where)))
    # A session of its own: the request's may roll back, and the build is sent after commit.
    with Session(bind=session.get_bind()) as own:
        existing = own.scalar(select(func.count()).select_from(IndexBuild).where(
            IndexBuild.model_id == model.id, IndexBuild.name.startswith(prefix(int(model.id)))))
        if (existing or 0) >= MAX_PER_MODEL:
            return None
        try:
            build_id = request_build(index, model_id=int(model.id), session=own)
        except CompileError:
            return None  # a value with no SQL literal form (a timestamp): no index for it
        own.commit()
    send_builds([build_id])
    return build_id



def _literal_json(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """The condition with its jsonb values as cast text literals, which DDL can render."""
    def swap(element: Any) -> Any:
        if isinstance(element, BindParameter) and isinstance(element.type, JSON):
            return cast(literal(json.dumps(element.value), Text()), JSONB)
        return None

    return replacement_traverse(condition, {}, swap)
