"""Facets of a collection's metadata (for building search filters) and the list of collections."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response as Resp

from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.images import facets as facet_service

bp = Blueprint("facets", __name__, url_prefix="/api/v1")


class FacetQuery(BaseModel):
    """Which collection to describe, and how many values a key may list."""

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(default=None, max_length=128,
                                   description="one collection; all when left out")
    max_values: int = Field(default=facet_service.MAX_VALUES, ge=1, le=100,
                            description="keys with more distinct values get a range instead")


class FacetValueOut(BaseModel):
    """One value and how many images carry it."""

    value: bool | int | float | str
    count: int


class FacetOut(BaseModel):
    """One metadata key."""

    key: str
    type: str = Field(description="string, number, boolean or date (ISO-8601 strings)")
    kind: str = Field(description="'values' (filter with $in) or 'range' (filter with $gte/$lte)")
    count: int = Field(description="images that have this key with this type")
    distinct: int
    values: list[FacetValueOut] = Field(default_factory=list,
                                        description="most common first; only for 'values'")
    min: float | str | None = Field(default=None, description="numbers and dates")
    max: float | str | None = None


class FacetsOut(BaseModel):
    """The facets of a collection's metadata."""

    collection: str | None
    total: int = Field(description="images in the collection")
    scanned: int = Field(description="images read (the newest ones, when sampled)")
    sampled: bool
    facets: list[FacetOut]


class CollectionOut(BaseModel):
    """A collection and its image count."""

    name: str
    count: int


class CollectionList(BaseModel):
    """Every collection, by name."""

    items: list[CollectionOut]


def facet_json(facet: facet_service.Facet) -> dict[str, Any]:
    """The public shape of one facet."""
    kind = "values" if facet.values else "range" if facet.min is not None else "none"
    return {"key": facet.key, "type": facet.type, "kind": kind, "count": facet.count,
            "distinct": facet.distinct,
            "values": [{"value": v.value, "count": v.count} for v in facet.values],
            "min": facet.min, "max": facet.max}


@bp.get("/facets")
@spec.validate(query=FacetQuery, resp=Resp(HTTP_200=FacetsOut, HTTP_400=ErrorResponse),
               tags=["search"])
def facets() -> dict[str, Any]:
    """Metadata keys of a collection with value counts (few values) or ranges (numbers, dates)."""
    q: FacetQuery = request.context.query  # type: ignore[attr-defined]
    with session_scope() as session:
        found = facet_service.collection_facets(session=session, collection=q.collection,
                                                max_values=q.max_values)
    return {"collection": found.collection, "total": found.total, "scanned": found.scanned,
            "sampled": found.sampled, "facets": [facet_json(f) for f in found.facets]}


@bp.get("/collections")
@spec.validate(resp=Resp(HTTP_200=CollectionList), tags=["images"])
def collections() -> dict[str, Any]:
    """Every collection with its number of images."""
    with session_scope() as session:
        rows = facet_service.collection_counts(session=session)
    return {"items": [{"name": name, "count": count} for name, count in rows]}
