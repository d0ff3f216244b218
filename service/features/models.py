"""Models computed beside the CNN: hand-crafted features and centre-region vectors of a CNN.

They are registered in `models` and stored in `image_embeddings` like any CNN's vectors, so
search, reindexing, deletion and cascades treat them alike. One is *enabled* once it has a
`models` row (`lookalike models install hsv-hist`, or a reindex with it); from then on every
image embedded with the default model gets its vector too, in the same transaction.

- `hsv-hist`: the 256-bin joint HSV histogram (service/features/handcrafted.py), searched by
  chi-square (default) or L1, served by an HNSW `halfvec_l1_ops` index.
- `phash`: the 64-bit perceptual hash, stored as 64 zeros and ones and searched by Hamming
  distance on `binary_quantize(vector)::bit(64)`, served by an HNSW `bit_hamming_ops` index.
- `<cnn>@centre70`: the CNN's vector of the central 70% of each image (the same network, the
  shorter side resized to resize/0.7 before the usual centre crop), for `"query_crops": true`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding.registry import ModelInfo
from service.embedding.transforms import Preprocessing, batch, preprocess
from service.errors import ApiError
from service.features.handcrafted import (
    HSV_BINS,
    PHASH_KEEP,
    PHASH_SIZE,
    decode_rgb,
    hsv_histogram,
    phash,
)
from service.images.decode import ImageDecodeError

if TYPE_CHECKING:
    from service.embedding.models import EmbeddingModel
    from service.embedding.session import Embedder
    from service.images.storage import ContentStore

log = logging.getLogger(__name__)

HSV_HIST = "hsv-hist"
PHASH = "phash"
REGION_SUFFIX = "@centre70"
# The centre region's share of the image side: bench/neardup.py's crop edit keeps 70%.
REGION_FRACTION = 0.7
# Bumped whenever a feature's definition changes, so that old vectors get a new models row.
FEATURE_VERSION = "1"


@dataclass(frozen=True)
class Handcrafted:
    """A hand-crafted feature model: its size, the metrics it supports and its index."""

    name: str
    dim: int
    metrics: tuple[str, ...]  # the first is the default
    index: str
    description: str


HANDCRAFTED: dict[str, Handcrafted] = {
    HSV_HIST: Handcrafted(HSV_HIST, HSV_BINS[0] * HSV_BINS[1] * HSV_BINS[2],
                          ("chi2", "l1", "l2", "cosine", "chebyshev"), "l1",
                          "HSV colour histogram (16x4x4 bins, L1-normalised)"),
    PHASH: Handcrafted(PHASH, PHASH_KEEP * PHASH_KEEP, ("hamming",), "hamming",
                       "64-bit perceptual hash (DCT of a 32x32 grey image)"),
}


def is_derived(name: str) -> bool:
    """Whether a model name is a hand-crafted or region model (no ONNX file of its own)."""
    return name in HANDCRAFTED or name.endswith(REGION_SUFFIX)


def region_model_name(base: str) -> str:
    """The name of a CNN's centre-region companion model."""
    return f"{base}{REGION_SUFFIX}"


def index_metric(name: str) -> str:
    """The metric of a model's HNSW index."""
    return HANDCRAFTED[name].index if name in HANDCRAFTED else "cosine"


def resolve_metric(name: str, metric: str | None) -> str:
    """The metric to rank a model's vectors by (its default if none is given), or 400."""
    if name in HANDCRAFTED:
        allowed = HANDCRAFTED[name].metrics
        if metric is None:
            return allowed[0]
        if metric not in allowed:
            raise ApiError("invalid_metric", f"model {name!r} supports the metrics "
                           f"{', '.join(allowed)}, not {metric!r}")
        return metric
    if metric == "hamming":
        raise ApiError("invalid_metric", "hamming is for binary models (phash)")
    return metric or "cosine"


def handcrafted_info(name: str) -> ModelInfo:
    """The model record of a hand-crafted feature."""
    spec = HANDCRAFTED[name]
    # The digest names the definition, like a model file's sha256 names its weights.
    definition = f"{name}:v{FEATURE_VERSION}:hsv{HSV_BINS}:phash{PHASH_SIZE}/{PHASH_KEEP}"
    return ModelInfo(name=name, version=FEATURE_VERSION, dim=spec.dim, input_size=0, resize=0,
                     mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], input_name="", outputs=[],
                     licence="n/a (hand-crafted)",
                     sha256=hashlib.sha256(definition.encode()).hexdigest(),
                     source="service/features/handcrafted.py", extra={"kind": "handcrafted"})


def region_preprocessing(prep: Preprocessing) -> Preprocessing:
    """The CNN's preprocessing zoomed in on the central REGION_FRACTION of the image."""
    return dataclasses.replace(prep, resize=round(prep.resize / REGION_FRACTION))


def region_info(base: ModelInfo) -> ModelInfo:
    """The model record of a CNN's centre-region vectors (same network and weights)."""
    return dataclasses.replace(
        base, name=region_model_name(base.name),
        resize=region_preprocessing(base.preprocessing).resize,
        extra={"kind": "region", "region_of": base.name, "fraction": REGION_FRACTION})


def derived_info(name: str, *, model_dir: str | Path) -> ModelInfo:
    """The model record of a hand-crafted or region model."""
    if name in HANDCRAFTED:
        return handcrafted_info(name)
    from service.embedding.session import get_embedder

    return region_info(get_embedder(model_dir, name.removesuffix(REGION_SUFFIX)).info)


def handcrafted_vector(name: str, img: object) -> np.ndarray:
    """One hand-crafted feature of a decoded RGB image, as float32 (pHash as 0/1)."""
    if name == HSV_HIST:
        return hsv_histogram(img)  # type: ignore[arg-type]
    return phash(img).astype(np.float32)  # type: ignore[arg-type]


def compute(names: list[str], items: list[bytes], *, embedder: Embedder | None,
            max_pixels: int) -> dict[str, list[np.ndarray | None]]:
    """Vectors of several derived models for several images; None where one cannot decode."""
    out: dict[str, list[np.ndarray | None]] = {n: [None] * len(items) for n in names}
    hand = [n for n in names if n in HANDCRAFTED]
    if hand:
        for i, data in enumerate(items):
            try:
                img = decode_rgb(data, max_pixels=max_pixels)  # once for every feature
            except ImageDecodeError as exc:
                log.warning("no hand-crafted features for an image: %s", exc.message)
                continue
            for name in hand:
                out[name][i] = handcrafted_vector(name, img)
    for name in names:
        if not name.endswith(REGION_SUFFIX):
            continue
        if embedder is None or region_model_name(embedder.info.name) != name:
            raise ValueError(f"{name} needs the embedder of its base model")
        prep = region_preprocessing(embedder.info.preprocessing)
        rows, arrays = [], []
        for i, data in enumerate(items):
            try:
                arrays.append(preprocess(data, prep, max_pixels=max_pixels))
                rows.append(i)
            except ImageDecodeError:
                continue
        if arrays:
            for i, vector in zip(rows, embedder.run(batch(arrays)).vectors, strict=True):
                out[name][i] = vector
    return out


def enabled_models(base: str, *, session: Session) -> list[EmbeddingModel]:
    """The registered derived models computed beside `base`: hand-crafted ones and its regions."""
    from service.embedding.models import EmbeddingModel

    rows = session.scalars(select(EmbeddingModel).where(
        EmbeddingModel.name.in_([*HANDCRAFTED, region_model_name(base)]))
        .order_by(EmbeddingModel.id)).all()
    return list({row.name: row for row in rows}.values())  # the newest version of each


def save_derived(pairs: list[tuple[uuid.UUID, bytes]], *, session: Session, embedder: Embedder,
                 max_pixels: int) -> int:
    """Compute and upsert the enabled derived models' vectors of new images; returns rows."""
    if not pairs:
        return 0
    models = enabled_models(embedder.info.name, session=session)
    if not models:
        return 0
    from service.embedding.service import save_vectors

    vectors = compute([m.name for m in models], [data for _, data in pairs], embedder=embedder,
                      max_pixels=max_pixels)
    written = 0
    for model in models:
        got = [(pairs[i][0], v) for i, v in enumerate(vectors[model.name]) if v is not None]
        save_vectors(model, got, session=session)
        written += len(got)
    return written


def derived_query_vector(name: str, data: bytes, *, model_dir: str | Path,
                         max_pixels: int) -> tuple[ModelInfo, np.ndarray]:
    """A derived model's vector of an uploaded query image; decoding errors propagate."""
    if name in HANDCRAFTED:
        return handcrafted_info(name), handcrafted_vector(
            name, decode_rgb(data, max_pixels=max_pixels))
    from service.embedding.session import get_embedder

    embedder = get_embedder(model_dir, name.removesuffix(REGION_SUFFIX))
    prep = region_preprocessing(embedder.info.preprocessing)
    vector = embedder.run(batch([preprocess(data, prep, max_pixels=max_pixels)])).vectors[0]
    return region_info(embedder.info), vector


def reindex_derived(run_id: uuid.UUID, *, session: Session, store: ContentStore,
                    model_dir: str | Path, max_pixels: int, batch_size: int = 32,
                    max_batches: int = 10) -> bool:
    """reindex_step for a derived model: fill its missing vectors; True when more remain."""
    from datetime import UTC, datetime

    from service.embedding.reindex import ReindexRun, _missing
    from service.embedding.service import ensure_model_row, save_vectors
    from service.embedding.session import get_embedder
    from service.images.models import Image

    run = session.get(ReindexRun, run_id)
    if run is None or run.status != "running":
        return False
    embedder = (None if run.model in HANDCRAFTED
                else get_embedder(model_dir, run.model.removesuffix(REGION_SUFFIX)))
    model = ensure_model_row(derived_info(run.model, model_dir=model_dir), session=session)
    skipped: set[uuid.UUID] = set()
    for _ in range(max_batches):
        query = select(Image.id, Image.sha256).where(
            Image.id.in_(_missing(run.collection, model.id)))
        if skipped:
            query = query.where(Image.id.not_in(skipped))
        rows = session.execute(query.order_by(Image.id).limit(batch_size)).all()
        if not rows:
            run.status, run.finished_at = "done", datetime.now(UTC)
            session.commit()
            return False
        items: list[tuple[uuid.UUID, bytes]] = []
        for image_id, sha in rows:
            try:
                items.append((image_id, store.get(sha)))
            except OSError:
                skipped.add(image_id)
                run.failed += 1
        vectors = compute([run.model], [d for _, d in items], embedder=embedder,
                          max_pixels=max_pixels)[run.model]
        good = [(items[i][0], v) for i, v in enumerate(vectors) if v is not None]
        for i, v in enumerate(vectors):
            if v is None:
                skipped.add(items[i][0])
                run.failed += 1
        save_vectors(model, good, session=session)
        session.commit()
    return True
