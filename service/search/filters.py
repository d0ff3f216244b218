"""JSON filter documents compiled to SQLAlchemy expressions (equality for now)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, true

from service.errors import ApiError
from service.images.models import Image

MAX_FILTER_KEYS = 100


def compile_filter(doc: Any) -> ColumnElement[bool]:
    """`{"key": value, ...}` -> metadata containment (jsonb @>), which the GIN index serves."""
    if not isinstance(doc, dict):
        raise ApiError("invalid_filter", "filter must be a JSON object of metadata keys to values")
    if len(doc) > MAX_FILTER_KEYS:
        raise ApiError("invalid_filter", f"filter has more than {MAX_FILTER_KEYS} keys")
    clauses: list[ColumnElement[bool]] = [true()]
    for key, value in doc.items():
        if key.startswith("$"):
            raise ApiError("invalid_filter", f"filter.{key}: unknown operator")
        if isinstance(value, dict):
            raise ApiError("invalid_filter", f"filter.{key}: operators are not supported yet")
        # Bound as a jsonb parameter: keys and values never become SQL text.
        clauses.append(Image.meta.contains({key: value}))
    return and_(*clauses)
