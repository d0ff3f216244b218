"""Request and response models of the jobs API (bulk ingestion)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from spectree.model_adapter.pydantic_adapter import BaseFile


class JobSource(BaseModel):
    """A directory on the server, under one of the configured INGEST_ROOTS."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)


class ManifestItem(BaseModel):
    """One server file (under INGEST_ROOTS) and its metadata."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobCreate(BaseModel):
    """A JSON job: a server directory (`source`) or a manifest (`items`), not both.

    Archives are uploaded as multipart instead: `file` (.zip, .tar, .tar.gz), optional
    `metadata` (CSV or JSON Lines with a `file` column), optional `collection`; a multipart
    `source` field may carry this object's `source` with an uploaded `metadata` file.
    """

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(default=None, max_length=128)
    source: JobSource | None = None
    items: list[ManifestItem] | None = Field(
        default=None, max_length=1_000_000,
        description="at most MANIFEST_MAX_ITEMS (100,000) files, the body at most "
                    "MANIFEST_MAX_BYTES (64 MiB)")


class JobForm(BaseModel):
    """A multipart job: an archive in `file`, or a server `source` with an uploaded metadata."""

    model_config = ConfigDict(extra="forbid")

    file: BaseFile | None = Field(default=None, description="a .zip, .tar or .tar.gz archive")
    metadata: BaseFile | None = Field(
        default=None, description="metadata.csv or .jsonl with a `file` column (a text field "
                                  "with the same content is read too)")
    collection: str | None = Field(default=None, max_length=128)
    source: str | None = Field(default=None, description="without `file`: JobCreate's "
                                                         "`source` as a JSON object")


class JobCreated(BaseModel):
    """The accepted job: an archive is `expanding` (total 0 until a worker has extracted it)."""

    id: str
    status: str = Field(description="expanding (archives), queued, or already failed/done")
    total: int


class JobFailure(BaseModel):
    """Why a job failed as a whole (a damaged or refused archive), not item by item."""

    code: str = Field(description="e.g. not_an_archive, corrupt_archive, zip_bomb, "
                                  "archive_too_large, invalid_metadata, expansion_abandoned")
    message: str


class JobError(BaseModel):
    """A failed item, as the job shows its first ones."""

    item: int
    name: str
    error: str | None = None


class JobOut(BaseModel):
    """A job's state, counts, rate and ETA."""

    id: str
    status: str = Field(description="expanding (an archive a worker is extracting), queued, "
                                    "running, done, failed or cancelled")
    collection: str
    kind: str = Field(description="archive, path or manifest")
    source: str | None = None
    total: int
    done: int = Field(description="items stored as new images, now searchable")
    failed: int
    duplicates: int = Field(description="items whose bytes the collection already held")
    cancelled: int
    pending: int
    running: int
    rate: float | None = Field(default=None, description="items per second since the start")
    eta_s: float | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobFailure | None = Field(default=None, description="why the whole job failed")
    errors: list[JobError] = Field(default_factory=list,
                                   description="the first 10 failed items")


class JobList(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = None


class JobListQuery(BaseModel):
    """Job listing parameters."""

    model_config = ConfigDict(extra="forbid")

    status: str | None = Field(default=None,
                               pattern="^(expanding|queued|running|done|failed|cancelled)$")
    collection: str | None = Field(default=None, max_length=128)
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(default=None, max_length=200)


class JobItemOut(BaseModel):
    """One item of a job."""

    id: int
    name: str
    status: str = Field(description="pending, running, done, failed, duplicate or cancelled")
    error: str | None = None
    image_id: str | None = None
    attempts: int
    metadata: dict[str, Any]
    updated_at: datetime


class JobItemList(BaseModel):
    """A page of a job's items, in submission order."""

    items: list[JobItemOut]
    next_cursor: str | None = None


class JobItemsQuery(BaseModel):
    """Item listing parameters."""

    model_config = ConfigDict(extra="forbid")

    status: str | None = Field(
        default=None, pattern="^(pending|running|done|failed|duplicate|cancelled)$")
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=40)
