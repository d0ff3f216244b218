"""Where job files live, and which server paths a job may read."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from service.errors import ApiError


def job_dir(storage_dir: str | Path, job_id: uuid.UUID) -> Path:
    """The folder of one job's extracted files."""
    return Path(storage_dir) / "jobs" / str(job_id)


def remove_job_dir(storage_dir: str | Path, job_id: uuid.UUID) -> None:
    """Delete a job's extracted files (their bytes are in the content store by then)."""
    shutil.rmtree(job_dir(storage_dir, job_id), ignore_errors=True)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_under_roots(raw: str, roots: Iterable[str]) -> Path:
    """The real path of `raw` if it lies under one of the roots (after symlinks), else 400."""
    roots = [Path(os.path.realpath(r)) for r in roots if r]
    if not roots:
        raise ApiError("path_not_allowed", "server paths are disabled (INGEST_ROOTS is empty)")
    if not isinstance(raw, str) or not raw or "\x00" in raw or not os.path.isabs(raw):
        raise ApiError("path_not_allowed", "a server path must be absolute")
    real = Path(os.path.realpath(raw))
    if not any(_under(real, root) for root in roots):
        raise ApiError("path_not_allowed", f"{raw} is outside the configured INGEST_ROOTS")
    return real


def readable_source(source: str, *, storage_dir: str | Path, roots: Iterable[str]) -> Path:
    """Re-check at read time that an item's file is still where jobs may read (symlink swaps)."""
    real = Path(os.path.realpath(source))
    allowed = [Path(os.path.realpath(Path(storage_dir) / "jobs"))]
    allowed += [Path(os.path.realpath(r)) for r in roots if r]
    if not any(_under(real, root) for root in allowed):
        raise PermissionError("the file is outside the storage directory and INGEST_ROOTS")
    return real
