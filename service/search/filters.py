"""JSON filter documents compiled to SQLAlchemy expressions, never to SQL text.

Grammar (Mongo-like):
    filter    := { clause, ... }                         (all must hold)
    clause    := field: value                            (equality)
               | field: { op: operand, ... }             ($eq $ne $gt $gte $lt $lte $in $nin
                                                          $exists $all $any)
               | "$and" | "$or": [filter, ...]  |  "$not": filter
    field     := "collection" | "status" | "created_at" | "id"   (real columns)
               | "metadata.<key>" | "<key>"                    (a top-level metadata key)
Metadata values are compared with their JSON type: numbers with numbers, strings with strings,
ISO-8601 strings as timestamps when the operand is an ISO-8601 date.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    not_,
    or_,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

from service.embedding.models import ImageEmbedding
from service.errors import ApiError
from service.images.models import STATUSES, Image

MAX_DEPTH = 8
MAX_CLAUSES = 100
MAX_KEY_LENGTH = 256
MAX_LIST = 1000
COMPARISONS = {"$gt", "$gte", "$lt", "$lte"}
OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", "$all", "$any", *COMPARISONS}
COLUMNS = {"collection", "status", "created_at", "id"}

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class FilterColumns:
    """Where a filter's fields live: the image rows, or their copies beside the vectors."""

    meta: Any
    collection: Any
    status: Any
    created_at: Any
    id: Any


IMAGE_COLUMNS = FilterColumns(Image.meta, Image.collection, Image.status, Image.created_at,
                              Image.id)
# Copied onto each vector by triggers (migration 0012): a vector search filters one table.
VECTOR_COLUMNS = FilterColumns(ImageEmbedding.meta, ImageEmbedding.collection,
                               ImageEmbedding.status, ImageEmbedding.image_created_at,
                               ImageEmbedding.image_id)


class FilterError(ApiError):
    """A malformed filter; the message names the offending part."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__("invalid_filter", f"{where}: {message}")


class _Budget:
    """Counts clauses so that a filter cannot grow without bound."""

    def __init__(self, columns: FilterColumns) -> None:
        self.clauses = 0
        self.columns = columns

    def spend(self, where: str) -> None:
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise FilterError(where, f"the filter has more than {MAX_CLAUSES} clauses")


def compile_filter(doc: Any, columns: FilterColumns = IMAGE_COLUMNS) -> ColumnElement[bool]:
    """Compile a filter document; raises FilterError (400) pointing at what is wrong."""
    return _compile_doc(doc, "filter", 1, _Budget(columns))


def parse_datetime(value: Any) -> datetime | None:
    """An ISO-8601 date or timestamp string as an aware datetime, else None."""
    if not isinstance(value, str) or len(value) < 10 or not value[:4].isdigit():
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _compile_doc(doc: Any, where: str, depth: int, budget: _Budget) -> ColumnElement[bool]:
    if depth > MAX_DEPTH:
        raise FilterError(where, f"nesting deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise FilterError(where, "expected an object of fields to conditions")
    clauses: list[ColumnElement[bool]] = []
    for key, value in doc.items():
        here = f"{where}.{key}"
        budget.spend(here)
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise FilterError(here, "expected a non-empty list of filters")
            parts = [_compile_doc(v, f"{here}[{i}]", depth + 1, budget)
                     for i, v in enumerate(value)]
            clauses.append(and_(*parts) if key == "$and" else or_(*parts))
        elif key == "$not":
            # IS NOT TRUE keeps $not two-valued where a comparison on a missing key is NULL.
            clauses.append(_compile_doc(value, here, depth + 1, budget).is_not(true()))
        elif key.startswith("$"):
            raise FilterError(here, "unknown operator (top level takes $and, $or, $not)")
        else:
            clauses.append(_compile_field(key, value, here, depth + 1, budget))
    return and_(true(), *clauses) if clauses else true()


def _check_scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(where, "numbers must be finite")
    if isinstance(value, str) and "\x00" in value:
        raise FilterError(where, "strings must not contain NUL characters")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise FilterError(where, "expected a string, number, boolean or null")


def _check_list(value: Any, where: str) -> list[Scalar]:
    if not isinstance(value, list) or not value:
        raise FilterError(where, "expected a non-empty list")
    if len(value) > MAX_LIST:
        raise FilterError(where, f"lists are limited to {MAX_LIST} values")
    return [_check_scalar(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _compile_field(key: str, cond: Any, where: str, depth: int,
                   budget: _Budget) -> ColumnElement[bool]:
    if not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:
        raise FilterError(where, f"field names must be 1 to {MAX_KEY_LENGTH} characters")
    if depth > MAX_DEPTH:
        raise FilterError(where, f"nesting deeper than {MAX_DEPTH} levels")
    field = _Column(key, budget.columns) if key in COLUMNS else _MetaField(
        key.removeprefix("metadata.") if key.startswith("metadata.") else key, budget.columns)
    if not isinstance(cond, dict) or not cond:
        return field.op("$eq", cond, where)
    if not all(k.startswith("$") for k in cond):
        raise FilterError(where, "mix of operators and plain keys; nested metadata objects "
                                 "are matched with {\"$eq\": {...}}")
    parts = []
    for op, operand in cond.items():
        here = f"{where}.{op}"
        budget.spend(here)
        if op not in OPERATORS:
            raise FilterError(here, f"unknown operator; use one of {', '.join(sorted(OPERATORS))}")
        parts.append(field.op(op, operand, here))
    return and_(*parts)


class _MetaField:
    """A top-level key of the jsonb `metadata` column; the key is always a bound parameter."""

    def __init__(self, key: str, columns: FilterColumns) -> None:
        self.key = key
        self.meta = columns.meta
        self.value = columns.meta[key]  # metadata -> :key

    def _contains(self, value: Any) -> ColumnElement[bool]:
        # jsonb @> is served by the GIN jsonb_path_ops index.
        return self.meta.contains({self.key: value})

    def _equals(self, value: Scalar) -> ColumnElement[bool]:
        # As in MongoDB, a scalar also matches an array that holds it.
        return or_(self._contains(value), self._contains([value]))

    def _typed(self, kind: str) -> ColumnElement[bool]:
        return func.jsonb_typeof(self.value) == kind

    def op(self, op: str, operand: Any, where: str) -> ColumnElement[bool]:
        if op == "$eq":
            if isinstance(operand, dict | list):
                return self._contains(operand) if operand else self.value == cast(
                    literal(operand, JSONB), JSONB)
            return self._equals(_check_scalar(operand, where))
        if op == "$ne":
            return not_(self.op("$eq", operand, where))
        if op == "$in":
            return or_(*[self._equals(v) for v in _check_list(operand, where)])
        if op == "$nin":
            return not_(or_(*[self._equals(v) for v in _check_list(operand, where)]))
        if op == "$exists":
            if not isinstance(operand, bool):
                raise FilterError(where, "expected true or false")
            present = self.meta.has_key(self.key)
            return present if operand else not_(present)
        if op in ("$all", "$any"):
            values = _check_list(operand, where)
            parts = [self._contains([v]) for v in values]
            return and_(*parts) if op == "$all" else or_(*parts)
        return self._compare(op, operand, where)

    def _compare(self, op: str, operand: Any, where: str) -> ColumnElement[bool]:
        moment = parse_datetime(operand)
        if moment is not None:
            text_value = self.meta[self.key].astext
            # CASE guarantees the cast only runs on valid timestamps (no SQL error possible).
            as_time = case((func.pg_input_is_valid(text_value, "timestamptz"),
                            cast(text_value, TIMESTAMP(timezone=True))), else_=None)
            return _apply(op, as_time, moment)
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise FilterError(where, "expected a number, a string or an ISO-8601 date")
        _check_scalar(operand, where)
        kind = "string" if isinstance(operand, str) else "number"
        # jsonb ordering across types is arbitrary (booleans sort above numbers): check type.
        compared = _apply(op, self.value, cast(literal(operand, JSONB), JSONB))
        return and_(self._typed(kind), compared)


class _Column:
    """One of the real columns: collection, status, created_at, id."""

    def __init__(self, key: str, columns: FilterColumns) -> None:
        self.key = key
        self.column = getattr(columns, key)

    def _value(self, value: Any, where: str) -> Any:
        if self.key == "created_at":
            moment = parse_datetime(value)
            if moment is None:
                raise FilterError(where, "expected an ISO-8601 date or timestamp")
            return moment
        if self.key == "id":
            try:
                return uuid.UUID(str(value))
            except ValueError as exc:
                raise FilterError(where, "expected an image id") from exc
        if not isinstance(value, str):
            raise FilterError(where, "expected a string")
        if self.key == "status" and value not in STATUSES:
            raise FilterError(where, f"status is one of {', '.join(STATUSES)}")
        return _check_scalar(value, where)

    def op(self, op: str, operand: Any, where: str) -> ColumnElement[bool]:
        if op == "$eq":
            return self.column == self._value(operand, where)
        if op == "$ne":
            return self.column != self._value(operand, where)
        if op in ("$in", "$nin"):
            values = [self._value(v, f"{where}[{i}]") for i, v in
                      enumerate(_check_list(operand, where))]
            return self.column.in_(values) if op == "$in" else self.column.not_in(values)
        if op == "$exists":
            if not isinstance(operand, bool):
                raise FilterError(where, "expected true or false")
            return true() if operand else false()
        if op in COMPARISONS:
            return _apply(op, self.column, self._value(operand, where))
        raise FilterError(where, f"{op} does not apply to the column {self.key}")


def _apply(op: str, left: Any, right: Any) -> ColumnElement[bool]:
    return {"$gt": left > right, "$gte": left >= right,
            "$lt": left < right, "$lte": left <= right}[op]
