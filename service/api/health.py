"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app
from spectree import Response as Resp

from service.api.openapi import openapi_document, spec
from service.api.schemas import Health
from service.health import readiness

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@spec.validate(resp=Resp(HTTP_200=Health), tags=["health"])
def healthz() -> dict[str, Any]:
    """The process is up."""
    return {"status": "ok", "checks": {}}


@bp.get("/readyz")
@spec.validate(resp=Resp(HTTP_200=Health, HTTP_503=Health), tags=["health"])
def readyz() -> tuple[dict[str, Any], int]:
    """The database, the broker and the default model are reachable."""
    checks = readiness(current_app)
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    """The OpenAPI 3 document generated from the routes."""
    return openapi_document()
