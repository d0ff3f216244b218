"""The planner's estimate of a vector query's candidates: one EXPLAIN per new filter at most.

Routing needs to know how many vectors a filter leaves. Asking PostgreSQL twice per request
(all ready vectors, then the filtered ones) cost two round trips and two plannings on every
query; the answers change slowly, so they are kept per model, collection and filter for
CACHE_SECONDS in each process.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.search.sql import model_is, plan_rows, vector_conditions
from service.search.types import QueryPlan

CACHE_SECONDS = 30.0
# Counting further costs more than it tells; past this size the planner's own estimate of the
# table is used instead, since a share computed against the cap would call a 10% filter of a
# million rows "everything" and keep it off its hot index.
COUNT_CAP = 100_000
MAX_ENTRIES = 4096

_lock = threading.Lock()
_cache: OrderedDict[tuple[Any, ...], tuple[float, float]] = OrderedDict()


def _cached(key: tuple[Any, ...], compute: Any) -> float:
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            _cache.move_to_end(key)
            return hit[1]
    value = float(compute())
    with _lock:
        _cache[key] = (now, value)
        _cache.move_to_end(key)
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return value


def clear() -> None:
    """Forget every cached estimate (tests, and after bulk loads)."""
    with _lock:
        _cache.clear()


def _count_ready(model: EmbeddingModel, *, session: Session) -> float:
    ready = (select(ImageEmbedding.image_id)
             .where(model_is(model), ImageEmbedding.status == "ready"))
    counted = session.scalar(select(func.count()).select_from(
        ready.limit(COUNT_CAP).subquery())) or 0
    if counted < COUNT_CAP:
        return float(counted)
    return max(float(COUNT_CAP), plan_rows(session, ready))


def model_rows(model: EmbeddingModel, *, session: Session) -> float:
    """The model's ready vectors: counted while small (a fresh table has no statistics), else
    the planner's estimate."""
    return _cached(("model", int(model.id)), lambda: _count_ready(model, session=session))


def estimate(plan: QueryPlan, *, session: Session) -> tuple[float, float]:
    """Rows the plan's filter leaves of its model's vectors, and their share of all of them."""
    _, model = plan.vector_model()
    total = max(1.0, model_rows(model, session=session))
    key = ("filter", int(model.id), plan.collection,
           json.dumps(plan.filter_doc, sort_keys=True, default=str))
    statement = select(ImageEmbedding.image_id).where(model_is(model), *vector_conditions(plan))
    rows = _cached(key, lambda: plan_rows(session, statement))
    return rows, min(1.0, rows / total)
