"""Compact vectors: candidates from the model's projection, the exact order from the full vectors.

Two ways to find the candidates (service/embedding/projection.py): a relaxed iterative walk of
the compact HNSW graph, small enough to stay in shared_buffers at a million rows ("graph"),
or a scan of the compact vectors that the filter leaves, through the filter columns'
indexes on the same table ("scan"). Either way the pool (a few times k) is ranked by the
exact distance on the full vectors, ties by id; vectors that have no compact form yet join
the pool whatever their distance, so none is skipped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.embedding.compact import candidates, end_walk, walk_settings
from service.embedding.projection import Compact, ready
from service.images.models import Image
from service.search.metrics import get_metric
from service.search.sql import (
    after,
    analyze,
    image_column,
    query_vector,
    vector_conditions,
    vector_result,
)
from service.search.types import QueryPlan, SearchPlan, SearchResult

# Candidates re-ranked on the full vectors, at least; more for deep pages and large k. With
# 256 dimensions, 100 candidates held the exact top-10 in 0.998-1.0 of queries on real and
# synthetic features (docs/benchmarks.md).
CANDIDATES = 100
CANDIDATES_PER_RESULT = 3
# A walk that has read this many tuples without filling its pool stops; the query is then
# answered by a scan.
MAX_SCAN_TUPLES = 40_000


def pool_size(plan: QueryPlan) -> int:
    """How many candidates the full vectors re-rank for this page."""
    return max(CANDIDATES, CANDIDATES_PER_RESULT * (plan.offset + plan.k))


def rank_pool(plan: QueryPlan, found: Compact, explained: SearchPlan, *, session: Session,
              walk: bool) -> list[Any]:
    """This page's (image, distance) rows: the pool ordered by exact distance, ties by id."""
    vector, model = plan.vector_model()
    ranking = get_metric(plan.metric)
    explained.method = "compact-graph" if walk else "compact-scan"
    explained.index_metric = "cosine" if walk else None
    explained.ef_search = plan.ef_search if walk else None
    if walk:
        walk_settings(session, ef_search=max(plan.ef_search, pool_size(plan)),
                      max_scan_tuples=MAX_SCAN_TUPLES)
        if plan.hot_index is not None:
            # Planned with the filter's values, so that PostgreSQL proves the partial index's
            # predicate (a generic plan of a prepared statement could not).
            session.execute(text("SELECT set_config('plan_cache_mode', "
                                 "'force_custom_plan', true)"))
            explained.notes.append(f"the partial index {plan.hot_index} of this frequent "
                                   "filter")
    pool = candidates(model, found, vector, vector_conditions(plan), limit=pool_size(plan),
                      walk=walk)
    exact = ranking.distance(pool.c.vector, query_vector(vector, int(model.dim)))
    where = [] if plan.cursor is None else [after(plan.cursor, exact, pool.c.image_id)]
    ranked = (select(pool.c.image_id, exact.label("distance")).where(*where)
              .order_by(exact, pool.c.image_id).limit(plan.k).subquery("ranked"))
    statement = (select(image_column(plan.ids_only), ranked.c.distance)
                 .join(ranked, ranked.c.image_id == Image.id)
                 .order_by(ranked.c.distance, Image.id))
    if plan.explain:
        explained.rows_scanned, explained.indexes = analyze(session, statement)
    rows = list(session.execute(statement).all())
    if walk:
        end_walk(session)
    explained.notes.append(f"{pool_size(plan)} candidates from {found.dim}-d compact vectors, "
                           "re-ranked on the full vectors")
    return rows


def _search(plan: QueryPlan, *, session: Session, walk: bool) -> SearchResult:
    ranking = get_metric(plan.metric)
    explained = SearchPlan(metric=ranking.name, estimated_rows=plan.estimated_rows,
                           estimated_selectivity=plan.estimated_selectivity)
    _, model = plan.vector_model()
    found = ready(model, session=session)
    if found is None:
        raise ValueError(f"model {model.name!r} has no ready compact vectors")
    rows = rank_pool(plan, found, explained, session=session, walk=walk)
    if walk and len(rows) < plan.k and plan.exact_fallback:
        # The walk read MAX_SCAN_TUPLES without filling the pool: the filter was more
        # selective than estimated; a scan of what it leaves is complete.
        explained.fallback = True
        explained.notes.append(f"graph walk returned {len(rows)} < k rows; re-ran as a scan")
        rows = rank_pool(plan, found, explained, session=session, walk=False)
    return vector_result(rows, plan, ranking, explained)


def graph(plan: QueryPlan, *, session: Session) -> SearchResult:
    """Candidates from the compact HNSW graph, exact order on the full vectors."""
    return _search(plan, session=session, walk=True)


def scan(plan: QueryPlan, *, session: Session) -> SearchResult:
    """Candidates from a scan of the filtered compact vectors, exact order on the full ones."""
    return _search(plan, session=session, walk=False)
