"""Jobs: bulk ingestion of archives, server directories and manifests, with progress."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from typing import Any

from flask import Blueprint, current_app, request
from pydantic import ValidationError
from spectree import Response as Resp
from werkzeug.datastructures import FileStorage, ImmutableMultiDict
from werkzeug.formparser import parse_form_data

from service.api.auth import require_collection
from service.api.job_schemas import (
    JobCreate,
    JobCreated,
    JobForm,
    JobItemList,
    JobItemsQuery,
    JobList,
    JobListQuery,
    JobOut,
)
from service.api.openapi import spec
from service.api.paging import decode_cursor, keyset_page
from service.api.schemas import ErrorResponse
from service.db import session_scope
from service.errors import ApiError
from service.jobs import paths, progress, states, sweeper
from service.jobs import service as jobs
from service.jobs.expansion import UploadSink, create_archive_job
from service.jobs.models import IngestItem

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")
log = logging.getLogger(__name__)
TAGS = ["jobs"]
# Validation errors echoed in a 400: a million bad items must not make a million messages.
REPORTED_ERRORS = 10


@bp.before_request
def _body_size_limit() -> None:
    """Archives may be far larger than single uploads, manifests not; refuse before reading."""
    if request.method != "POST" or request.endpoint != "jobs.create_job":
        return
    config = current_app.config
    if request.mimetype == "multipart/form-data":
        limit, what = int(config["MAX_ARCHIVE_BYTES"]), "archive"
    else:
        limit, what = int(config["MANIFEST_MAX_BYTES"]), "manifest"
    request.max_content_length = limit
    if request.content_length is not None and request.content_length > limit:
        raise ApiError("payload_too_large", f"the {what} is larger than {limit} bytes",
                       status=413)


def job_json(p: progress.Progress) -> dict[str, Any]:
    """The public shape of a job with its counts."""
    job, counts = p.job, p.counts
    return {
        "id": str(job.id), "status": job.status, "collection": job.collection, "kind": job.kind,
        "source": job.source, "total": job.total, "done": counts["done"],
        "failed": counts["failed"], "duplicates": counts["duplicate"],
        "cancelled": counts["cancelled"], "pending": counts["pending"],
        "running": counts["running"],
        "rate": None if p.rate is None else round(p.rate, 2),
        "eta_s": None if p.eta_s is None else round(p.eta_s, 1),
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": ({"code": job.error_code or "failed", "message": job.error}
                  if job.error else None),
        "errors": [{"item": e.id, "name": e.name, "error": e.error} for e in p.errors],
    }


def item_json(item: IngestItem) -> dict[str, Any]:
    """The public shape of a job item."""
    return {"id": item.id, "name": item.name, "status": item.status, "error": item.error,
            "image_id": str(item.image_id) if item.image_id else None,
            "attempts": item.attempts, "metadata": item.meta,
            "updated_at": item.updated_at.isoformat()}


def _parse_form(sink: UploadSink) -> tuple[ImmutableMultiDict[str, str],
                                           ImmutableMultiDict[str, FileStorage]]:
    """The multipart body, its file parts streamed straight into the job's folder."""
    try:
        _, form, files = parse_form_data(
            request.environ, stream_factory=sink, max_content_length=request.max_content_length,
            max_form_memory_size=request.max_form_memory_size,
            max_form_parts=request.max_form_parts, silent=False)
    except ValueError as exc:
        raise ApiError("invalid_request", f"the multipart body could not be read: {exc}") from exc
    return form, files


def _metadata_part(form: ImmutableMultiDict[str, str],
                   files: ImmutableMultiDict[str, FileStorage]) -> tuple[bytes, str | None] | None:
    """The optional `metadata` part of a server-path job: an uploaded file or a text field."""
    upload = files.get("metadata")
    if upload is not None:
        return upload.read(), upload.filename
    raw = form.get("metadata")
    return (raw.encode(), None) if raw else None


def _validation_message(exc: ValidationError) -> str:
    """The first few problems and how many there were in all, never the input itself."""
    found = exc.errors(include_url=False, include_context=False, include_input=False)
    shown = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                      for e in found[:REPORTED_ERRORS])
    more = exc.error_count() - min(len(found), REPORTED_ERRORS)
    return shown + (f"; and {more} more errors" if more > 0 else "")


def _json_body() -> JobCreate:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ApiError("invalid_request", "send a multipart archive (field 'file') or a "
                       "JSON object with 'source' or 'items'")
    items, limit = payload.get("items"), _manifest_max_items()
    if isinstance(items, list) and len(items) > limit:
        raise ApiError("too_many_files", f"the manifest lists more than {limit} files")
    return _validated(payload)


def _validated(payload: Any) -> JobCreate:
    try:
        return JobCreate.model_validate(payload)
    except ValidationError as exc:
        raise ApiError("invalid_request", _validation_message(exc)) from exc


def _manifest_max_items() -> int:
    config = current_app.config
    return min(int(config["MANIFEST_MAX_ITEMS"]), int(config["ARCHIVE_MAX_ENTRIES"]))


def _create_from_form() -> tuple[dict[str, Any], int]:
    """An archive upload (saved, then expanded by a worker) or a server path with metadata."""
    config = current_app.config
    job_id = uuid.uuid4()
    folder = paths.job_dir(config["STORAGE_DIR"], job_id)
    committed = False
    try:
        form, files = _parse_form(UploadSink(folder))
        upload = files.get("file")
        if upload is None:
            raw = form.get("source")
            try:
                source = json.loads(raw) if raw else None
            except ValueError as exc:
                raise ApiError("invalid_request", f"source is not valid JSON: {exc}") from exc
            body = _validated({"collection": form.get("collection") or None, "source": source})
            return _create_from_json(body, metadata=_metadata_part(form, files))
        collection = require_collection(form.get("collection") or "default")
        side = files.get("metadata")
        text = form.get("metadata")
        with session_scope() as session:
            job = create_archive_job(
                job_id, upload.stream, session=session, storage_dir=config["STORAGE_DIR"],
                collection=collection, filename=upload.filename,
                metadata=side.stream if side is not None else (text.encode() if text else None),
                metadata_name=side.filename if side is not None else None)
            session.commit()
            committed = True
            out = {"id": str(job.id), "status": job.status, "total": job.total}
    finally:
        if not committed:
            shutil.rmtree(folder, ignore_errors=True)
    sweeper.enqueue_expansion(job_id)
    return out, 202


def _create_from_json(body: JobCreate, *,
                      metadata: tuple[bytes, str | None] | None) -> tuple[dict[str, Any], int]:
    """A server directory or a manifest, expanded in the request (one stat per file)."""
    config = current_app.config
    max_meta = int(config["MAX_METADATA_BYTES"])
    roots = list(config.get("INGEST_ROOTS") or [])
    collection = require_collection(body.collection or "default")
    with session_scope() as session:
        if body.source is not None and body.items is None:
            job = jobs.create_path_job(
                body.source.path, session=session, roots=roots, collection=collection,
                metadata=metadata, max_entries=int(config["ARCHIVE_MAX_ENTRIES"]),
                max_metadata_bytes=max_meta)
        elif body.items is not None and body.source is None:
            job = jobs.create_manifest_job(
                [(i.path, i.metadata) for i in body.items], session=session, roots=roots,
                collection=collection, max_entries=_manifest_max_items(),
                max_metadata_bytes=max_meta)
        else:
            raise ApiError("invalid_request", "give an archive as multipart field 'file', "
                           "or exactly one of 'source' and 'items'")
        session.commit()
        pending = progress.item_counts([job.id], session=session)[job.id]["pending"]
        out = {"id": str(job.id), "status": job.status, "total": job.total}
    if pending:
        sweeper.enqueue_batches(out["id"], sweeper.batches_for(
            pending, batch_size=int(config["JOB_BATCH_SIZE"]),
            parallelism=int(config["JOB_PARALLELISM"])))
    return out, 202


@bp.post("")
# Documented, not validated by spectree: it would read a multipart archive whole, and a large
# manifest's errors would all be echoed; the view streams the one and bounds the other.
@spec.validate(json=JobCreate, form=JobForm, skip_validation=True,
               resp=Resp(HTTP_202=JobCreated, HTTP_400=ErrorResponse, HTTP_413=ErrorResponse),
               tags=TAGS)
def create_job() -> tuple[dict[str, Any], int]:
    """Start a bulk ingestion job from an archive, a server directory or a manifest (202).

    Multipart: `file` (.zip/.tar/.tar.gz), optional `metadata` (metadata.csv or .jsonl with a
    `file` column) and `collection`: the upload is saved and the job answered `expanding` at
    once; a worker extracts it (poll the job: a bad archive ends it `failed` with `error`).
    JSON: `{"source": {"path": ...}}` or `{"items": [{"path": ..., "metadata": {...}}]}` plus
    `collection`; server paths must lie under INGEST_ROOTS; a manifest lists at most
    MANIFEST_MAX_ITEMS files in at most MANIFEST_MAX_BYTES.
    """
    if request.mimetype == "multipart/form-data":
        return _create_from_form()
    return _create_from_json(_json_body(), metadata=None)


@bp.get("")
@spec.validate(query=JobListQuery, resp=Resp(HTTP_200=JobList, HTTP_400=ErrorResponse),
               tags=TAGS)
def list_jobs() -> dict[str, Any]:
    """Jobs newest first, with a cursor for the next page."""
    q: JobListQuery = request.context.query  # type: ignore[attr-defined]
    with session_scope() as session:
        rows = progress.list_jobs(session=session, status=q.status, collection=q.collection,
                              limit=q.limit + 1, cursor=decode_cursor(q.cursor))
        page, next_cursor = keyset_page(rows, q.limit, lambda p: (p.job.created_at, p.job.id))
        return {"items": [job_json(p) for p in page], "next_cursor": next_cursor}


@bp.get("/<job_id>")
@spec.validate(resp=Resp(HTTP_200=JobOut, HTTP_404=ErrorResponse), tags=TAGS)
def get_job(job_id: str) -> dict[str, Any]:
    """A job's status, counts, rate, ETA and first errors."""
    with session_scope() as session:
        return job_json(progress.job_progress(job_id, session=session))


@bp.get("/<job_id>/items")
@spec.validate(query=JobItemsQuery, resp=Resp(HTTP_200=JobItemList, HTTP_400=ErrorResponse,
                                              HTTP_404=ErrorResponse), tags=TAGS)
def list_items(job_id: str) -> dict[str, Any]:
    """Every item of a job in submission order, optionally only those with one status."""
    q: JobItemsQuery = request.context.query  # type: ignore[attr-defined]
    try:
        after = int(q.cursor) if q.cursor else None
    except ValueError as exc:
        raise ApiError("invalid_cursor", "cursor is not one this API returned") from exc
    with session_scope() as session:
        rows = progress.list_items(job_id, session=session, status=q.status, limit=q.limit + 1,
                               after=after)
        page = rows[: q.limit]
        next_cursor = str(page[-1].id) if len(rows) > q.limit else None
        return {"items": [item_json(i) for i in page], "next_cursor": next_cursor}


@bp.post("/<job_id>/cancel")
@spec.validate(resp=Resp(HTTP_200=JobOut, HTTP_404=ErrorResponse), tags=TAGS)
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancel a job: no further items are processed; finished ones stay."""
    with session_scope() as session:
        job = states.cancel_job(job_id, session=session,
                              storage_dir=current_app.config["STORAGE_DIR"])
        return job_json(progress.job_progress(job.id, session=session))
