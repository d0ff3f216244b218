"""Explain a match: a heatmap over the result image and the classes both images share."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, request
from spectree import Response as Resp

from service.api.context import content_store
from service.api.explain_schemas import ExplainForm, ExplainQuery, ExplanationOut
from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.embedding.defaults import default_model
from service.errors import ApiError
from service.text.explain import Explanation, explain_match

bp = Blueprint("explain", __name__, url_prefix="/api/v1/explain")
TAGS = ["search"]
RESPONSES = Resp(HTTP_200=None, HTTP_400=ErrorResponse, HTTP_404=ErrorResponse,
                 HTTP_409=ErrorResponse, HTTP_413=ErrorResponse, HTTP_422=ErrorResponse)


def _shape(explanation: Explanation, fmt: str) -> Response | dict[str, Any]:
    if fmt == "json":
        return ExplanationOut(
            result_id=str(explanation.result_id), model=explanation.model,
            width=explanation.width, height=explanation.height,
            grid=[[round(float(v), 4) for v in row] for row in explanation.grid],
            peak=explanation.peak(), similarity=round(explanation.similarity, 4),
            classes=explanation.classes).model_dump()
    # The classes ride along as ASCII JSON in a header, so that the PNG stays a plain image.
    classes = json.dumps([[c["label"], c["score"]] for c in explanation.classes])
    return Response(explanation.png, mimetype="image/png", headers={
        "X-Match-Classes": classes, "X-Match-Similarity": f"{explanation.similarity:.4f}",
        "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


def _explain(result_id: str, model: str | None, *, query_id: str | None = None,
             query_file: bytes | None = None, fmt: str) -> Response | dict[str, Any]:
    config = current_app.config
    with session_scope() as session:
        explanation = explain_match(
            result_id, session=session, store=content_store(), model_dir=config["MODEL_DIR"],
            model_name=model or default_model(session=session),
            max_pixels=int(config["MAX_IMAGE_PIXELS"]), query_id=query_id,
            query_file=query_file, render=fmt == "png")
    return _shape(explanation, fmt)


@bp.get("")
@spec.validate(query=ExplainQuery, resp=RESPONSES, tags=TAGS)
def explain_stored() -> Response | dict[str, Any]:
    """Heatmap PNG (or JSON) of where a result matches a stored query image."""
    query: ExplainQuery = request.context.query  # type: ignore[attr-defined]
    return _explain(query.result_id, query.model, query_id=query.query_id, fmt=query.format)


@bp.post("")
@spec.validate(form=ExplainForm, resp=RESPONSES, tags=TAGS)
def explain_upload() -> Response | dict[str, Any]:
    """Heatmap PNG (or JSON) of where a result matches an uploaded query photo."""
    upload = request.files.get("file")
    if upload is None:
        raise ApiError("missing_file", "multipart field 'file' is required")
    form: ExplainForm = request.context.form  # type: ignore[attr-defined]
    return _explain(form.result_id, form.model, query_file=upload.read(), fmt=form.format)
