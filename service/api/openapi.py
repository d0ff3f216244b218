"""The OpenAPI document, generated from the views' pydantic models by spectree."""

from __future__ import annotations

from typing import Any

from spectree import SpecTree

from service.api.schemas import ErrorResponse
from service.errors import ApiError


def _raise_validation_error(req: Any, resp: Any, error: Exception | None, instance: Any,
                            model_adapter: Any = None) -> None:
    """Turn spectree's validation failure into our error shape, naming the offending field."""
    if error is None:
        return
    details = []
    for item in getattr(error, "errors", lambda: [])():
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        details.append(f"{where}: {item.get('msg', 'invalid')}")
    raise ApiError("invalid_request", "; ".join(details) or str(error))


spec = SpecTree(
    "flask",
    title="Lookalike API",
    version="1.0.0",
    path="apidoc",
    mode="strict",
    annotations=False,
    before=_raise_validation_error,
    validation_error_status=400,
    # Validation failures leave as our error shape (see the hook), so document that shape.
    validation_error_model=ErrorResponse,
)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of every decorated route."""
    return spec.spec
