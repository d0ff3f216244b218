"""The layout of a backup folder: the dump, the objects, their manifest and the summary.

```
DIR/database.dump       pg_dump -Fc of the database
DIR/objects/ab/cd/<sha> originals, the store's own layout
DIR/objects/thumbnails/ab/<sha>.jpg
DIR/manifest.jsonl      one object a line: kind, key, sha256 of its bytes, size
DIR/backup.json         written last: a folder without it is an unfinished backup
```
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.images.storage import ReadableStream, original_key, thumbnail_key

FORMAT = 1
DUMP = "database.dump"
MANIFEST = "manifest.jsonl"
SUMMARY = "backup.json"
OBJECTS = "objects"
ORIGINAL, THUMBNAIL = "original", "thumbnail"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ManifestEntry:
    """One stored object: an original (key from its digest) or the thumbnail of `digest`."""

    kind: str
    digest: str
    sha256: str
    size: int

    @property
    def key(self) -> str:
        """The object's path relative to the store's root (and to DIR/objects)."""
        return original_key(self.digest) if self.kind == ORIGINAL else thumbnail_key(self.digest)

    def to_json(self) -> str:
        """The manifest line (key included for people reading it)."""
        return json.dumps({**asdict(self), "key": self.key}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ManifestEntry:
        """Parse a manifest line; refuses unknown kinds and bad digests (they build paths)."""
        raw = json.loads(line)
        entry = cls(kind=str(raw["kind"]), digest=str(raw["digest"]), sha256=str(raw["sha256"]),
                    size=int(raw["size"]))
        if entry.kind not in (ORIGINAL, THUMBNAIL):
            raise ValueError(f"unknown object kind {entry.kind!r} in the manifest"[:200])
        _ = entry.key  # refuses a digest that is not 64 hex characters
        return entry


def write_manifest(path: Path, entries: Iterable[ManifestEntry]) -> int:
    """Write the manifest (fsynced); returns the number of lines."""
    count = 0
    with path.open("w") as fh:
        for entry in entries:
            fh.write(entry.to_json() + "\n")
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    return count


def read_manifest(path: Path) -> Iterator[ManifestEntry]:
    """The manifest's entries in order."""
    with path.open() as fh:
        for line in fh:
            if line.strip():
                yield ManifestEntry.from_json(line)


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write a JSON file atomically and durably."""
    copy_stream(io.BytesIO(json.dumps(value, indent=2, sort_keys=True).encode()), path)


def copy_stream(stream: ReadableStream, target: Path) -> tuple[str, int]:
    """Copy a stream into `target` through a temporary file; (sha256, size) of what was read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as fh:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def hash_stream(stream: ReadableStream) -> tuple[str, int]:
    """(sha256, size) of everything left in a stream."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file."""
    with path.open("rb") as fh:
        return hash_stream(fh)

