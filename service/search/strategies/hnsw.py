"""HNSW: a strict-order iterative scan of the model's graph index, exact order on top.

The walk is widened by the planner's ef_search and bounded by MAX_SCAN_TUPLES; a walk that
comes back with fewer than k rows (the filter was more selective than the planner thought)
is re-run exactly unless the caller forced the index.
"""

from __future__ import annotations

from typing import Any

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import BindParameter, ColumnElement, cast, select, text
from sqlalchemy.orm import Session

from service.embedding.models import ImageEmbedding, hnsw_index_name
from service.images.models import Image
from service.search.metrics import get_metric
from service.search.sql import (
    after,
    analyzed_rows,
    image_column,
    index_exists,
    model_is,
    query_vector,
    vector_conditions,
    vector_result,
)
from service.search.strategies.exact import exact_distance, rank_exactly
from service.search.types import QueryPlan, SearchPlan, SearchResult

# A graph walk that has visited this many tuples without finding k matches gives up, and the
# query is re-run exactly (the filter was more selective than the planner thought).
MAX_SCAN_TUPLES = 20_000


def _walk_distance(index_metric: str, query: BindParameter[Any], dim: int
                   ) -> ColumnElement[float]:
    """The distance written as the index's expression, so that the planner walks the graph."""
    walk = get_metric(index_metric)
    if walk.indexed:
        return walk.indexed(ImageEmbedding.vector, query, dim)
    return walk.distance(cast(ImageEmbedding.vector, HALFVEC(dim)), query)


def walk_graph(plan: QueryPlan, explained: SearchPlan, *, session: Session) -> list[Any]:
    """This page's (image, distance) rows from the graph walk, ordered by exact distance."""
    vector, model = plan.vector_model()
    dim = int(model.dim)
    q = query_vector(vector, dim)
    ranking = get_metric(plan.metric)
    index_metric = ranking.name if ranking.index_ops else ranking.candidates
    if not index_exists(session, hnsw_index_name(model.id, index_metric)):
        if not index_exists(session, hnsw_index_name(model.id, "cosine")):
            # Being built CONCURRENTLY (service/embedding/indexes.py), or left INVALID by a
            # build that failed: PostgreSQL would not walk it, so rank exactly.
            explained.notes.append("the model's HNSW index is being built; ranked exactly")
            return rank_exactly(plan, explained, session=session)
        explained.notes.append(f"no {index_metric} index for this model; using the cosine index")
        index_metric = "cosine"
    explained.method, explained.ef_search, explained.index_metric = (
        "index", plan.ef_search, index_metric)
    exact = exact_distance(ranking, q)
    reranked = index_metric != ranking.name
    inner_where = vector_conditions(plan)
    if reranked:
        # Re-rank a fixed pool of index candidates, the same pool for every page.
        candidates = max(plan.ef_search, plan.offset + plan.k)
    else:
        # The index order is the exact order up to near-ties that the graph walk may emit
        # swapped: fetch a margin and let the outer query order exactly.
        candidates = 2 * plan.k + 10
        if plan.cursor is not None:
            inner_where.append(after(plan.cursor, exact, ImageEmbedding.image_id))
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                         "set_config('hnsw.iterative_scan', 'strict_order', true), "
                         "set_config('hnsw.max_scan_tuples', :mst, true), "
                         "set_config('enable_seqscan', 'off', true), "
                         "set_config('enable_sort', 'off', true), "
                         "set_config('enable_bitmapscan', 'off', true)"),
                    {"ef": str(plan.ef_search), "mst": str(MAX_SCAN_TUPLES)})
    inner = (
        select(ImageEmbedding.image_id.label("image_id"), exact.label("distance"))
        .where(model_is(model), *inner_where)
        .order_by(_walk_distance(index_metric, q, dim))
        .limit(candidates)
        .subquery()
    )
    outer_where = []
    if reranked and plan.cursor is not None:
        outer_where.append(after(plan.cursor, inner.c.distance, Image.id))
    statement = (
        select(image_column(plan.ids_only), inner.c.distance)
        .join(inner, inner.c.image_id == Image.id)
        .where(*outer_where)
        .order_by(inner.c.distance, Image.id)
        .limit(plan.k)
    )
    if plan.explain:
        explained.rows_scanned = analyzed_rows(session, statement)
    rows = list(session.execute(statement).all())
    session.execute(text("SELECT set_config('enable_seqscan', 'on', true), "
                         "set_config('enable_sort', 'on', true), "
                         "set_config('enable_bitmapscan', 'on', true)"))
    return rows


def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """The k nearest candidates from the graph walk, re-run exactly if the walk is short."""
    ranking = get_metric(plan.metric)
    explained = SearchPlan(metric=ranking.name, estimated_rows=plan.estimated_rows,
                           estimated_selectivity=plan.estimated_selectivity)
    rows = walk_graph(plan, explained, session=session)
    if len(rows) < plan.k and plan.exact_fallback and explained.method == "index":
        # The graph walk hit its limits before finding k matches: rank exactly instead.
        explained.fallback = True
        explained.notes.append(f"index scan returned {len(rows)} < k rows; re-ran exactly")
        rows = rank_exactly(plan, explained, session=session)
    return vector_result(rows, plan, ranking, explained)
