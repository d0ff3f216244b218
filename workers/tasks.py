"""Celery tasks: ids in, one domain call, retries for transient errors."""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from flask import current_app
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from service.db import session_scope
from service.embedding import service as embedding
from service.images import service as images

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError)


@shared_task(name="lookalike.embed_image", bind=True, acks_late=True,
             reject_on_worker_lost=True, autoretry_for=TRANSIENT, retry_backoff=True,
             retry_backoff_max=120, retry_jitter=True, max_retries=8)
def embed_image(self: object, image_id: str) -> str:
    """Embed one image with the default model; permanent failures mark it failed."""
    config = current_app.config
    image_uuid = uuid.UUID(image_id)
    with session_scope() as session:
        try:
            status = embedding.embed_image(
                image_uuid, session=session, store=current_app.extensions["content_store"],
                model_dir=config["MODEL_DIR"], model_name=config["DEFAULT_MODEL"],
                max_pixels=int(config["MAX_IMAGE_PIXELS"]),
            )
            if status == "ready":  # Issue 6: binary codes (and graph edges) of the new image.
                index_new_image(image_uuid, session=session)
            return status
        except embedding.PermanentEmbedError as exc:
            session.rollback()
            images.mark_failed(image_uuid, str(exc), session=session)
            log.warning("image %s failed: %s", image_id, exc)
            return "failed"


# --- Issue 6: hashing and graph -------------------------------------------------------------


def index_new_image(image_id: uuid.UUID, *, session: Session) -> None:
    """Encode a freshly embedded image under its code sets and link it into the kNN graph."""
    from service.graph.service import link_image
    from service.hashing.service import encode_image

    encode_image(image_id, session=session)
    link_image(image_id, session=session)


@shared_task(name="lookalike.fit_codes", bind=True, acks_late=True,
             reject_on_worker_lost=True, autoretry_for=TRANSIENT, retry_backoff=True,
             retry_backoff_max=120, retry_jitter=True, max_retries=8)
def fit_codes(self: object, code_set_id: int) -> str:
    """Fit a code set on its vectors, encode them and build its Hamming index."""
    from service.hashing.service import fit_code_set

    with session_scope() as session:
        return fit_code_set(int(code_set_id), session=session)


@shared_task(name="lookalike.rebuild_graph", bind=True, acks_late=True,
             reject_on_worker_lost=True, autoretry_for=TRANSIENT, retry_backoff=True,
             retry_backoff_max=120, retry_jitter=True, max_retries=8)
def rebuild_graph(self: object, collection: str, model_id: int) -> int:
    """Recompute one collection's kNN graph exactly; returns the edges written."""
    from service.embedding.models import EmbeddingModel
    from service.graph.service import rebuild_graph as rebuild

    with session_scope() as session:
        model = session.get(EmbeddingModel, int(model_id))
        return 0 if model is None else rebuild(collection, session=session, model=model)


@shared_task(name="lookalike.run_evaluation", bind=True, acks_late=True,
             reject_on_worker_lost=True, autoretry_for=TRANSIENT, retry_backoff=True,
             retry_backoff_max=120, max_retries=5)
def run_evaluation(self: object, run_id: str) -> str:
    """Run one queued evaluation."""
    from service.evaluation.service import execute_run

    with session_scope() as session:
        return execute_run(uuid.UUID(run_id), session=session)
