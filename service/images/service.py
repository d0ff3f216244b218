"""Image domain functions shared by the API and the workers."""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from service.errors import ApiError, NotFound, parse_uuid
from service.images.decode import ImageDecodeError, decode, open_image, to_rgb
from service.images.models import STATUSES, Image
from service.images.storage import ContentMissing, ContentStore, OpenedContent
from service.images.validation import clean_filename, validate_collection, validate_metadata

log = logging.getLogger(__name__)

MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
        "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif"}
THUMBNAIL_SIZE = 256
# The namespace of the advisory locks that serialise writers and removers of one digest; the
# two-key form keeps them apart from the single-key locks used elsewhere.
CONTENT_LOCK_SPACE = 0x1_00C


@dataclass
class StoredImage:
    """The outcome of an upload: the image row and whether it already existed."""

    image: Image
    duplicate: bool


def store_image(
    data: bytes,
    *,
    session: Session,
    store: ContentStore,
    collection: str,
    metadata: dict[str, Any],
    filename: str | None,
    max_pixels: int,
) -> StoredImage:
    """Validate and store an upload; an identical file in the collection is returned as is."""
    collection = validate_collection(collection)
    digest = hashlib.sha256(data).hexdigest()
    existing = session.scalar(
        select(Image).where(Image.collection == collection, Image.sha256 == digest)
    )
    if existing is not None:
        return StoredImage(existing, duplicate=True)
    try:
        decoded = decode(data, max_pixels=max_pixels, draft_size=THUMBNAIL_SIZE)
    except ImageDecodeError as exc:
        raise ApiError(exc.code, exc.message) from exc
    # The full-resolution size after EXIF orientation, not the draft's.
    fmt, width, height = decoded.format, decoded.width, decoded.height
    lock_content([digest], session=session)
    created_file = store.put(digest, data)
    row = image_row(collection=collection, digest=digest, filename=filename, fmt=fmt,
                    width=width, height=height, size=len(data), metadata=metadata)
    try:
        inserted = session.execute(
            insert(Image).values(**row)
            .on_conflict_do_nothing(constraint="uq_images_collection_sha256")
            .returning(Image.id)
        ).scalar()
        session.commit()
    except BaseException:
        session.rollback()
        if created_file:
            remove_if_unreferenced(digest, session=session, store=store)
        raise
    if inserted is None:
        # A concurrent upload of the same bytes won the race.
        existing = session.scalar(
            select(Image).where(Image.collection == collection, Image.sha256 == digest)
        )
        if existing is None:
            raise ApiError("conflict", "the image was deleted while it was uploaded", status=409)
        return StoredImage(existing, duplicate=True)
    return StoredImage(session.get(Image, inserted), duplicate=False)


def image_row(*, collection: str, digest: str, filename: str | None, fmt: str, width: int,
              height: int, size: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """The values of a new, pending `images` row."""
    return {
        "id": uuid.uuid4(), "collection": collection, "sha256": digest,
        "filename": clean_filename(filename), "mime": MIME.get(fmt, "application/octet-stream"),
        "format": fmt, "width": width, "height": height, "bytes": size,
        "meta": metadata, "status": "pending",
    }


@dataclass
class NewImage:
    """A decoded, validated file for `store_images`."""

    data: bytes
    digest: str
    filename: str | None
    format: str
    width: int
    height: int
    metadata: dict[str, Any]


def store_images(new: list[NewImage], *, session: Session, store: ContentStore,
                 collection: str) -> dict[str, tuple[uuid.UUID, bool]]:
    """Batch `store_image` for validated files: one multi-row insert, no commit.

    Returns {sha256: (image id, duplicate)}; files already in the collection (or inserted by
    a concurrent transaction) come back as duplicates of the existing row.
    """
    if not new:
        return {}
    rows = {}
    lock_content([item.digest for item in new], session=session)
    for item in new:
        store.put(item.digest, item.data)
        rows.setdefault(item.digest, image_row(
            collection=collection, digest=item.digest, filename=item.filename, fmt=item.format,
            width=item.width, height=item.height, size=len(item.data), metadata=item.metadata))
    # Sorted by digest so concurrent batches take the unique-index locks in the same order.
    ordered = [rows[d] for d in sorted(rows)]
    inserted = dict(session.execute(
        insert(Image).values(ordered).on_conflict_do_nothing(
            constraint="uq_images_collection_sha256").returning(Image.sha256, Image.id)).all())
    out = {digest: (image_id, False) for digest, image_id in inserted.items()}
    missing = [d for d in rows if d not in inserted]
    if missing:
        out.update({digest: (image_id, True) for digest, image_id in session.execute(
            select(Image.sha256, Image.id).where(Image.collection == collection,
                                                 Image.sha256.in_(missing)))})
    return out


def lock_content(digests: list[str], *, session: Session) -> None:
    """Hold the digests' content locks until the transaction ends.

    A writer holds them from before it writes the bytes until its rows commit, and a remover
    while it checks for rows and deletes; so no file is removed that a committed or in-flight
    row still needs. Taken in sorted order so that batches cannot deadlock each other.
    """
    keys = sorted({int.from_bytes(bytes.fromhex(d[:8]), "big", signed=True) for d in digests})
    if keys:
        key = func.unnest(keys).table_valued("k").render_derived()
        session.execute(select(func.pg_advisory_xact_lock(CONTENT_LOCK_SPACE, key.c.k))
                        .order_by(key.c.k))


def remove_if_unreferenced(digest: str, *, session: Session, store: ContentStore) -> bool:
    """Delete a digest's bytes unless a row in any collection still references them; commits.

    Returns whether they were deleted.
    """
    try:
        session.rollback()
        lock_content([digest], session=session)
        # Every collection counts, whichever ones the caller may see.
        still_used = session.scalar(select(Image.id).where(Image.sha256 == digest).limit(1),
                                    execution_options={"all_collections": True})
        if still_used is None:
            store.delete(digest)
        session.commit()
        return still_used is None
    except Exception:  # The database may be what failed; keeping a file is the safe side.
        session.rollback()
        log.exception("could not check references of %s", digest)
        return False


def get_image(image_id: str | uuid.UUID, *, session: Session) -> Image:
    """The image, or 404."""
    image = session.get(Image, parse_uuid(image_id, what="image"))
    if image is None:
        raise NotFound("not_found", f"no image {image_id}")
    return image


def delete_image(image_id: str | uuid.UUID, *, session: Session, store: ContentStore) -> None:
    """Delete the row (vectors cascade) and, if no other collection holds it, the file."""
    image = get_image(image_id, session=session)
    digest = image.sha256
    session.execute(delete(Image).where(Image.id == image.id))
    session.commit()
    remove_if_unreferenced(digest, session=session, store=store)


def replace_metadata(image_id: str | uuid.UUID, metadata: Any, *, session: Session,
                     max_bytes: int) -> Image:
    """Replace an image's metadata object; a concurrent delete makes it a 404, never a 500."""
    # Locked, so that a delete either waits for this update or has already removed the row.
    image = session.scalar(select(Image).where(Image.id == parse_uuid(image_id, what="image"))
                           .with_for_update().execution_options(populate_existing=True))
    if image is None:
        raise NotFound("not_found", f"no image {image_id}")
    image.meta = validate_metadata(metadata, max_bytes=max_bytes)
    session.commit()
    return image


def list_images(*, session: Session, collection: str | None, status: str | None, limit: int,
                cursor: tuple[datetime, uuid.UUID] | None) -> list[Image]:
    """Images newest first, after the keyset cursor (created_at, id)."""
    query = select(Image)
    if collection is not None:
        query = query.where(Image.collection == collection)
    if status is not None:
        if status not in STATUSES:
            raise ApiError("invalid_status", f"status must be one of {', '.join(STATUSES)}")
        query = query.where(Image.status == status)
    if cursor is not None:
        created, last_id = cursor
        query = query.where(or_(Image.created_at < created,
                                and_(Image.created_at == created, Image.id < last_id)))
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit)
    return list(session.scalars(query))


def original(image: Image, *, session: Session, store: ContentStore) -> bytes:
    """The stored bytes; gone for good, the image is failed with the reason and this is a 410."""
    try:
        return store.get(image.sha256)
    except ContentMissing as exc:
        raise _gone(image, exc, session=session) from exc


def open_original(image: Image, *, session: Session, store: ContentStore) -> OpenedContent:
    """The stored bytes as a stream, for serving them; gone for good, as `original`."""
    try:
        return store.open(image.sha256)
    except ContentMissing as exc:
        raise _gone(image, exc, session=session) from exc


def _gone(image: Image, exc: ContentMissing, *, session: Session) -> ApiError:
    """Fail the image with the reason; the 410 to raise."""
    mark_failed(image.id, exc.reason, session=session)
    return ApiError("original_missing", f"{exc.reason}; upload the file again", status=410)


def thumbnail(image: Image, *, session: Session, store: ContentStore, max_pixels: int) -> bytes:
    """A JPEG of at most 256 px on its longer side, cached beside the original."""
    cached = store.get_thumbnail(image.sha256)
    if cached is not None:
        return cached
    img = open_image(original(image, session=session, store=store), max_pixels=max_pixels,
                     draft_size=THUMBNAIL_SIZE)
    img = to_rgb(img)
    img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), PILImage.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, optimize=True)
    # Cached only while a row still holds the content: a delete that ran meanwhile must not
    # leave a derived file behind. The content lock orders this against the remover.
    lock_content([image.sha256], session=session)
    if session.scalar(select(Image.id).where(Image.sha256 == image.sha256).limit(1),
                      execution_options={"all_collections": True}) is not None:
        store.put_thumbnail(image.sha256, out.getvalue())
    session.commit()
    return out.getvalue()


def mark_failed(image_id: uuid.UUID, reason: str, *, session: Session) -> None:
    """Record a permanent failure with a readable reason."""
    # One statement: a row deleted meanwhile is simply not updated.
    session.execute(update(Image).where(Image.id == image_id)
                    .values(status="failed", error=reason[:2000]))
    session.commit()


def claim_stale_pending(*, session: Session, older_than_s: float, limit: int = 1000
                        ) -> list[uuid.UUID]:
    """Images still pending after `older_than_s` (their message was lost): touch and return them.

    Touching `updated_at` in the same statement keeps the next sweep from sending them again
    before the worker had its chance.
    """
    stale = (select(Image.id).where(
        Image.status == "pending",
        Image.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s))
        .order_by(Image.updated_at).limit(limit).with_for_update(skip_locked=True))
    ids = list(session.scalars(
        update(Image).where(Image.id.in_(stale.scalar_subquery()))
        .values(updated_at=func.now()).returning(Image.id)))
    session.commit()
    return ids
