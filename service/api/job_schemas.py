"""Request and response models of the jobs API (bulk ingestion)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    items: list[ManifestItem] | None = Field(default=None, max_length=1_000_000)


class JobCreated(BaseModel):
    """The accepted job."""

    id: str
    status: str
    total: int


class JobError(BaseModel):
    """A failed item, as the job shows its first ones."""

    item: int
    name: str
    error: str | None = None


class JobOut(BaseModel):
    """A job's state, counts, rate and ETA."""

    id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
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
    errors: list[JobError] = Field(default_factory=list)


class JobList(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = None


class JobListQuery(BaseModel):
    """Job listing parameters."""

    model_config = ConfigDict(extra="forbid")

    status: str | None = Field(default=None,
                               pattern="^(queued|running|done|failed|cancelled)$")
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
