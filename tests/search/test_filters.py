"""Every filter operator against a small hand-made collection in real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import delete, select, update

from service.db import session_scope
from service.images.models import Image
from service.search.filters import FilterError, compile_filter

ROWS: dict[str, dict[str, Any]] = {
    "shirt": {"label": "Shirt", "price": 20, "tags": ["red", "cotton"], "sale": True,
              "released": "2024-03-01"},
    "shoes": {"label": "Shoes", "price": 80.5, "tags": ["black"], "sale": False,
              "released": "2023-11-15T10:00:00Z"},
    "hat": {"label": "Hat", "price": 15, "tags": ["red", "wool"], "released": "not a date"},
    "dress": {"label": "Dress", "price": "unknown", "tags": [], "size": {"eu": 38}},
    "bare": {},
    "odd": {"label": "Shirt", "price": True, "note": "a'); DROP TABLE images; --"},
}


@pytest.fixture(scope="module")
def collection(app: Flask):
    name = f"filters-{uuid.uuid4().hex[:6]}"
    ids: dict[str, uuid.UUID] = {}
    with app.app_context(), session_scope() as session:
        for i, (key, meta) in enumerate(ROWS.items()):
            image = Image(collection=name, sha256=f"{i:064x}", mime="image/png", format="PNG",
                          width=1, height=1, bytes=1, status="ready", meta=meta)
            session.add(image)
            session.flush()
            ids[key] = image.id
        session.execute(update(Image).where(Image.id == ids["bare"])
                        .values(created_at=datetime(2020, 1, 1, tzinfo=UTC), status="failed"))
    yield name, ids
    with app.app_context(), session_scope() as session:
        session.execute(delete(Image).where(Image.collection == name))


def run(app: Flask, collection, doc: Any) -> set[str]:
    name, ids = collection
    back = {v: k for k, v in ids.items()}
    with app.app_context(), session_scope() as session:
        found = session.scalars(select(Image.id).where(Image.collection == name,
                                                       compile_filter(doc)))
        return {back[i] for i in found}


CASES: list[tuple[Any, set[str]]] = [
    ({"label": "Shirt"}, {"shirt", "odd"}),
    ({"label": {"$eq": "Hat"}}, {"hat"}),
    ({"label": {"$ne": "Shirt"}}, {"shoes", "hat", "dress", "bare"}),
    ({"price": {"$gte": 15, "$lt": 50}}, {"shirt", "hat"}),
    ({"price": {"$gt": 20}}, {"shoes"}),
    ({"price": {"$lte": 20}}, {"shirt", "hat"}),
    ({"label": {"$in": ["Hat", "Dress"]}}, {"hat", "dress"}),
    ({"label": {"$nin": ["Hat", "Dress"]}}, {"shirt", "shoes", "bare", "odd"}),
    ({"size": {"$exists": True}}, {"dress"}),
    ({"label": {"$exists": False}}, {"bare"}),
    ({"tags": {"$all": ["red", "wool"]}}, {"hat"}),
    ({"tags": {"$any": ["wool", "black"]}}, {"hat", "shoes"}),
    ({"tags": "red"}, {"shirt", "hat"}),
    ({"sale": True}, {"shirt"}),
    ({"size": {"$eq": {"eu": 38}}}, {"dress"}),
    ({"$or": [{"label": "Hat"}, {"price": {"$gt": 50}}]}, {"hat", "shoes"}),
    ({"$and": [{"tags": "red"}, {"price": {"$lt": 18}}]}, {"hat"}),
    ({"$not": {"price": {"$gte": 15}}}, {"dress", "bare", "odd"}),
    ({"released": {"$gte": "2024-01-01"}}, {"shirt"}),
    ({"released": {"$lt": "2024-01-01T00:00:00+00:00"}}, {"shoes"}),
    ({"created_at": {"$lt": "2021-01-01"}}, {"bare"}),
    ({"status": "failed"}, {"bare"}),
    ({"status": {"$in": ["ready"]}, "label": "Shirt"}, {"shirt", "odd"}),
    ({"metadata.label": "Shoes"}, {"shoes"}),
    ({"note": "a'); DROP TABLE images; --"}, {"odd"}),
    ({"a'); DROP TABLE images; --": 1}, set()),
    ({}, set(ROWS)),
]


@pytest.mark.parametrize("doc,expected", CASES, ids=[str(c[0])[:60] for c in CASES])
def test_operator(app: Flask, collection, doc: Any, expected: set[str]) -> None:
    assert run(app, collection, doc) == expected


BAD: list[tuple[Any, str]] = [
    ([], "filter: expected an object"),
    ({"price": {"$regex": "x"}}, "filter.price.$regex: unknown operator"),
    ({"$where": "1"}, "filter.$where: unknown operator"),
    ({"price": {"$gt": [1]}}, "filter.price.$gt: expected a number"),
    ({"price": {"$gt": True}}, "filter.price.$gt: expected a number"),
    ({"tags": {"$all": "red"}}, "filter.tags.$all: expected a non-empty list"),
    ({"label": {"$in": [{"a": 1}]}}, "filter.label.$in[0]: expected a string"),
    ({"size": {"$exists": "yes"}}, "filter.size.$exists: expected true or false"),
    ({"$or": []}, "filter.$or: expected a non-empty list"),
    ({"created_at": {"$gt": "yesterday"}}, "filter.created_at.$gt: expected an ISO-8601"),
    ({"status": "gone"}, "filter.status: status is one of"),
    ({"label": "a\x00b"}, "filter.label: strings must not contain NUL"),
    ({"x" * 300: 1}, "field names must be"),
    ({"$.label ? (@ == \"Shirt\")": 1}, "unknown operator"),
]


@pytest.mark.parametrize("doc,message", BAD, ids=[m for _, m in BAD])
def test_malformed_filters_point_at_the_problem(doc: Any, message: str) -> None:
    with pytest.raises(FilterError) as err:
        compile_filter(doc)
    assert err.value.status == 400
    assert message in err.value.message


def test_depth_and_size_limits() -> None:
    deep: dict[str, Any] = {"label": "x"}
    for _ in range(8):
        deep = {"$not": deep}
    with pytest.raises(FilterError, match="nesting deeper than 8"):
        compile_filter(deep)
    compile_filter({"$and": [{"a": i} for i in range(99)]})
    with pytest.raises(FilterError, match="more than 100 clauses"):
        compile_filter({"$and": [{"a": i} for i in range(100)]})
