"""Request and response models of the hashing and graph endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CodeSetCreate(BaseModel):
    """A code set to fit: an encoder of one model's vectors into `bits` bits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    method: Literal["lsh", "spectral", "itq"] = "itq"
    bits: int = Field(default=256, ge=8, le=1024)
    model: str | None = Field(default=None, max_length=128)
    collection: str | None = Field(default=None, max_length=128,
                                   description="fit on and cover only this collection")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class CodeSetOut(BaseModel):
    """A code set and how far its fitting got."""

    name: str
    method: str
    bits: int
    model: str
    collection: str | None = None
    seed: int
    status: str = Field(description="pending, ready or failed")
    error: str | None = None
    fitted_rows: int | None = None
    encoded: int = Field(description="images that have a code in this set now")
    bytes_per_image: int
    created_at: datetime
    fitted_at: datetime | None = None


class CodeSetList(BaseModel):
    """Every code set, oldest first."""

    items: list[CodeSetOut]


class ClusterQuery(BaseModel):
    """Which collection's graph to cut, and where."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(default="default", max_length=128)
    threshold: float | None = Field(default=None, ge=0.0, le=2.0,
                                    description="cosine distance at which the MST is cut")
    min_size: int = Field(default=2, ge=1, le=1000)
    model: str | None = Field(default=None, max_length=128)


class ClusterOut(BaseModel):
    """One group of images."""

    size: int
    ids: list[str]


class DuplicateQuery(ClusterQuery):
    """Which collection to scan for duplicates, by which tiers and thresholds."""

    phash_threshold: int | None = Field(default=None, ge=0, le=32,
                                        description="pHash Hamming distance in bits (of 64)")
    tiers: str = Field(default="exact,phash,cnn",
                       pattern=r"^(exact|phash|cnn)(,(exact|phash|cnn))*$",
                       description="comma-separated tiers to use, of exact, phash and cnn")
    crops: bool = Field(default=False, description="cnn tier over whole images and centre "
                                                   "regions (needs the model's @centre70)")


class DuplicateLinkOut(BaseModel):
    """Two images joined by a tier."""

    a: str
    b: str
    tier: Literal["exact", "phash", "cnn"]
    distance: float = Field(description="0 for exact, bits for phash, cosine for cnn")


class DuplicateOut(ClusterOut):
    """One group of copies of a picture and how its members were matched."""

    tier: Literal["exact", "phash", "cnn"] = Field(
        description="the loosest tier among its links (exact < phash < cnn)")
    links: list[DuplicateLinkOut]


class DuplicateList(BaseModel):
    """Duplicate groups, largest first."""

    collection: str
    model: str
    threshold: float = Field(description="the cnn tier's cosine distance")
    phash_threshold: int
    tiers: list[str]
    clusters: list[DuplicateOut]
    notes: list[str]


class ClusterList(BaseModel):
    """Groups of the MST cut at `threshold`, largest first."""

    collection: str
    model: str
    threshold: float
    clusters: list[ClusterOut]


class RelatedQuery(BaseModel):
    """How far to walk the graph."""

    model_config = ConfigDict(extra="forbid")

    hops: int = Field(default=2, ge=1, le=4)
    limit: int = Field(default=20, ge=1, le=200)
    model: str | None = Field(default=None, max_length=128)


class RelatedOut(BaseModel):
    """An image reached over the graph."""

    id: str
    hops: int
    distance: float = Field(description="length of the shortest path found (cosine distances)")
    collection: str
    metadata: dict[str, object]


class RelatedList(BaseModel):
    """Images near one image on the graph, fewest hops first, then shortest path."""

    items: list[RelatedOut]


class GraphRebuild(BaseModel):
    """A collection whose graph is recomputed in a task."""

    model_config = ConfigDict(extra="forbid", strict=True)

    collection: str = Field(default="default", max_length=128)
    model: str | None = Field(default=None, max_length=128)


class GraphRebuildOut(BaseModel):
    """The rebuild was queued."""

    collection: str
    model: str
    status: Literal["queued"]
