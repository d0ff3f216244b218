"""Request and response models of the HTTP API (they also generate the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from spectree.model_adapter.pydantic_adapter import BaseFile


class ErrorDetail(BaseModel):
    """What went wrong, with a stable code."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: ErrorDetail


class ImageOut(BaseModel):
    """A stored image."""

    id: str
    collection: str
    status: str
    error: str | None = None
    metadata: dict[str, Any]
    width: int
    height: int
    format: str
    mime: str
    bytes: int
    sha256: str
    filename: str | None = None
    created_at: datetime
    duplicate: bool | None = None
    auto_tags: list[dict[str, Any]] = Field(
        default_factory=list, description="the classifier's top-5 ImageNet classes {label, p}")


class ImageList(BaseModel):
    """A page of images, newest first."""

    items: list[ImageOut]
    next_cursor: str | None = None


class ListQuery(BaseModel):
    """Listing parameters."""

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, pattern="^(pending|ready|failed)$")
    limit: int = Field(default=50, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)


class UploadForm(BaseModel):
    """Multipart upload of one image."""

    model_config = ConfigDict(extra="forbid")

    file: BaseFile
    metadata: str | None = Field(default=None, description="a JSON object")
    collection: str | None = Field(default=None, max_length=128)


class MetadataPatch(BaseModel):
    """Replacement metadata."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metadata: dict[str, Any]


class SearchQuery(BaseModel):
    """A search: by stored image, by raw vector, or (multipart) by uploaded file."""

    # Strict: JSON `true` is not k = 1, nor "10" a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    image_id: str | None = Field(default=None, max_length=64)
    vector: list[float] | None = Field(default=None, max_length=65536)
    k: int = Field(default=10, ge=1, le=1000)
    collection: str | None = Field(default=None, max_length=128)
    filter: dict[str, Any] | None = None
    model: str | None = Field(default=None, max_length=128)
    metric: Literal["cosine", "l2", "inner_product", "l1", "chebyshev", "chi2",
                    "hamming"] | None = Field(
        default=None, description="default: the model's own (cosine; chi2 for hsv-hist, "
                                  "hamming for phash)")
    min_score: float | None = Field(default=None, allow_inf_nan=False)
    cursor: str | None = Field(default=None, max_length=512)
    explain: bool = False
    # "hash" searches a code set's binary codes (service/hashing).
    index: Literal["hnsw", "hash"] = "hnsw"
    code: str | None = Field(default=None, max_length=128, description="code set for 'hash'")
    rerank: bool | Literal["aqe", "diffusion"] = Field(
        default=True, description="hash: re-rank candidates exactly (false: Hamming order); "
                                  "'aqe' or 'diffusion': re-rank any search")
    query_crops: bool = Field(
        default=False, description="also match crops of the query and images the query is a "
                                   "crop of (needs the model's @centre70 companion)")
    # Search by words, alone or fused with an image query (docs/search.md).
    text: str | None = Field(default=None, max_length=1000,
                             description="words: web-search syntax in fulltext mode")
    text_mode: Literal["fulltext", "semantic", "clip"] = "fulltext"
    text_weight: float = Field(default=0.5, ge=0.0, le=1.0,
                               description="the text side's share in the RRF fusion")


class SearchForm(BaseModel):
    """Multipart search by an uploaded photo; other fields as JSON in `query`."""

    model_config = ConfigDict(extra="forbid")

    file: BaseFile
    query: str | None = Field(default=None, description="SearchQuery fields as a JSON object")


class SearchHitOut(BaseModel):
    """One result, best first."""

    id: str
    score: float = Field(description="larger is better: cosine similarity for cosine, the "
                                     "inner product for inner_product, 1/(1+distance) else")
    distance: float = Field(description="the exact distance under the metric")
    collection: str
    metadata: dict[str, Any]


class SearchPlanOut(BaseModel):
    """How the query ran."""

    method: str = Field(description="exact, index, compact-scan, compact-graph, hash, crops, "
                                    "text or hybrid")
    metric: str
    index_metric: str | None = None
    ef_search: int | None = None
    estimated_rows: float
    estimated_selectivity: float
    rows_scanned: int | None = None
    indexes: list[str] = Field(default_factory=list,
                               description="indexes the query read (explain only)")
    fallback: bool
    notes: list[str]


class SearchResponse(BaseModel):
    """Search results."""

    results: list[SearchHitOut]
    model: str
    metric: str
    took_ms: float
    next_cursor: str | None = None
    explain: SearchPlanOut | None = None


class Health(BaseModel):
    """Liveness or readiness."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)
