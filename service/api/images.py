"""Images: upload, read, list, patch, delete, original bytes and thumbnails."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from spectree import Response as Resp
from werkzeug.wsgi import wrap_file

from service.api.auth import require_collection
from service.api.context import content_store
from service.api.openapi import spec
from service.api.paging import decode_cursor, keyset_page
from service.api.schemas import (
    ErrorResponse,
    ImageList,
    ImageOut,
    ListQuery,
    MetadataPatch,
    UploadForm,
)
from service.db import session_scope
from service.errors import ApiError
from service.images import service as images
from service.images.decode import ImageDecodeError
from service.images.models import Image
from service.images.storage import OpenedContent
from service.images.validation import validate_metadata
from service.queue import EMBED_IMAGE, enqueue_or_sweep

bp = Blueprint("images", __name__, url_prefix="/api/v1/images")
log = logging.getLogger(__name__)
TAGS = ["images"]
STREAM_CHUNK = 256 * 1024


def image_json(image: Image, *, duplicate: bool | None = None) -> dict[str, Any]:
    """The public shape of an image row."""
    out: dict[str, Any] = {
        "id": str(image.id), "collection": image.collection, "status": image.status,
        "error": image.error, "metadata": image.meta, "width": image.width,
        "height": image.height, "format": image.format, "mime": image.mime,
        "bytes": image.bytes, "sha256": image.sha256, "filename": image.filename,
        "created_at": image.created_at.isoformat(),
        "auto_tags": image.auto_tags or [],  # the classifier's top-5 classes
    }
    if duplicate is not None:
        out["duplicate"] = duplicate
    return out


def parse_metadata_field(raw: str | None) -> dict[str, Any]:
    """The optional `metadata` form field: a JSON object."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError("invalid_metadata", f"metadata is not valid JSON: {exc}") from exc
    return validate_metadata(value, max_bytes=int(current_app.config["MAX_METADATA_BYTES"]))


@bp.post("")
@spec.validate(form=UploadForm, resp=Resp(HTTP_200=ImageOut, HTTP_202=ImageOut,
                                          HTTP_400=ErrorResponse, HTTP_413=ErrorResponse),
               tags=TAGS)
def upload_image() -> tuple[dict[str, Any], int]:
    """Upload an image; it is embedded asynchronously (202), or returned if already stored (200)."""
    upload = request.files.get("file")
    if upload is None:
        raise ApiError("missing_file", "multipart field 'file' is required")
    metadata = parse_metadata_field(request.form.get("metadata"))
    collection = require_collection(request.form.get("collection") or "default")
    data = upload.read()
    with session_scope() as session:
        stored = images.store_image(
            data, session=session, store=content_store(), collection=collection,
            metadata=metadata, filename=upload.filename,
            max_pixels=int(current_app.config["MAX_IMAGE_PIXELS"]),
        )
        body = image_json(stored.image, duplicate=stored.duplicate)
    if stored.duplicate:
        return body, 200
    enqueue_or_sweep(EMBED_IMAGE, body["id"])  # the row stays pending until embedded
    return body, 202


@bp.get("")
@spec.validate(query=ListQuery, resp=Resp(HTTP_200=ImageList, HTTP_400=ErrorResponse), tags=TAGS)
def list_images() -> dict[str, Any]:
    """List images newest first, with a cursor for the next page."""
    q: ListQuery = request.context.query  # type: ignore[attr-defined]
    with session_scope() as session:
        rows = images.list_images(session=session, collection=q.collection, status=q.status,
                                  limit=q.limit + 1, cursor=decode_cursor(q.cursor))
        page, next_cursor = keyset_page(rows, q.limit, lambda r: (r.created_at, r.id))
        return {"items": [image_json(r) for r in page], "next_cursor": next_cursor}


@bp.get("/<image_id>")
@spec.validate(resp=Resp(HTTP_200=ImageOut, HTTP_404=ErrorResponse), tags=TAGS)
def get_image(image_id: str) -> dict[str, Any]:
    """One image's record."""
    with session_scope() as session:
        return image_json(images.get_image(image_id, session=session))


@bp.patch("/<image_id>")
@spec.validate(json=MetadataPatch, resp=Resp(HTTP_200=ImageOut, HTTP_400=ErrorResponse,
                                             HTTP_404=ErrorResponse), tags=TAGS)
def patch_image(image_id: str) -> dict[str, Any]:
    """Replace an image's metadata."""
    body: MetadataPatch = request.context.json  # type: ignore[attr-defined]
    with session_scope() as session:
        image = images.replace_metadata(
            image_id, body.metadata, session=session,
            max_bytes=int(current_app.config["MAX_METADATA_BYTES"]))
        return image_json(image)


@bp.delete("/<image_id>")
@spec.validate(resp=Resp("HTTP_204", HTTP_404=ErrorResponse), tags=TAGS)
def delete_image(image_id: str) -> tuple[str, int]:
    """Delete an image, its vectors and (if unshared) its file."""
    with session_scope() as session:
        images.delete_image(image_id, session=session, store=content_store())
    return "", 204


def streamed(view: Callable[..., Response]) -> Callable[..., Response]:
    """Attach the body a view left in `g` after spectree is done with its response.

    Spectree reads every response body whole to validate it (its Flask plugin calls
    `get_data`), which would load a 50 MB original into memory; the view returns headers only
    and its stream is attached here, outside the validation.
    """
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        g.pop("stream_body", None)
        response = view(*args, **kwargs)
        opened: OpenedContent | None = g.pop("stream_body", None)
        if opened is not None:
            if response.status_code != 200:
                opened.stream.close()
                return response
            response.response = wrap_file(request.environ, opened.stream,  # type: ignore[arg-type]
                                          buffer_size=STREAM_CHUNK)
            response.direct_passthrough = True
            response.headers["Content-Length"] = str(opened.size)
        return response
    return wrapper


@bp.get("/<image_id>/file")
@streamed
@spec.validate(resp=Resp("HTTP_200", HTTP_404=ErrorResponse, HTTP_410=ErrorResponse),
               tags=TAGS)
def image_file(image_id: str) -> Response:
    """The original bytes, streamed from the store (never whole in memory)."""
    with session_scope() as session:
        image = images.get_image(image_id, session=session)
        mime = image.mime
        # Through the API rather than a presigned redirect: keys and collection visibility
        # hold for every read, a deleted image stops being served at once, and the bucket
        # need not be reachable from clients (docs/operations.md, Storage).
        g.stream_body = images.open_original(image, session=session, store=content_store())
    return Response(b"", mimetype=mime, headers={
        "Cache-Control": "private, max-age=31536000, immutable",
        "X-Content-Type-Options": "nosniff"})


@bp.get("/<image_id>/thumbnail")
@spec.validate(resp=Resp("HTTP_200", HTTP_404=ErrorResponse, HTTP_410=ErrorResponse,
                         HTTP_422=ErrorResponse), tags=TAGS)
def image_thumbnail(image_id: str) -> Response:
    """A JPEG of at most 256 px."""
    with session_scope() as session:
        image = images.get_image(image_id, session=session)
        try:
            data = images.thumbnail(image, session=session, store=content_store(),
                                    max_pixels=int(current_app.config["MAX_IMAGE_PIXELS"]))
        except ImageDecodeError as exc:
            raise ApiError(exc.code, exc.message, status=422) from exc
        return Response(data, mimetype="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})
