"""Content-addressed stores of originals and thumbnails: one interface, local disk or S3.

Keys are sha256 hex digests (anything else is refused before a path or key is built), so an
object never changes once written and writes need no coordination beyond the content lock
(`images/service.py`). Which backend a process uses comes from STORAGE_URL (`open_store`).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEX2 = re.compile(r"^[0-9a-f]{2}$")

MISSING_ORIGINAL = "the original file is missing from the store"


class ContentMissing(FileNotFoundError):
    """The store is reachable but holds no bytes for this digest: they are gone for good."""

    reason = MISSING_ORIGINAL


class ContentTooLarge(ContentMissing):
    """An object under an original's key is larger than any upload: it is not the original."""

    def __init__(self, sha256: str, size: int, limit: int) -> None:
        super().__init__(f"the stored object {sha256} has {size} bytes, over "
                         f"STORAGE_MAX_OBJECT_BYTES ({limit})")
        self.reason = (f"the stored original has {size} bytes, more than "
                       f"STORAGE_MAX_OBJECT_BYTES ({limit})")


class StorageUnavailable(ConnectionError):
    """The store could not be reached or refused the request: retry later (503, task retry)."""


class ReadableStream(Protocol):
    """What a reader of stored bytes uses: a file opened for reading, or a GET's body."""

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes; all that is left when negative."""
        ...

    def close(self) -> None:
        """Release the file or connection."""
        ...


class OpenedContent(NamedTuple):
    """A stored object opened for streaming (the caller closes it), with its length."""

    stream: ReadableStream
    size: int


class ContentStore(Protocol):
    """What the service needs of a store of originals (and their derived thumbnails)."""

    def put(self, sha256: str, data: bytes) -> bool:
        """Store bytes under their digest, atomically; False if they were already there."""
        ...

    def get(self, sha256: str) -> bytes:
        """The stored bytes; `ContentMissing` when gone, `StorageUnavailable` on an outage."""
        ...

    def open(self, sha256: str) -> OpenedContent:
        """The stored bytes as a stream (the caller closes it); errors as for `get`."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether bytes are stored under the digest."""
        ...

    def size(self, sha256: str) -> int:
        """The stored object's length; `ContentMissing` when gone."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the bytes and the derived thumbnail, if present."""
        ...

    def digests(self) -> Iterator[str]:
        """Every digest that has stored bytes (thumbnails excluded), in no particular order."""
        ...

    def get_thumbnail(self, sha256: str) -> bytes | None:
        """The cached thumbnail, or None."""
        ...

    def put_thumbnail(self, sha256: str, data: bytes) -> None:
        """Cache a thumbnail atomically."""
        ...


def check_digest(sha256: str) -> str:
    """The digest itself; refuses anything but 64 lowercase hex characters."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}"[:200])
    return sha256


def original_key(sha256: str) -> str:
    """`ab/cd/<sha256>`: the same relative layout on disk and in a bucket."""
    check_digest(sha256)
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


def thumbnail_key(sha256: str) -> str:
    """`thumbnails/ab/<sha256>.jpg`."""
    check_digest(sha256)
    return f"thumbnails/{sha256[:2]}/{sha256}.jpg"


def digest_of_key(relative: str) -> str | None:
    """The digest an original's relative key names, or None for anything else."""
    parts = relative.split("/")
    if (len(parts) == 3 and _HEX2.match(parts[0]) and _HEX2.match(parts[1])
            and _SHA256.match(parts[2]) and parts[2][:2] == parts[0]
            and parts[2][2:4] == parts[1]):
        return parts[2]
    return None


class LocalContentStore:
    """Files under `root/ab/cd/<sha256>`, written through a temporary file and a rename."""

    def __init__(self, root: str | Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        """Where the bytes of `sha256` live; refuses anything but a hex digest."""
        return self.root / original_key(sha256)

    def thumbnail_path(self, sha256: str) -> Path:
        """Where the cached thumbnail of `sha256` lives."""
        return self.root / thumbnail_key(sha256)

    def exists(self, sha256: str) -> bool:
        """Whether the bytes are stored."""
        return self.path(sha256).exists()

    def put(self, sha256: str, data: bytes) -> bool:
        """Store bytes under their digest; returns False if they were already there."""
        target = self.path(sha256)
        if target.exists():
            return False
        _write_atomically(target, data, durable=True)
        return True

    def _missing(self, sha256: str) -> OSError:
        # An unmounted or vanished root is an outage to retry, not lost content.
        if not self.root.is_dir():
            return StorageUnavailable(f"the storage directory {self.root} is not there")
        return ContentMissing(f"no stored bytes for {sha256}")

    def open(self, sha256: str) -> OpenedContent:
        """The stored file, open for reading."""
        try:
            stream = self.path(sha256).open("rb")
        except FileNotFoundError:
            raise self._missing(sha256) from None
        return OpenedContent(stream, os.fstat(stream.fileno()).st_size)

    def get(self, sha256: str) -> bytes:
        """The stored bytes; `ContentMissing` only when the store itself is reachable."""
        stream, size = self.open(sha256)
        with closing(stream):
            if size > self.max_bytes:
                raise ContentTooLarge(sha256, size, self.max_bytes)
            return stream.read(self.max_bytes + 1)

    def size(self, sha256: str) -> int:
        """The stored file's length."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise self._missing(sha256) from None

    def delete(self, sha256: str) -> None:
        """Remove the bytes (and the derived thumbnail) if present."""
        self.path(sha256).unlink(missing_ok=True)
        self.thumbnail_path(sha256).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        """Digests of the files in the fan-out folders (temporary files and job folders skipped)."""
        for first in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for path in sorted(first.glob("[0-9a-f][0-9a-f]/*")):
                digest = digest_of_key(path.relative_to(self.root).as_posix())
                if digest is not None:
                    yield digest

    def get_thumbnail(self, sha256: str) -> bytes | None:
        """The cached thumbnail, or None."""
        try:
            return self.thumbnail_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def put_thumbnail(self, sha256: str, data: bytes) -> None:
        """Cache a thumbnail atomically (not fsynced: it can be made again)."""
        _write_atomically(self.thumbnail_path(sha256), data, durable=False)


def _write_atomically(target: Path, data: bytes, *, durable: bool) -> None:
    """Write through a temporary file in the target's folder and rename it into place."""
    try:  # The fan-out folders exist after the first few hundred files: skip mkdir.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_store(config: Mapping[str, Any]) -> ContentStore:
    """The store STORAGE_URL names: empty or file:// is STORAGE_DIR, s3:// a bucket."""
    url = str(config.get("STORAGE_URL") or "").strip()
    max_bytes = int(config.get("STORAGE_MAX_OBJECT_BYTES") or 256 * 1024 * 1024)
    parts = urlsplit(url)
    if url in ("", "file://"):
        return LocalContentStore(config["STORAGE_DIR"], max_bytes=max_bytes)
    if parts.scheme == "file" and not parts.netloc:
        return LocalContentStore(parts.path, max_bytes=max_bytes)
    if parts.scheme == "s3" and parts.netloc:
        from service.images.s3 import S3ContentStore

        return S3ContentStore(parts.netloc, parts.path, max_bytes=max_bytes,
                              endpoint_url=str(config.get("STORAGE_S3_ENDPOINT_URL") or ""))
    raise ValueError(f"unsupported STORAGE_URL {url!r}"[:300])
