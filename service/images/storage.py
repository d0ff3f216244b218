"""Content-addressed file store: originals live under their sha256, written atomically."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


MISSING_ORIGINAL = "the original file is missing from the store"


class ContentMissing(FileNotFoundError):
    """The store is reachable but holds no bytes for this digest: they are gone for good."""


class ContentStore:
    """Files named by the sha256 of their bytes, under `root/ab/cd/<sha256>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where the bytes of `sha256` live; refuses anything but a hex digest."""
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the bytes are stored."""
        return self.path(sha256).exists()

    def put(self, sha256: str, data: bytes) -> bool:
        """Store bytes under their digest; returns False if they were already there."""
        target = self.path(sha256)
        if target.exists():
            return False
        try:  # The fan-out folders exist after the first few hundred files: skip mkdir.
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def get(self, sha256: str) -> bytes:
        """The stored bytes; `ContentMissing` only when the store itself is reachable."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            # An unmounted or vanished root is an outage to retry, not lost content.
            if not self.root.is_dir():
                raise
            raise ContentMissing(f"no stored bytes for {sha256}") from None

    def delete(self, sha256: str) -> None:
        """Remove the bytes (and the derived thumbnail) if present."""
        self.path(sha256).unlink(missing_ok=True)
        self.thumbnail_path(sha256).unlink(missing_ok=True)

    def thumbnail_path(self, sha256: str) -> Path:
        """Where the cached thumbnail of `sha256` lives."""
        return self.root / "thumbnails" / sha256[:2] / f"{self.path(sha256).name}.jpg"

    def put_thumbnail(self, sha256: str, data: bytes) -> None:
        """Cache a thumbnail atomically."""
        target = self.thumbnail_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
