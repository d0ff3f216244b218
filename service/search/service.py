"""Search's orchestrator: a request becomes a query plan, the plan's strategy runs, then its
re-ranking post-step. The ways of searching are service/search/strategies/ (named in
registry.py), the routing decision planner.py, the shared shapes types.py.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import replace

import numpy as np
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.errors import ApiError
from service.images.decode import ImageDecodeError
from service.images.service import get_image
from service.metrics import SEARCH_DURATION
from service.search.filters import compile_filter
from service.search.metrics import get_metric
from service.search.planner import EXACT_MAX_ROWS
from service.search.registry import STRATEGIES
from service.search.rerank import RERANKERS
from service.search.strategies.hybrid import hybrid_pool
from service.search.strategies.text import MAX_TEXT_CHARS, TEXT_MODES
from service.search.types import (
    Cursor,
    QueryPlan,
    SearchOutcome,
    SearchRequest,
    TextQuery,
    fingerprint,
)
from service.search.vectors import route_vector_query


def _query_vector(req: SearchRequest, *, session: Session, model_dir: str, name: str,
                  max_pixels: int) -> tuple[EmbeddingModel, np.ndarray, uuid.UUID | None]:
    """The image query's model, vector and (for a stored image) the id to leave out."""
    # onnx and onnxruntime (about a second) load only for searches that need a model.
    from service.embedding import service as embedding
    from service.embedding.registry import ModelError
    from service.features.models import derived_query_vector, is_derived

    if req.file is not None:
        if is_derived(name) and embedding.find_model(name, session=session) is None:
            # A search must not enable a model that every later upload would then compute.
            raise ApiError("unknown_model", f"model {name!r} is not enabled: run "
                           f"`lookalike models install {name}` and a reindex")
        try:
            # Hand-crafted features and region vectors are computed, not run through a CNN.
            info, vector = (
                derived_query_vector(name, req.file, model_dir=model_dir, max_pixels=max_pixels)
                if is_derived(name) else
                embedding.embed_query(req.file, model_dir=model_dir, model_name=name,
                                      max_pixels=max_pixels))
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


def _text_plan(req: SearchRequest, *, session: Session, model_dir: str, name: str,
               max_pixels: int, max_k: int) -> QueryPlan:
    """A search by words, alone ("text") or fused with an image query ("hybrid")."""
    words = (req.text or "").strip()
    if not words or len(words) > MAX_TEXT_CHARS:
        raise ApiError("invalid_query", f"text must be 1 to {MAX_TEXT_CHARS} characters")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in words):
        raise ApiError("invalid_query", "text must not contain control characters")
    if req.text_mode not in TEXT_MODES:
        raise ApiError("invalid_query", f"text_mode must be one of {', '.join(TEXT_MODES)}")
    if not 0.0 <= req.text_weight <= 1.0:
        raise ApiError("invalid_query", "text_weight must be between 0 and 1")
    if not 1 <= req.k <= max_k:
        raise ApiError("invalid_query", f"k must be between 1 and {max_k}")
    images = [x for x in (req.image_id, req.vector, req.file) if x is not None]
    if len(images) > 1:
        raise ApiError("invalid_query", "give at most one of image_id, vector or file with text")
    if req.index != "hnsw" or req.rerank not in (True, False):
        raise ApiError("invalid_query", "text search has no hash index or re-ranking")
    if req.filter_doc is not None:
        compile_filter(req.filter_doc)
    fp = fingerprint("text", name, req.text_mode, words, req.text_weight, req.collection,
                     req.filter_doc, req.min_score, req.k, query_source(req))
    cursor = Cursor.decode(req.cursor, fp) if req.cursor else None
    plan = QueryPlan(strategy="hybrid" if images else "text", k=req.k, model_name=name,
                     collection=req.collection, filter_doc=req.filter_doc,
                     min_score=req.min_score, cursor=cursor, fingerprint=fp,
                     explain=req.explain, request=req, model_dir=model_dir,
                     max_pixels=max_pixels,
                     text=TextQuery(words, req.text_mode, req.text_weight, req.text or ""))
    if images:
        pool = hybrid_pool(req.k)
        if plan.offset + req.k > pool:
            raise ApiError("invalid_cursor", f"hybrid results end after {pool} rows")
        model, vector, exclude = _query_vector(req, session=session, model_dir=model_dir,
                                               name=name, max_pixels=max_pixels)
        plan = replace(plan, model=model, vector=vector, exclude_id=exclude)
    return plan


def plan_search(req: SearchRequest, *, session: Session, model_dir: str, default_model: str,
                max_pixels: int, max_k: int, exact_max_rows: int = EXACT_MAX_ROWS) -> QueryPlan:
    """Check the request, resolve its query vector and choose its strategy."""
    # onnx (about a second) loads only for searches that need a model.
    from service.features.models import resolve_metric

    name = req.model or default_model
    # A model's default metric (chi2 for hsv-hist, hamming for phash, else cosine).
    req = replace(req, metric=resolve_metric(name, req.metric))
    if req.text is not None:
        return _text_plan(req, session=session, model_dir=model_dir, name=name,
                          max_pixels=max_pixels, max_k=max_k)
    given = [x for x in (req.image_id, req.vector, req.file) if x is not None]
    if len(given) != 1:
        raise ApiError("invalid_query", "give exactly one of image_id, vector or file")
    if not 1 <= req.k <= max_k:
        raise ApiError("invalid_query", f"k must be between 1 and {max_k}")
    metric = get_metric(str(req.metric)).name
    if req.filter_doc is not None:
        compile_filter(req.filter_doc)  # Validate before any expensive work.
    fp = fingerprint(name, metric, req.collection, req.filter_doc, req.min_score, req.k,
                     query_source(req))
    cursor = Cursor.decode(req.cursor, fp) if req.cursor else None
    model, vector, exclude = _query_vector(req, session=session, model_dir=model_dir, name=name,
                                           max_pixels=max_pixels)
    if not np.any(vector) and metric == "cosine":
        raise ApiError("invalid_vector", "a zero vector has no cosine neighbours")
    rerank = req.rerank if req.rerank in RERANKERS else None
    if rerank is not None and cursor is not None:
        raise ApiError("invalid_cursor", f"{rerank} re-ranking has no pages")
    plan = QueryPlan(strategy="hnsw", k=req.k, model=model, vector=vector, metric=metric,
                     model_name=model.name, collection=req.collection,
                     filter_doc=req.filter_doc, exclude_id=exclude, min_score=req.min_score,
                     cursor=cursor, fingerprint=fp, explain=req.explain, code=req.code,
                     code_rerank=req.rerank is not False, rerank=rerank, request=req,
                     model_dir=model_dir, max_pixels=max_pixels)
    if req.query_crops:
        return replace(plan, strategy="crops")
    if req.index == "hash":
        return replace(plan, strategy="codes")
    return route_vector_query(plan, session=session, exact_max_rows=exact_max_rows)


def run_search(req: SearchRequest, *, session: Session, model_dir: str, default_model: str,
               max_pixels: int, max_k: int,
               exact_max_rows: int = EXACT_MAX_ROWS) -> SearchOutcome:
    """Plan the request, run its strategy, then its re-ranking post-step if it asks for one."""
    started = time.perf_counter()
    plan = plan_search(req, session=session, model_dir=model_dir, default_model=default_model,
                       max_pixels=max_pixels, max_k=max_k, exact_max_rows=exact_max_rows)
    strategy = STRATEGIES[plan.strategy]
    result = strategy(plan, session=session)
    if plan.rerank is not None:
        result = RERANKERS[plan.rerank](plan, result, session=session, search=strategy)
    # A search by words reports the measure its strategy ranked by (ts_rank, rrf, ...).
    metric = result.plan.metric if plan.text is not None else plan.metric
    # Labelled by the explain record's method: the strategy that answered (an HNSW walk that
    # fell back to an exact scan counts as exact).
    SEARCH_DURATION.labels(result.plan.method).observe(time.perf_counter() - started)
    return SearchOutcome(result=result, model=plan.model_name, metric=metric)
