"""Search by stored image, raw vector or uploaded photo."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from flask import Blueprint, current_app, request
from pydantic import ValidationError
from spectree import Response as Resp

from service.api.openapi import spec
from service.api.paging import seal, unseal
from service.api.schemas import ErrorResponse, SearchForm, SearchQuery, SearchResponse
from service.db import session_scope
from service.embedding.defaults import default_model
from service.errors import ApiError
from service.search.service import run_search
from service.search.types import SearchRequest

bp = Blueprint("search", __name__, url_prefix="/api/v1/search")


def _multipart_query() -> tuple[SearchQuery, bytes]:
    upload = request.files.get("file")
    if upload is None:
        raise ApiError("missing_file", "multipart field 'file' is required")
    raw = request.form.get("query") or "{}"
    try:
        query = SearchQuery.model_validate(json.loads(raw))
    except ValueError as exc:  # json and pydantic errors both derive from ValueError
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ApiError("invalid_request", f"query: {detail}") from exc
    return query, upload.read()


@bp.post("")
@spec.validate(json=SearchQuery, form=SearchForm,
               resp=Resp(HTTP_200=SearchResponse, HTTP_400=ErrorResponse, HTTP_404=ErrorResponse,
                         HTTP_409=ErrorResponse, HTTP_413=ErrorResponse), tags=["search"])
def search() -> dict[str, Any]:
    """Find the k most similar images, best first (score = cosine similarity)."""
    started = time.perf_counter()
    if request.mimetype == "multipart/form-data":
        query, data = _multipart_query()
    elif request.is_json:
        query, data = request.context.json, None  # type: ignore[attr-defined]
    else:
        raise ApiError("unsupported_media_type",
                       "send JSON or multipart/form-data with a 'file' field", status=415)
    req = SearchRequest(k=query.k, image_id=query.image_id, vector=query.vector, file=data,
                        collection=query.collection, filter_doc=query.filter, model=query.model,
                        metric=query.metric, min_score=query.min_score, cursor=unseal(query.cursor),
                        explain=query.explain, index=query.index, code=query.code,
                        rerank=query.rerank, text=query.text, text_mode=query.text_mode,
                        text_weight=query.text_weight)
    req.query_crops = query.query_crops
    config = current_app.config
    with session_scope() as session:
        outcome = run_search(req, session=session, model_dir=config["MODEL_DIR"],
                             default_model=default_model(session=session),
                             max_pixels=int(config["MAX_IMAGE_PIXELS"]),
                             max_k=int(config["SEARCH_MAX_K"]),
                             exact_max_rows=int(config["SEARCH_EXACT_MAX_ROWS"]))
        result = outcome.result
        results = [{"id": str(h.image.id), "score": h.score, "distance": h.distance,
                    "collection": h.image.collection, "metadata": h.image.meta}
                   for h in result.hits]
    body: dict[str, Any] = {
        "results": results, "model": outcome.model, "metric": outcome.metric,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
        "next_cursor": seal(result.next_cursor),
    }
    if query.explain:
        body["explain"] = asdict(result.plan)
    return body
