"""Search domain functions: nearest neighbours under filters, ranked in SQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import cast, select, text
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError
from service.images.models import Image
from service.search.filters import compile_filter


@dataclass
class SearchHit:
    """One result: the image and its cosine distance to the query."""

    image: Image
    distance: float

    @property
    def score(self) -> float:
        """Cosine similarity."""
        return 1.0 - self.distance


def search_vectors(
    query: np.ndarray,
    *,
    session: Session,
    model: EmbeddingModel,
    k: int,
    collection: str | None = None,
    filter_doc: dict[str, Any] | None = None,
    exclude_id: uuid.UUID | None = None,
) -> list[SearchHit]:
    """The k nearest ready images by cosine distance, best first, ties by id."""
    dim = int(model.dim)
    vec = cast(ImageEmbedding.vector, HALFVEC(dim))
    distance = vec.cosine_distance(query.astype(np.float32)).label("distance")
    conditions = [ImageEmbedding.model_id == model.id, Image.status == "ready"]
    if collection is not None:
        conditions.append(Image.collection == collection)
    if filter_doc:
        conditions.append(compile_filter(filter_doc))
    if exclude_id is not None:
        conditions.append(Image.id != exclude_id)
    # Iterative index scans keep reading the graph until k rows pass the filter.
    session.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"),
                    {"ef": str(min(1000, max(40, 2 * k)))})
    inner = (
        select(Image.id.label("image_id"), distance)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(*conditions)
        .order_by(distance)
        .limit(k)
        .subquery()
    )
    rows = session.execute(
        select(Image, inner.c.distance)
        .join(inner, inner.c.image_id == Image.id)
        .order_by(inner.c.distance, Image.id)
    ).all()
    return [SearchHit(image=row[0], distance=float(row[1])) for row in rows]


@dataclass
class SearchRequest:
    """A parsed search: exactly one of image_id, vector or file bytes."""

    k: int = 10
    image_id: str | None = None
    vector: list[float] | None = None
    file: bytes | None = None
    collection: str | None = None
    filter_doc: dict[str, Any] | None = None
    model: str | None = None


@dataclass
class SearchOutcome:
    """Hits and the model that ranked them."""

    hits: list[SearchHit]
    model: str


def run_search(req: SearchRequest, *, session: Session, model_dir: str, default_model: str,
               max_pixels: int, max_k: int) -> SearchOutcome:
    """Resolve the query vector (stored image, raw vector or uploaded file), then search."""
    from service.embedding import service as embedding
    from service.embedding.registry import ModelError
    from service.embedding.transforms import ImageDecodeError
    from service.images.service import get_image

    given = [x for x in (req.image_id, req.vector, req.file) if x is not None]
    if len(given) != 1:
        raise ApiError("invalid_query", "give exactly one of image_id, vector or file")
    if not 1 <= req.k <= max_k:
        raise ApiError("invalid_query", f"k must be between 1 and {max_k}")
    if req.filter_doc is not None:
        compile_filter(req.filter_doc)  # Validate before any expensive work.
    name = req.model or default_model
    exclude = None
    if req.file is not None:
        try:
            info, vector = embedding.embed_query(req.file, model_dir=model_dir, model_name=name,
                                                 max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(exc.code, exc.message) from exc
        except ModelError as exc:
            raise ApiError("unknown_model", str(exc)) from exc
        model = embedding.ensure_model_row(info, session=session)
    else:
        model = embedding.find_model(name, session=session)
        if model is None:
            raise ApiError("unknown_model", f"no images have been embedded with model {name!r}")
        if req.image_id is not None:
            image = get_image(req.image_id, session=session)
            stored = embedding.stored_vector(image.id, model, session=session)
            if stored is None:
                raise ApiError("not_ready", f"image {image.id} has no vector yet "
                               f"(status {image.status})", status=409)
            vector, exclude = stored, image.id
        else:
            vector = np.asarray(req.vector, dtype=np.float32)
            if vector.shape != (model.dim,):
                raise ApiError("invalid_vector", f"vector must have {model.dim} numbers "
                               f"for model {name!r}, got {vector.size}")
            if not np.all(np.isfinite(vector)) or np.abs(vector).max() > 65504:
                raise ApiError("invalid_vector", "vector values must be finite halfvec numbers")
    if not np.any(vector):
        raise ApiError("invalid_vector", "a zero vector has no cosine neighbours")
    hits = search_vectors(vector, session=session, model=model, k=req.k,
                          collection=req.collection, filter_doc=req.filter_doc,
                          exclude_id=exclude)
    return SearchOutcome(hits=hits, model=model.name)
