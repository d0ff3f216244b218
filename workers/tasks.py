"""Celery tasks: ids in, one domain call, retries for transient errors."""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from flask import current_app
from sqlalchemy.exc import DBAPIError, OperationalError

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
            return embedding.embed_image(
                image_uuid, session=session, store=current_app.extensions["content_store"],
                model_dir=config["MODEL_DIR"], model_name=config["DEFAULT_MODEL"],
                max_pixels=int(config["MAX_IMAGE_PIXELS"]),
            )
        except embedding.PermanentEmbedError as exc:
            session.rollback()
            images.mark_failed(image_uuid, str(exc), session=session)
            log.warning("image %s failed: %s", image_id, exc)
            return "failed"
