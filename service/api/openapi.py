"""The OpenAPI document, generated from the views' pydantic models by spectree."""

from __future__ import annotations

import copy
import json
from typing import Any

from flask import request
from pydantic import BaseModel
from spectree import SpecTree

from service.api.explain_schemas import ExplanationOut
from service.api.schemas import ErrorResponse
from service.errors import ApiError


def _raise_validation_error(req: Any, resp: Any, error: Exception | None, instance: Any,
                            model_adapter: Any = None) -> None:
    """Turn spectree's validation failure into our error shape, naming the offending field."""
    if error is None:
        return
    body = (request.get_data(cache=True) if request.method in ("POST", "PUT", "PATCH")
            and request.mimetype != "multipart/form-data" else b"")
    if body:
        # Without this, an unparsable body reads as "field required" for every field.
        if not request.is_json:
            raise ApiError("unsupported_media_type", "send a JSON body with Content-Type: "
                           "application/json", status=415)
        try:
            json.loads(body)
        except ValueError as exc:
            raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from exc
    details = []
    for item in getattr(error, "errors", lambda: [])():
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        details.append(f"{where}: {item.get('msg', 'invalid')}")
    raise ApiError("invalid_request", "; ".join(details) or str(error))


_NAMED: dict[str, type] = {}


def schema_name(model: type) -> str:
    """A component's name: the model's own, refused if two models share it.

    spectree's default ("<Model>.<hash>", nested "<Parent>.<hash>.<Child>") gives one model
    several components with the same title, and client generators then see duplicate models.
    """
    name = model.__name__
    if _NAMED.setdefault(name, model) is not model:
        raise TypeError(f"two API models are named {name}: {model} and {_NAMED[name]}")
    return name


spec = SpecTree(
    "flask",
    naming_strategy=schema_name,
    nested_naming_strategy=lambda parent, child: child,
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


# Routes reachable without an API key (service/api/auth.py OPEN_ENDPOINTS).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
AUTH_RESPONSES = {
    "401": "No API key, or one that is unknown or revoked",
    "403": "The key's scope does not allow this request",
    "429": "Rate limit exceeded; see the Retry-After header",
}


def with_auth(document: dict[str, Any]) -> dict[str, Any]:
    """The document plus the bearer-key scheme and the 401/403/429 every keyed route may give."""
    doc = copy.deepcopy(document)
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "lk_<prefix>_<secret>",
        "description": "An API key from `lookalike keys create`. Required unless the API "
                       "listens on loopback (docs/security.md)."}
    ref = (f"#/components/schemas/{ErrorResponse.__name__}"
           if ErrorResponse.__name__ in components.get("schemas", {}) else None)
    schema: dict[str, Any] = {"$ref": ref} if ref else {"type": "object"}
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if path in OPEN_PATHS:
                operation["security"] = []
                continue
            # Optional ({}): keys are required only off loopback (AUTH_REQUIRED "auto").
            operation["security"] = [{}, {"bearer": []}]
            for status, description in AUTH_RESPONSES.items():
                operation["responses"].setdefault(status, {
                    "description": description,
                    "content": {"application/json": {"schema": dict(schema)}}})
    return doc


BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
# 200 bodies that are not JSON: spectree writes every model as application/json and can only
# leave these without content. A model stands for its JSON schema.
RAW_OK: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/v1/images/{image_id}/file", "get"): {"image/*": BINARY},  # the original's own type
    ("/api/v1/images/{image_id}/thumbnail", "get"): {"image/jpeg": BINARY},
    ("/api/v1/explain", "get"): {"image/png": BINARY, "application/json": ExplanationOut},
    ("/api/v1/explain", "post"): {"image/png": BINARY, "application/json": ExplanationOut},
    ("/metrics", "get"): {"text/plain": {"type": "string"}},  # the Prometheus text format
}


def with_raw_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """The document with the media types of the 200s in RAW_OK."""
    doc = copy.deepcopy(document)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), media in RAW_OK.items():
        operation = doc.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        content: dict[str, Any] = {}
        for media_type, schema in media.items():
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                found = schema.model_json_schema(ref_template="#/components/schemas/{model}",
                                                 mode="serialization")
                schemas.update(found.pop("$defs", {}))
                schemas[schema_name(schema)] = found
                schema = {"$ref": f"#/components/schemas/{schema_name(schema)}"}
            content[media_type] = {"schema": schema}
        ok = operation["responses"].setdefault("200", {"description": "OK"})
        ok["content"] = content
    return doc


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of every decorated route."""
    return with_auth(with_raw_bodies(spec.spec))
