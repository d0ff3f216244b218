"""`restore`: a backup folder into an empty installation, every byte checked first.

Order: refuse a target that holds images or objects; verify the dump's and every object's
sha256 and size against the summary and the manifest (a mismatch refuses the restore, with
the names of the bad objects, before anything is written); `pg_restore` in one transaction
(a failure leaves the database as it was); then copy the objects, each hashed again as it
is read, so bytes changed in the folder meanwhile are never stored under a digest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.pool import NullPool

from service.backup.manifest import (
    DUMP,
    FORMAT,
    MANIFEST,
    OBJECTS,
    ORIGINAL,
    SUMMARY,
    ManifestEntry,
    hash_file,
    read_manifest,
)
from service.backup.service import COPY_THREADS, BackupError, libpq_target, pg_binary, run_tool
from service.db import make_engine
from service.images.storage import ContentStore

SHOWN = 50


class RestoreRefused(BackupError):
    """The target installation is not empty, or the folder holds no finished backup."""


class RestoreFailed(BackupError):
    """Objects of the backup do not match its manifest: `bad` names them."""

    def __init__(self, message: str, bad: list[str]) -> None:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        super().__init__(f"{message}: {', '.join(bad[:SHOWN])}{more}")
        self.bad = bad


@dataclass
class RestoreResult:
    """What a restore put back."""

    originals: int = 0
    thumbnails: int = 0
    bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def read_summary(directory: Path) -> dict[str, Any]:
    """The backup's summary; refuses a folder without one (an unfinished or foreign folder)."""
    path = directory / SUMMARY
    if not path.is_file():
        raise RestoreRefused(f"{directory} holds no finished backup ({SUMMARY} is missing)")
    summary: dict[str, Any] = json.loads(path.read_text())
    if summary.get("format") != FORMAT:
        raise RestoreRefused(f"{directory}: unknown backup format {summary.get('format')!r}")
    return summary


def refuse_unless_empty(*, database_url: str, store: ContentStore) -> None:
    """Refuse a target whose database has image rows or whose store has objects."""
    engine = make_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            has_table = conn.scalar(text("SELECT to_regclass('public.images') IS NOT NULL"))
            images = has_table and conn.scalar(text("SELECT count(*) FROM images"))
    finally:
        engine.dispose()
    if images:
        raise RestoreRefused(f"the target database holds {images} images: restore only into "
                             "an empty installation (a new database and an empty store)")
    for digest in store.digests():
        raise RestoreRefused(f"the target store holds objects ({digest} and maybe more): "
                             "restore only into an empty installation")


def verify_backup(directory: Path, summary: dict[str, Any]) -> list[ManifestEntry]:
    """The manifest's entries, once the dump and every object match what was recorded."""
    database = summary["database"]
    sha, size = hash_file(directory / DUMP)
    if (sha, size) != (database["sha256"], database["size"]):
        raise RestoreFailed("the backup does not match its summary", [DUMP])
    entries = list(read_manifest(directory / MANIFEST))

    def bad(entry: ManifestEntry) -> str | None:
        path = directory / OBJECTS / entry.key
        try:
            got = hash_file(path)
        except FileNotFoundError:
            return f"{entry.key} (missing)"
        return None if got == (entry.sha256, entry.size) else f"{entry.key} (sha256 mismatch)"

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        failures = [b for b in pool.map(bad, entries) if b]
    if failures:
        raise RestoreFailed("objects of the backup do not match its manifest", failures)
    return entries


def restore(directory: str | Path, *, database_url: str, store: ContentStore,
            pg_bin: str | Path | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> RestoreResult:
    """Restore a backup folder into an empty installation (see the module's docstring)."""
    source = Path(directory)
    summary = read_summary(source)
    refuse_unless_empty(database_url=database_url, store=store)
    result = RestoreResult()
    started = time.monotonic()
    entries = verify_backup(source, summary)
    result.timings["verify_s"] = round(time.monotonic() - started, 3)
    started = time.monotonic()
    uri, env = libpq_target(database_url)
    # --clean --if-exists: a target already migrated (empty tables) is replaced by the dump.
    run_tool([pg_binary("pg_restore", pg_bin), "--single-transaction", "--exit-on-error",
          "--clean", "--if-exists", "--no-owner", "--no-privileges", "--no-password",
          f"--dbname={uri}", str(source / DUMP)], env)
    result.timings["restore_db_s"] = round(time.monotonic() - started, 3)
    started = time.monotonic()

    def put(entry: ManifestEntry) -> str | None:
        data = (source / OBJECTS / entry.key).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return entry.key
        if entry.kind == ORIGINAL:
            store.put(entry.digest, data)
        else:
            store.put_thumbnail(entry.digest, data)
        return None

    changed: list[str] = []
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        for done, (entry, failed) in enumerate(zip(entries, pool.map(put, entries),
                                                   strict=True), 1):
            if failed:
                changed.append(failed)
                continue
            result.bytes += entry.size
            if entry.kind == ORIGINAL:
                result.originals += 1
            else:
                result.thumbnails += 1
            if progress:
                progress("objects", done, len(entries))
    result.timings["objects_s"] = round(time.monotonic() - started, 3)
    if changed:
        raise RestoreFailed("the database was restored, but these objects changed in the "
                            "backup folder during the restore and were not copied", changed)
    return result
