"""The planned vector search: estimate the filter, route (planner.py), run exact or HNSW.

Every route orders its final rows by the exact distance, ties by id, so the result is always
min(k, matches) rows, whichever strategy the estimate picked.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.embedding.projection import ready
from service.search import hot
from service.search.estimates import estimate
from service.search.metrics import get_metric
from service.search.planner import EF_SEARCH, EXACT_MAX_ROWS, route
from service.search.strategies import compact, exact, hnsw
from service.search.types import Cursor, QueryPlan, SearchResult, Strategy

# The routes of a vector query (the registry names every strategy; these are the planner's).
ROUTES: dict[str, Strategy] = {"exact": exact.search, "hnsw": hnsw.search,
                               "compact-graph": compact.graph, "compact-scan": compact.scan}


def route_vector_query(plan: QueryPlan, *, session: Session,
                       exact_max_rows: int = EXACT_MAX_ROWS,
                       force_method: str | None = None) -> QueryPlan:
    """The plan with its strategy, graph width and the filter's estimated selectivity."""
    rows, selectivity = 0.0, 1.0
    if plan.filtered:
        rows, selectivity = estimate(plan, session=session)
    _, model = plan.vector_model()
    # The projection preserves cosine only: other metrics keep the full-vector routes.
    found = ready(model, session=session) if plan.metric == "cosine" else None
    with_compact = found is not None
    if found is not None and plan.filtered and force_method is None:
        planned = replace(plan, estimated_rows=rows, estimated_selectivity=selectivity)
        name = hot.ready_index(planned, session=session)
        if name is not None:
            return replace(planned, strategy="compact-graph", hot_index=name,
                           ef_search=max(plan.k, EF_SEARCH), exact_fallback=True)
        hot.note(planned, found, session=session)
    chosen = route(k=plan.k, filtered=plan.filtered, estimated_rows=rows,
                   selectivity=selectivity, exact_max_rows=exact_max_rows,
                   force_method=force_method,
                   cursor_ef=plan.cursor.ef_search if plan.cursor else None,
                   compact=with_compact, compact_pool=compact.pool_size(plan))
    return replace(plan, strategy=chosen.strategy, ef_search=chosen.ef_search,
                   estimated_rows=rows, estimated_selectivity=selectivity,
                   exact_fallback=chosen.exact_fallback)


def search_vectors(
    query: np.ndarray,
    *,
    session: Session,
    model: EmbeddingModel,
    k: int,
    metric: str = "cosine",
    collection: str | None = None,
    filter_doc: dict[str, Any] | None = None,
    exclude_id: uuid.UUID | None = None,
    min_score: float | None = None,
    cursor: Cursor | None = None,
    explain: bool = False,
    exact_max_rows: int = EXACT_MAX_ROWS,
    force_method: str | None = None,
    query_fingerprint: str = "",
    ids_only: bool = False,
) -> SearchResult:
    """The k nearest ready images under a filter, best first by exact distance, ties by id.

    With `ids_only`, the statements select the image's id instead of the whole row (the same
    joins, conditions and order) and the hits hold `ImageRef`s: evaluation ranks whole
    collections, where decoding and mapping every row took most of the time.
    """
    plan = QueryPlan(strategy="", k=k, model=model, vector=query,
                     metric=get_metric(metric).name, model_name=model.name,
                     collection=collection, filter_doc=filter_doc, exclude_id=exclude_id,
                     min_score=min_score, cursor=cursor, fingerprint=query_fingerprint,
                     explain=explain, ids_only=ids_only)
    planned = route_vector_query(plan, session=session, exact_max_rows=exact_max_rows,
                                 force_method=force_method)
    return ROUTES[planned.strategy](planned, session=session)
