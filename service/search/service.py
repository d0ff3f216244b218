"""Search domain functions: query plans (exact or HNSW), ranking and paging, all in SQL.

A filtered HNSW search in pgvector can return too few rows, and PostgreSQL's planner may drop
the index. So each query is planned here: the planner's row estimate for the filter decides
between an exact scan over the filtered rows (small sets) and an iterative HNSW scan (large
sets), and an index scan that comes back short is re-run exactly. Every plan orders its final
rows by the exact distance, ties by id, so the result is always min(k, matches) rows.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import ColumnElement, bindparam, cast, select, text
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding, hnsw_index_name
from service.errors import ApiError
from service.images.models import Image
from service.search.filters import compile_filter
from service.search.metrics import Metric, get_metric
from service.search.planner import EXACT_MAX_ROWS, route
from service.search.sql import (
    after,
    analyzed_rows,
    candidate_conditions,
    estimate,
    index_exists,
    model_is,
)
from service.search.types import (
    Cursor,
    ImageRef,
    SearchHit,
    SearchOutcome,
    SearchPlan,
    SearchRequest,
    SearchResult,
    fingerprint,
)

# A graph walk that has visited this many tuples without finding k matches gives up, and the
# query is re-run exactly (the filter was more selective than the planner thought).
MAX_SCAN_TUPLES = 20_000


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
    ranking = get_metric(metric)
    dim = int(model.dim)
    q = bindparam("query", np.asarray(query, dtype=np.float32), type_=HALFVEC(dim))
    conditions = candidate_conditions(collection=collection, filter_doc=filter_doc,
                                      exclude_id=exclude_id)

    plan = SearchPlan(metric=ranking.name)
    filtered = bool(filter_doc) or collection is not None or exclude_id is not None
    if filtered:
        plan.estimated_rows, plan.estimated_selectivity = estimate(session, conditions)
    chosen = route(k=k, filtered=filtered, estimated_rows=plan.estimated_rows,
                   selectivity=plan.estimated_selectivity, exact_max_rows=exact_max_rows,
                   force_method=force_method, cursor_ef=cursor.ef_search if cursor else None)
    method = "index" if chosen.strategy == "hnsw" else "exact"
    offset = cursor.offset if cursor else 0
    ef = chosen.ef_search
    # Exact distance on the uncast column: it cannot match the HNSW index expression, so the
    # planner never walks the graph for this one.
    exact = ranking.distance(ImageEmbedding.vector, q)

    rows: list[Any] = []
    if method == "index":
        rows = _index_search(session, model, ranking, q, exact, conditions, cursor, k, offset,
                             ef, plan, explain, ids_only)
        if len(rows) < k and chosen.exact_fallback:
            # The graph walk hit its limits before finding k matches: rank exactly instead.
            plan.fallback = True
            plan.notes.append(f"index scan returned {len(rows)} < k rows; re-ran exactly")
            method = "exact"
    if method == "exact":
        plan.method, plan.ef_search, plan.index_metric = "exact", None, None
        page = conditions if cursor is None else [*conditions, after(cursor, exact, Image.id)]
        rows = _exact_search(session, model, exact, page, k, plan, explain, ids_only)

    hits = [SearchHit(image=ImageRef(image) if ids_only else image, distance=float(d),
                      score=ranking.score(float(d))) for image, d in rows]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    next_cursor = None
    if len(hits) == k:
        last = hits[-1]
        next_cursor = Cursor(last.distance, last.image.id, offset + k, ef,
                             query_fingerprint).encode()
    return SearchResult(hits=hits, plan=plan, next_cursor=next_cursor)


def _image(ids_only: bool) -> Any:
    return Image.id if ids_only else Image


def _exact_search(session: Session, model: EmbeddingModel, exact: Any,
                  conditions: list[ColumnElement[bool]], k: int, plan: SearchPlan,
                  explain: bool, ids_only: bool = False) -> list[Any]:
    distance = exact.label("distance")
    statement = (
        select(_image(ids_only), distance)
        .join(ImageEmbedding, ImageEmbedding.image_id == Image.id)
        .where(model_is(model), *conditions)
        .order_by(distance, Image.id)
        .limit(k)
    )
    if explain:
        plan.rows_scanned = analyzed_rows(session, statement)
    return list(session.execute(statement).all())


def _index_search(session: Session, model: EmbeddingModel, ranking: Metric, q: Any, exact: Any,
                  conditions: list[ColumnElement[bool]], cursor: Cursor | None,
                  k: int, offset: int, ef: int, plan: SearchPlan, explain: bool,
                  ids_only: bool = False) -> list[Any]:
    dim = int(model.dim)
    index_metric = ranking.name if ranking.index_ops else ranking.candidates
    if not index_exists(session, hnsw_index_name(model.id, index_metric)):
        plan.notes.append(f"no {index_metric} index for this model; using the cosine index")
        index_metric = "cosine"
    plan.method, plan.ef_search, plan.index_metric = "index", ef, index_metric
    walk = get_metric(index_metric)
    approx = (walk.indexed(ImageEmbedding.vector, q, dim) if walk.indexed
              else walk.distance(cast(ImageEmbedding.vector, HALFVEC(dim)), q))
    reranked = index_metric != ranking.name
    inner_where = list(conditions)
    if reranked:
        # Re-rank a fixed pool of index candidates, the same pool for every page.
        candidates = max(ef, offset + k)
    else:
        # The index order is the exact order up to near-ties that the graph walk may emit
        # swapped: fetch a margin and let the outer query order exactly.
        candidates = 2 * k + 10
        if cursor is not None:
            inner_where.append(after(cursor, exact, Image.id))
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                         "set_config('hnsw.iterative_scan', 'strict_order', true), "
                         "set_config('hnsw.max_scan_tuples', :mst, true), "
                         "set_config('enable_seqscan', 'off', true), "
                         "set_config('enable_sort', 'off', true), "
                         "set_config('enable_bitmapscan', 'off', true)"),
                    {"ef": str(ef), "mst": str(MAX_SCAN_TUPLES)})
    inner = (
        select(ImageEmbedding.image_id.label("image_id"), exact.label("distance"))
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(model_is(model), *inner_where)
        .order_by(approx)
        .limit(candidates)
        .subquery()
    )
    outer_where = []
    if reranked and cursor is not None:
        outer_where.append(after(cursor, inner.c.distance, Image.id))
    statement = (
        select(_image(ids_only), inner.c.distance)
        .join(inner, inner.c.image_id == Image.id)
        .where(*outer_where)
        .order_by(inner.c.distance, Image.id)
        .limit(k)
    )
    if explain:
        plan.rows_scanned = analyzed_rows(session, statement)
    rows = list(session.execute(statement).all())
    session.execute(text("SELECT set_config('enable_seqscan', 'on', true), "
                         "set_config('enable_sort', 'on', true), "
                         "set_config('enable_bitmapscan', 'on', true)"))
    return rows


def _query_vector(req: SearchRequest, *, session: Session, model_dir: str, name: str,
                  max_pixels: int) -> tuple[EmbeddingModel, np.ndarray, uuid.UUID | None]:
    from service.embedding import service as embedding
    from service.embedding.registry import ModelError
    from service.embedding.transforms import ImageDecodeError
    from service.images.service import get_image

    if req.file is not None:
        from service.features.models import is_derived

        if is_derived(name) and embedding.find_model(name, session=session) is None:
            # A search must not enable a model that every later upload would then compute.
            raise ApiError("unknown_model", f"model {name!r} is not enabled: run "
                           f"`lookalike models install {name}` and a reindex")
        try:
            info, vector = embedding.embed_query(req.file, model_dir=model_dir, model_name=name,
                                                 max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(exc.code, exc.message) from exc
        except ModelError as exc:
            raise ApiError("unknown_model", str(exc)) from exc
        return embedding.ensure_model_row(info, session=session), vector, None
    model = embedding.find_model(name, session=session)
    if model is None:
        raise ApiError("unknown_model", f"no images have been embedded with model {name!r}")
    if req.image_id is not None:
        image = get_image(req.image_id, session=session)
        stored = embedding.stored_vector(image.id, model, session=session)
        if stored is None:
            raise ApiError("not_ready", f"image {image.id} has no vector yet "
                           f"(status {image.status})", status=409)
        return model, stored, image.id
    vector = np.asarray(req.vector, dtype=np.float32)
    if vector.shape != (model.dim,):
        raise ApiError("invalid_vector", f"vector must have {model.dim} numbers "
                       f"for model {name!r}, got {vector.size}")
    if not np.all(np.isfinite(vector)) or np.abs(vector).max() > 65504:
        raise ApiError("invalid_vector", "vector values must be finite halfvec numbers")
    return model, vector, None


def query_source(req: SearchRequest) -> str | None:
    """What the image query is, for cursor fingerprints: the stored id or a digest of the bytes."""
    if req.image_id is not None:
        return req.image_id
    if req.file is None and req.vector is None:
        return None
    return hashlib.sha256(req.file if req.file is not None
                          else np.asarray(req.vector, np.float32).tobytes()).hexdigest()


def run_search(req: SearchRequest, *, session: Session, model_dir: str, default_model: str,
               max_pixels: int, max_k: int,
               exact_max_rows: int = EXACT_MAX_ROWS) -> SearchOutcome:
    """Resolve the query vector (stored image, raw vector or uploaded file), then search."""
    from service.features.models import resolve_metric

    # A model's default metric (chi2 for hsv-hist, hamming for phash, else cosine).
    req = replace(req, metric=resolve_metric(req.model or default_model, req.metric))
    if req.text is not None:  # By words (service/text/service.py).
        from service.text.service import run_text_search

        return run_text_search(req, session=session, model_dir=model_dir,
                               default_model=default_model, max_pixels=max_pixels, max_k=max_k)
    given = [x for x in (req.image_id, req.vector, req.file) if x is not None]
    if len(given) != 1:
        raise ApiError("invalid_query", "give exactly one of image_id, vector or file")
    if not 1 <= req.k <= max_k:
        raise ApiError("invalid_query", f"k must be between 1 and {max_k}")
    metric = get_metric(str(req.metric)).name
    if req.filter_doc is not None:
        compile_filter(req.filter_doc)  # Validate before any expensive work.
    name = req.model or default_model
    source = query_source(req)
    fp = fingerprint(name, metric, req.collection, req.filter_doc, req.min_score, req.k,
                     source)
    cursor = Cursor.decode(req.cursor, fp) if req.cursor else None
    model, vector, exclude = _query_vector(req, session=session, model_dir=model_dir, name=name,
                                           max_pixels=max_pixels)
    if not np.any(vector) and metric == "cosine":
        raise ApiError("invalid_vector", "a zero vector has no cosine neighbours")
    if req.rerank in ("aqe", "diffusion") and cursor is not None:
        raise ApiError("invalid_cursor", f"{req.rerank} re-ranking has no pages")

    if req.query_crops:  # Crops of the query, centre regions of stored images.
        from service.search.crops import crop_search

        result = crop_search(req, vector, session=session, model=model, exclude_id=exclude,
                             model_dir=model_dir, max_pixels=max_pixels,
                             has_cursor=cursor is not None)
        return SearchOutcome(result=result, model=model.name, metric=metric)

    def run(v: np.ndarray, k: int) -> SearchResult:
        if req.index == "hash":  # Hamming candidates, exact re-rank (service/hashing).
            from service.hashing.search import hash_search

            if cursor is not None:
                raise ApiError("invalid_cursor", "hash search has no pages: ask for a larger k")
            return hash_search(v, session=session, model=model, code=req.code, k=k,
                               metric=metric, rerank=req.rerank is not False,
                               collection=req.collection, filter_doc=req.filter_doc,
                               exclude_id=exclude, min_score=req.min_score, explain=req.explain)
        return search_vectors(v, session=session, model=model, k=k, metric=metric,
                              collection=req.collection, filter_doc=req.filter_doc,
                              exclude_id=exclude, min_score=req.min_score, cursor=cursor,
                              explain=req.explain, query_fingerprint=fp,
                              exact_max_rows=exact_max_rows)

    result = run(vector, req.k)
    if req.rerank in ("aqe", "diffusion"):  # Re-ranking (service/graph/reranking.py).
        from service.graph.reranking import rerank_hits

        result = rerank_hits(str(req.rerank), vector, result, session=session, model=model,
                             search=run, k=req.k, collection=req.collection,
                             exclude_id=exclude)
    return SearchOutcome(result=result, model=model.name, metric=metric)
