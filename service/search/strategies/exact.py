"""Exact scan: every candidate's distance, ordered in SQL (small filtered sets, and fallback)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, ColumnElement, select
from sqlalchemy.orm import Session

from service.embedding.models import ImageEmbedding
from service.images.models import Image
from service.search.metrics import Metric, get_metric
from service.search.sql import (
    after,
    analyzed_rows,
    image_column,
    model_is,
    query_vector,
    vector_conditions,
    vector_result,
)
from service.search.types import QueryPlan, SearchPlan, SearchResult


def exact_distance(ranking: Metric, query: BindParameter[Any]) -> ColumnElement[float]:
    """The exact distance to the query on the uncast column.

    It cannot match the HNSW index expression, so the planner never walks the graph for it.
    """
    return ranking.distance(ImageEmbedding.vector, query)


def rank_exactly(plan: QueryPlan, explained: SearchPlan, *, session: Session) -> list[Any]:
    """This page's (image, distance) rows by exact distance, ties by id."""
    vector, model = plan.vector_model()
    explained.method, explained.ef_search, explained.index_metric = "exact", None, None
    exact = exact_distance(get_metric(plan.metric), query_vector(vector, int(model.dim)))
    conditions = vector_conditions(plan)
    if plan.cursor is not None:
        conditions.append(after(plan.cursor, exact, ImageEmbedding.image_id))
    # The filter reads the vectors' own copies of the image columns: the images join only
    # the k rows kept.
    ranked = (
        select(ImageEmbedding.image_id, exact.label("distance"))
        .where(model_is(model), *conditions)
        .order_by(exact, ImageEmbedding.image_id)
        .limit(plan.k)
        .subquery("ranked")
    )
    statement = (select(image_column(plan.ids_only), ranked.c.distance)
                 .join(ranked, ranked.c.image_id == Image.id)
                 .order_by(ranked.c.distance, Image.id))
    if plan.explain:
        explained.rows_scanned = analyzed_rows(session, statement)
    return list(session.execute(statement).all())


def search(plan: QueryPlan, *, session: Session) -> SearchResult:
    """The k nearest candidates by exact distance, after the cursor."""
    ranking = get_metric(plan.metric)
    explained = SearchPlan(metric=ranking.name, estimated_rows=plan.estimated_rows,
                           estimated_selectivity=plan.estimated_selectivity)
    rows = rank_exactly(plan, explained, session=session)
    return vector_result(rows, plan, ranking, explained)
