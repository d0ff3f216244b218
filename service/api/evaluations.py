"""Evaluations: run `lookalike eval` as a job and fetch its result."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, request
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response as Resp

from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.embedding.defaults import default_model
from service.errors import NotFound, parse_uuid
from service.evaluation import service as evaluation
from service.evaluation.models import EvaluationRun
from service.queue import RUN_EVALUATION, enqueue_or_sweep

bp = Blueprint("evaluations", __name__, url_prefix="/api/v1/evaluations")


class EvaluationRequest(BaseModel):
    """What to evaluate."""

    model_config = ConfigDict(extra="forbid", strict=True)

    collection: str = Field(max_length=128)
    label_key: str = Field(default="label", min_length=1, max_length=256)
    ks: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(default=[1, 5, 10, 100],
                                                             min_length=1, max_length=10)
    sample: int | None = Field(default=None, ge=1, le=100_000)
    model: str | None = Field(default=None, max_length=128)
    method: str | None = Field(default=None, pattern="^(index|exact)$")
    rerank: str | None = Field(default=None, pattern="^aqe$",
                               description="Expand each query as search's `rerank: aqe` does.")


class EvaluationOut(BaseModel):
    """An evaluation run."""

    id: str
    status: str
    params: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None


def run_json(run: EvaluationRun) -> dict[str, Any]:
    """The public shape of a run."""
    return {"id": str(run.id), "status": run.status, "params": run.params,
            "result": run.result, "error": run.error}


@bp.post("")
@spec.validate(json=EvaluationRequest, resp=Resp(HTTP_202=EvaluationOut, HTTP_400=ErrorResponse),
               tags=["evaluations"])
def create() -> tuple[dict[str, Any], int]:
    """Queue an evaluation of a labelled collection (mAP, P@k, R@k; search path vs exact)."""
    body: EvaluationRequest = request.context.json  # type: ignore[attr-defined]
    params = body.model_dump()
    params["ks"] = sorted(set(params["ks"]))
    with session_scope() as session:
        params["model"] = params["model"] or default_model(session=session)
        out = run_json(evaluation.create_run(params, session=session))
    enqueue_or_sweep(RUN_EVALUATION, out["id"])  # a queued run is re-sent by the sweeper
    return out, 202


@bp.get("/<run_id>")
@spec.validate(resp=Resp(HTTP_200=EvaluationOut, HTTP_404=ErrorResponse), tags=["evaluations"])
def get(run_id: str) -> dict[str, Any]:
    """An evaluation's status and, when done, its result."""
    with session_scope() as session:
        run = session.get(EvaluationRun, parse_uuid(run_id, what="evaluation"))
        if run is None:
            raise NotFound("not_found", f"no evaluation {run_id}")
        return run_json(run)
