"""Code sets: fit binary encoders of a model's vectors (in a task), list, read and drop them."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, request
from spectree import Response as Resp

from service.api.graph_schemas import CodeSetCreate, CodeSetList, CodeSetOut
from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.embedding.models import EmbeddingModel
from service.embedding.service import find_model
from service.errors import ApiError
from service.hashing import service as hashing
from service.hashing.models import CodeSet
from service.queue import FIT_CODES, enqueue_or_sweep

bp = Blueprint("codes", __name__, url_prefix="/api/v1/codes")
log = logging.getLogger(__name__)
TAGS = ["codes"]


def code_set_json(code_set: CodeSet, model: EmbeddingModel | str, encoded: int) -> dict[str, Any]:
    """The public shape of a code set row."""
    return {
        "name": code_set.name, "method": code_set.method, "bits": code_set.bits,
        "model": model if isinstance(model, str) else model.name,
        "collection": code_set.collection, "seed": code_set.seed, "status": code_set.status,
        "error": code_set.error, "fitted_rows": code_set.fitted_rows, "encoded": encoded,
        "bytes_per_image": (code_set.bits + 7) // 8,
        "created_at": code_set.created_at.isoformat(),
        "fitted_at": code_set.fitted_at.isoformat() if code_set.fitted_at else None,
    }


@bp.post("")
@spec.validate(json=CodeSetCreate, resp=Resp(HTTP_202=CodeSetOut, HTTP_400=ErrorResponse,
                                             HTTP_404=ErrorResponse, HTTP_409=ErrorResponse),
               tags=TAGS)
def create_code_set() -> tuple[dict[str, Any], int]:
    """Create a code set; it is fitted on the model's vectors asynchronously (202)."""
    body: CodeSetCreate = request.context.json  # type: ignore[attr-defined]
    name = body.model or current_app.config["DEFAULT_MODEL"]
    with session_scope() as session:
        model = find_model(name, session=session)
        if model is None:
            raise ApiError("unknown_model", f"no images have been embedded with model {name!r}",
                           status=404)
        code_set = hashing.create_code_set(body.name, session=session, model=model,
                                           method=body.method, bits=body.bits,
                                           collection=body.collection, seed=body.seed)
        session.flush()
        session.refresh(code_set)
        out = code_set_json(code_set, model, 0)
        code_set_id = code_set.id
    enqueue_or_sweep(FIT_CODES, code_set_id)  # a pending set is re-sent by the sweeper
    return out, 202


@bp.get("")
@spec.validate(resp=Resp(HTTP_200=CodeSetList), tags=TAGS)
def list_code_sets() -> dict[str, Any]:
    """Every code set, oldest first."""
    with session_scope() as session:
        names = dict(session.query(EmbeddingModel.id, EmbeddingModel.name).all())
        return {"items": [code_set_json(c, names.get(c.model_id, "?"), n)
                          for c, n in hashing.list_code_sets(session=session)]}


@bp.get("/<name>")
@spec.validate(resp=Resp(HTTP_200=CodeSetOut, HTTP_404=ErrorResponse), tags=TAGS)
def get_code_set(name: str) -> dict[str, Any]:
    """One code set."""
    with session_scope() as session:
        code_set = hashing.get_code_set(name, session=session)
        model = session.get(EmbeddingModel, code_set.model_id)
        return code_set_json(code_set, model.name if model else "?",
                             hashing.count_codes(code_set.id, session=session))


@bp.delete("/<name>")
@spec.validate(resp=Resp("HTTP_204", HTTP_404=ErrorResponse), tags=TAGS)
def delete_code_set(name: str) -> tuple[str, int]:
    """Drop a code set, its codes and its index."""
    with session_scope() as session:
        hashing.delete_code_set(name, session=session)
    return "", 204
