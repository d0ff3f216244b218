"""SQL pieces shared by the strategies: EXPLAIN, candidate conditions, paging, the query bind."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Float,
    and_,
    bindparam,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement, Executable, Subquery

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.images.models import Image
from service.search.filters import IMAGE_COLUMNS, VECTOR_COLUMNS, FilterColumns, compile_filter
from service.search.metrics import Metric
from service.search.types import Cursor, ImageRef, QueryPlan, SearchHit, SearchPlan, SearchResult


class Explain(Executable, ClauseElement):
    """`EXPLAIN (FORMAT JSON) <select>` with the select's parameters bound as usual."""

    inherit_cache = False

    def __init__(self, statement: Any, analyze: bool = False) -> None:
        self.statement = statement
        self.analyze = analyze


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    options = "ANALYZE, BUFFERS, FORMAT JSON" if element.analyze else "FORMAT JSON"
    return f"EXPLAIN ({options}) " + compiler.process(element.statement, **kw)


def plan_rows(session: Session, statement: Any) -> float:
    """The planner's row estimate for a statement."""
    plan = session.execute(Explain(statement)).scalar_one()
    return float(plan[0]["Plan"]["Plan Rows"])


def scanned_rows(plan: dict[str, Any]) -> int:
    """Rows that left the scans under the plan's top node (vectors whose distance was taken)."""
    total = 0
    node_type = plan.get("Node Type", "")
    if "Scan" in node_type and plan.get("Relation Name") == "image_embeddings":
        loops = int(plan.get("Actual Loops", 1) or 1)
        total += int(plan.get("Actual Rows", 0)) * loops + int(
            plan.get("Rows Removed by Filter", 0))
    for child in plan.get("Plans", []):
        total += scanned_rows(child)
    return total


def analyzed_rows(session: Session, statement: Any) -> int:
    """Runs a statement under EXPLAIN ANALYZE: the vectors its scans read."""
    return analyze(session, statement)[0]


def analyze(session: Session, statement: Any) -> tuple[int, list[str]]:
    """Runs a statement under EXPLAIN ANALYZE: the vectors its scans read, the indexes used."""
    plan = session.execute(Explain(statement, analyze=True)).scalar_one()[0]["Plan"]
    return scanned_rows(plan), sorted(_indexes(plan))


def _indexes(plan: dict[str, Any]) -> set[str]:
    found = {plan["Index Name"]} if plan.get("Index Name") else set()
    for child in plan.get("Plans", []):
        found |= _indexes(child)
    return found


def index_exists(session: Session, name: str) -> bool:
    """Whether a valid index of this name exists (one still built CONCURRENTLY is not)."""
    return bool(session.scalar(sql_text(
        "SELECT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)), "
        "false)"), {"n": name}))


def candidate_conditions(*, collection: str | None, filter_doc: dict[str, Any] | None,
                         exclude_id: uuid.UUID | None,
                         columns: FilterColumns = IMAGE_COLUMNS) -> list[ColumnElement[bool]]:
    """Which images may be results: ready, in the collection, passing the filter, not the query."""
    conditions: list[ColumnElement[bool]] = [columns.status == "ready"]
    if collection is not None:
        conditions.append(columns.collection == collection)
    if filter_doc:
        conditions.append(compile_filter(filter_doc, columns))
    if exclude_id is not None:
        conditions.append(columns.id != exclude_id)
    return conditions


def plan_conditions(plan: QueryPlan) -> list[ColumnElement[bool]]:
    """The candidate conditions of a query plan, on the image rows."""
    return candidate_conditions(collection=plan.collection, filter_doc=plan.filter_doc,
                                exclude_id=plan.exclude_id)


def vector_conditions(plan: QueryPlan) -> list[ColumnElement[bool]]:
    """The candidate conditions of a vector query, on the vectors' own copies of the columns."""
    return candidate_conditions(collection=plan.collection, filter_doc=plan.filter_doc,
                                exclude_id=plan.exclude_id, columns=VECTOR_COLUMNS)


def after(cursor: Cursor, distance: Any, image_id: Any) -> ColumnElement[bool]:
    """Rows that rank after the cursor: a larger distance, or the same one and a larger id."""
    return or_(distance > cursor.distance,
               and_(distance == cursor.distance, image_id > cursor.image_id))


def model_is(model: EmbeddingModel) -> ColumnElement[bool]:
    """Vectors of this model."""
    # A literal integer, so that the planner can match the model's partial HNSW index
    # even under a generic plan.
    return ImageEmbedding.model_id == literal_column(str(int(model.id)))


def query_vector(vector: np.ndarray, dim: int) -> BindParameter[Any]:
    """The query vector as a bound halfvec parameter."""
    return bindparam("query", np.asarray(vector, dtype=np.float32), type_=HALFVEC(dim))


def image_column(ids_only: bool) -> Any:
    """What a statement selects of each image: its id alone, or the whole row."""
    return Image.id if ids_only else Image


def vector_result(rows: list[Any], plan: QueryPlan, ranking: Metric,
                  explained: SearchPlan) -> SearchResult:
    """Rows of (image, distance) as hits over min_score, with the cursor of the next page."""
    hits = [SearchHit(image=ImageRef(image) if plan.ids_only else image, distance=float(d),
                      score=ranking.score(float(d))) for image, d in rows]
    if plan.min_score is not None:
        hits = [h for h in hits if h.score >= plan.min_score]
    next_cursor = None
    if len(hits) == plan.k:
        last = hits[-1]
        next_cursor = Cursor(last.distance, last.image.id, plan.offset + plan.k, plan.ef_search,
                             plan.fingerprint).encode()
    return SearchResult(hits=hits, plan=explained, next_cursor=next_cursor)


def ranked_side(hits: list[SearchHit], name: str) -> Subquery:
    """Already ranked hits as a SQL side (image_id, score, ord) for fusion."""
    ids = bindparam(f"{name}_ids", [h.image.id for h in hits], type_=ARRAY(UUID(as_uuid=True)))
    scores = bindparam(f"{name}_scores", [h.score for h in hits], type_=ARRAY(Float))
    rows = func.unnest(ids, scores).table_valued(
        "image_id", "score", with_ordinality="ord").render_derived(name=f"{name}_rows")
    return select(rows.c.image_id, rows.c.score, rows.c.ord).subquery(name)
