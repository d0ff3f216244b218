"""What follows an embedding, written once for single uploads and bulk jobs alike.

An embedded image gets, in its caller's transaction: the model's vector; class probabilities
and automatic tags from the logits (service/text); the vectors of the enabled hand-crafted and
region models (service/features); its binary codes under the code sets covering its
collection (service/hashing); and, for single uploads, its kNN graph edges (service/graph).
The image turns ready in the same transaction, so a ready image always has all of them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.embedding.service import ensure_model_row, find_model, save_vectors
from service.embedding.session import get_embedder
from service.features.models import DerivedVectors, compute_derived, enabled_names, write_derived
from service.graph.rebuilds import request_rebuild
from service.graph.service import link_image
from service.hashing.service import encode_images
from service.images.decode import ImageDecodeError
from service.images.models import Image
from service.images.storage import ContentMissing, ContentStore
from service.queue import LINK_JOB_IMAGES, REBUILD_GRAPH, enqueue, enqueue_or_sweep
from service.text.labels import save_labels


class PermanentEmbedError(Exception):
    """Embedding this image can never succeed (e.g. undecodable bytes)."""


@dataclass(frozen=True)
class EmbeddedImage:
    """A stored image with the model's output for it: its vector and, if any, its logits."""

    image_id: uuid.UUID
    digest: str
    vector: np.ndarray
    logits: np.ndarray | None = None


def index_embedded(model: EmbeddingModel, images: list[EmbeddedImage], *, session: Session,
                   collection: str, derived: DerivedVectors | None = None,
                   link: bool = False) -> None:
    """Write everything that follows an embedding and mark the images ready; no commit.

    `derived` holds the derived models' vectors, computed beforehand (outside any lock) by
    `service.features.models.compute_derived`. With `link`, each image is also linked into
    its collection's kNN graph (bulk jobs rebuild the graph after the job instead).
    """
    if not images:
        return
    tags = save_labels(model, [(i.image_id, i.logits) for i in images if i.logits is not None],
                       session=session, set_tags=False)
    # First of the image's vectors: this statement also marks it ready (and tags it), so the
    # vectors written after it are copied the ready status by their insert trigger.
    save_vectors(model, [(i.image_id, i.vector) for i in images], session=session, tags=tags)
    if derived is not None:
        write_derived(derived, [(i.image_id, i.digest) for i in images], session=session)
    # Codes read the vectors just written, of images that are ready in this transaction.
    encode_images([i.image_id for i in images], collection, session=session)
    if link:
        for image in images:
            link_image(image.image_id, session=session, model=model)


def embed_image(image_id: uuid.UUID, *, session: Session, store: ContentStore,
                model_dir: str | Path, model_name: str, max_pixels: int,
                link: bool = False, max_attempts: int = 3) -> str:
    """Embed and index one stored image in one commit; idempotent. Returns its final status."""
    image = session.get(Image, image_id)
    if image is None:
        return "deleted"
    if image.status == "pending":
        # Counted and committed before the model runs: a file that kills the worker (the
        # message comes back each time) is failed with the reason after `max_attempts`.
        image.attempts += 1
        session.commit()
        if image.attempts > max_attempts:
            raise PermanentEmbedError(f"the worker stopped {max_attempts} times while "
                                      "processing this image (too large, or malformed?)")
    embedder = get_embedder(model_dir, model_name)
    model = ensure_model_row(embedder.info, session=session)
    done = session.scalar(select(ImageEmbedding.image_id).where(
        ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == model.id))
    if done is not None and image.status == "ready":
        return "ready"
    digest, collection = image.sha256, image.collection
    names = enabled_names(embedder.info.name, session=session)
    session.rollback()  # no transaction stays open while the model runs
    try:
        data = store.get(digest)
    except ContentMissing as exc:
        raise PermanentEmbedError(exc.reason) from exc
    try:
        result = embedder.embed_bytes([data], max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise PermanentEmbedError(exc.message) from exc
    derived = compute_derived(names, {digest: data}, embedder=embedder, max_pixels=max_pixels)
    # Locked until the commit: a delete now waits instead of pulling the row from under the
    # inserts (their foreign keys would fail).
    alive = session.scalar(select(Image.id).where(Image.id == image_id)
                           .with_for_update(key_share=True))
    if alive is None:
        session.rollback()
        return "deleted"
    logits = None if result.logits is None else result.logits[0]
    index_embedded(model, [EmbeddedImage(image_id, digest, result.vectors[0], logits)],
                   session=session, collection=collection, derived=derived, link=link)
    session.commit()
    return "ready"


def graph_after_job(job_id: uuid.UUID, collection: str, model_name: str, *, session: Session,
                    rebuild_max_images: int) -> str | None:
    """Queue a finished job's images into the kNN graph the cheaper way; returns the task.

    Linking each image as it is stored halved bulk ingestion's throughput, so a job's images
    join the graph afterwards: an exact rebuild of a small collection (quadratic in it), or
    linking the job's images one by one in a large one (linear in the job).
    """
    model = find_model(model_name, session=session)
    if model is None:
        return None
    size = session.scalar(select(func.count()).select_from(Image).where(
        Image.collection == collection)) or 0
    if size <= rebuild_max_images:
        rebuild_id = request_rebuild(collection, model.id, session=session)
        session.commit()
        enqueue_or_sweep(REBUILD_GRAPH, str(rebuild_id))  # if lost, the sweeper sends it
        return REBUILD_GRAPH
    enqueue(LINK_JOB_IMAGES, str(job_id))
    return LINK_JOB_IMAGES


def link_images(image_ids: list[uuid.UUID], *, session: Session) -> int:
    """Link stored images into their collections' kNN graphs (idempotent: edges are upserted)."""
    for image_id in image_ids:
        link_image(image_id, session=session)
    return len(image_ids)
