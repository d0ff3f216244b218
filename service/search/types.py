"""The shapes search passes between its layers: request, query plan, hits, explain record, cursor.

Strategies, post-steps and the orchestrator all import these from here, below all of them, so
no strategy needs the orchestrator's module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.errors import ApiError
from service.images.models import Image
from service.search.planner import EF_SEARCH, MAX_EF_SEARCH


@dataclass
class SearchRequest:
    """A parsed search: exactly one of image_id, vector or file bytes (or words, or both)."""

    k: int = 10
    image_id: str | None = None
    vector: list[float] | None = None
    file: bytes | None = None
    collection: str | None = None
    filter_doc: dict[str, Any] | None = None
    model: str | None = None
    metric: str | None = None  # None: the model's default (service/features/models.py)
    min_score: float | None = None
    cursor: str | None = None
    explain: bool = False
    # Also match crops of the query and the centre regions of stored images.
    query_crops: bool = False
    # "hash" ranks by the Hamming candidates of the code set named in `code`.
    index: str = "hnsw"
    code: str | None = None
    rerank: bool | str = True
    # Search by words, alone or fused with an image query.
    text: str | None = None
    text_mode: str = "fulltext"
    text_weight: float = 0.5


@dataclass
class SearchPlan:
    """How a query ran, for `"explain": true`."""

    method: str = "exact"
    metric: str = "cosine"
    index_metric: str | None = None
    ef_search: int | None = None
    estimated_rows: float = 0.0
    estimated_selectivity: float = 1.0
    rows_scanned: int | None = None
    # The indexes the statement read, from EXPLAIN ANALYZE (with rows_scanned).
    indexes: list[str] = field(default_factory=list)
    fallback: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageRef:
    """An image known by its id alone: the hits of `search_vectors(..., ids_only=True)`."""

    id: uuid.UUID


@dataclass
class SearchHit:
    """One result with its exact distance under the ranking metric."""

    image: Image | ImageRef
    distance: float
    score: float


@dataclass
class SearchResult:
    """Hits, best first, the plan, and a cursor for the next page."""

    hits: list[SearchHit]
    plan: SearchPlan
    next_cursor: str | None = None


@dataclass
class SearchOutcome:
    """Hits, the model that ranked them, and the plan."""

    result: SearchResult
    model: str
    metric: str


@dataclass
class Cursor:
    """Where a page ended: the last (distance, id), rows before it, the graph width, the query."""

    distance: float
    image_id: uuid.UUID
    offset: int
    ef_search: int
    fingerprint: str

    def encode(self) -> str:
        """The cursor as an opaque URL-safe string."""
        raw = json.dumps([self.distance, str(self.image_id), self.offset, self.ef_search,
                          self.fingerprint])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str, fingerprint: str) -> Cursor:
        """A cursor this API returned for the query with this fingerprint, or 400."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            distance, image_id, offset, ef, fp = json.loads(raw)
            cursor = cls(float(distance), uuid.UUID(image_id), int(offset),
                         max(1, min(MAX_EF_SEARCH, int(ef))), str(fp))
            if cursor.offset < 0 or not math.isfinite(cursor.distance):
                raise ValueError("out of range")
        except (ValueError, TypeError) as exc:
            raise ApiError("invalid_cursor", "cursor is not one this API returned") from exc
        if cursor.fingerprint != fingerprint:
            raise ApiError("invalid_cursor", "cursor belongs to a different query")
        return cursor


def fingerprint(*parts: Any) -> str:
    """A short digest that ties a cursor to the query that made it."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TextQuery:
    """Words to rank by: the stripped text, its mode, and its weight against an image query."""

    text: str
    mode: str = "fulltext"
    weight: float = 0.5
    # The words as sent: CLIP's text encoder is given them unstripped.
    as_sent: str = ""


@dataclass
class QueryPlan:
    """One search as a strategy runs it: what to rank, among which images, how many, how."""

    strategy: str
    k: int
    model: EmbeddingModel | None = None
    vector: np.ndarray | None = None
    metric: str = "cosine"
    # The model name the outcome reports (text searches name it without resolving a row).
    model_name: str = ""
    collection: str | None = None
    filter_doc: dict[str, Any] | None = None
    exclude_id: uuid.UUID | None = None
    min_score: float | None = None
    cursor: Cursor | None = None
    fingerprint: str = ""
    explain: bool = False
    ids_only: bool = False
    # The planner's route of a vector query.
    ef_search: int = EF_SEARCH
    estimated_rows: float = 0.0
    estimated_selectivity: float = 1.0
    exact_fallback: bool = True
    # The partial compact index of the plan's filter, when it is one of the model's hot ones.
    hot_index: str | None = None
    # Code sets: which one, whether candidates are re-ranked on the vectors, how many.
    code: str | None = None
    code_rerank: bool = True
    candidates: int | None = None
    text: TextQuery | None = None
    # A post-step over the first result ("aqe", "diffusion"), or None.
    rerank: str | None = None
    # The request itself and the model files, for strategies that embed more of the query.
    request: SearchRequest | None = None
    model_dir: str = ""
    max_pixels: int = 0

    @property
    def offset(self) -> int:
        """Rows before this page."""
        return self.cursor.offset if self.cursor else 0

    @property
    def filtered(self) -> bool:
        """Whether anything narrows the candidates below all ready images."""
        return bool(self.filter_doc) or self.collection is not None or self.exclude_id is not None

    def vector_model(self) -> tuple[np.ndarray, EmbeddingModel]:
        """The image query's vector and model (a plan for a vector strategy has both)."""
        if self.vector is None or self.model is None:
            raise ValueError(f"strategy {self.strategy!r} needs a query vector and its model")
        return self.vector, self.model


class Strategy(Protocol):
    """One way of searching: a query plan in; ranked hits, a cursor and an explain record out."""

    def __call__(self, plan: QueryPlan, *, session: Session) -> SearchResult:
        """Run the plan."""
        ...


class PostStep(Protocol):
    """A re-ranking of a first result, with the strategy that made it to search again."""

    def __call__(self, plan: QueryPlan, first: SearchResult, *, session: Session,
                 search: Strategy) -> SearchResult:
        """Re-rank the first result of the plan."""
        ...
