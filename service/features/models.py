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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding.models import INDEX_METRIC, EmbeddingModel
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
    from service.embedding.session import Embedder

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
                     source="service/features/handcrafted.py",
                     extra={"kind": "handcrafted", INDEX_METRIC: spec.index})


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
    rows = session.scalars(select(EmbeddingModel).where(
        EmbeddingModel.name.in_([*HANDCRAFTED, region_model_name(base)]))
        .order_by(EmbeddingModel.id)).all()
    return list({row.name: row for row in rows}.values())  # the newest version of each


def enabled_names(base: str, *, session: Session) -> list[str]:
    """The names of the derived models computed beside `base` (a cheap read)."""
    return [model.name for model in enabled_models(base, session=session)]


@dataclass
class DerivedVectors:
    """Derived models' vectors of some images by content digest (absent: undecodable)."""

    base: str
    vectors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def compute_derived(names: list[str], items: dict[str, bytes], *, embedder: Embedder,
                    max_pixels: int) -> DerivedVectors:
    """The vectors of the named derived models for images by digest; touches no database.

    The decodes and the region crops through the model are the costly part of indexing, so
    callers run this before they take any lock or open the transaction that writes them.
    """
    if not names or not items:
        return DerivedVectors(embedder.info.name)
    digests = list(items)
    computed = compute(names, [items[d] for d in digests], embedder=embedder,
                       max_pixels=max_pixels)
    return DerivedVectors(embedder.info.name, {
        name: {d: v for d, v in zip(digests, vectors, strict=True) if v is not None}
        for name, vectors in computed.items()})


def write_derived(derived: DerivedVectors, images: list[tuple[uuid.UUID, str]], *,
                  session: Session) -> int:
    """Upsert computed derived vectors of (image id, digest) pairs; returns rows; no commit.

    Only models still enabled are written. Images are not marked ready here: the caller does
    that once everything of theirs is written.
    """
    if not derived.vectors or not images:
        return 0
    from service.embedding.service import save_vectors

    written = 0
    for model in enabled_models(derived.base, session=session):
        by_digest = derived.vectors.get(model.name, {})
        got = [(image_id, by_digest[d]) for image_id, d in images if d in by_digest]
        save_vectors(model, got, session=session, mark_ready=False)
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
