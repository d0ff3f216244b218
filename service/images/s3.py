"""The S3 backend of the content store: one object per original, keyed by its digest.

A PUT is atomic (an object appears whole or not at all), so no temporary objects exist.
Credentials and region come from the standard AWS chain (environment, shared files, instance
role); only the endpoint of another provider (MinIO, moto) is a setting of ours.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.images.storage import (
    ContentMissing,
    ContentTooLarge,
    OpenedContent,
    StorageUnavailable,
    digest_of_key,
    original_key,
    thumbnail_key,
)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# Enough connections for gunicorn's threads and the batch writer threads of one process.
_POOL = 16


class S3ContentStore:
    """Originals at `prefix/ab/cd/<sha256>`, thumbnails at `prefix/thumbnails/ab/<sha256>.jpg`."""

    def __init__(self, bucket: str, prefix: str = "", *, max_bytes: int = 256 * 1024 * 1024,
                 endpoint_url: str = "") -> None:
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        if any(p in (".", "..") for p in self.prefix.split("/")):
            raise ValueError("the S3 prefix must not hold '.' or '..' segments")
        self.max_bytes = max_bytes
        self.endpoint_url = endpoint_url or None
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """This process's client: made on first use, again after a fork (prefork workers)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = self._make_client()
                    self._pid = os.getpid()
        return self._client

    def _make_client(self) -> Any:
        options: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 60,
                                   "retries": {"mode": "standard", "max_attempts": 4},
                                   "max_pool_connections": _POOL}
        if self.endpoint_url:
            # MinIO and moto serve buckets under the path, not as host names.
            options["s3"] = {"addressing_style": "path"}
        # A session of its own: boto3's default session is not safe to share across threads.
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                              config=Config(**options))

    def key(self, sha256: str) -> str:
        """The object key of an original."""
        return self._full(original_key(sha256))

    def thumbnail_key(self, sha256: str) -> str:
        """The object key of a cached thumbnail."""
        return self._full(thumbnail_key(sha256))

    def _full(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One request; a missing key is ContentMissing, anything else an outage."""
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise ContentMissing(f"no object {kwargs.get('Key')}") from None
            # NoSuchBucket, AccessDenied, SlowDown…: the store, not this content.
            raise StorageUnavailable(f"S3 {method} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {method} failed: {exc}") from exc

    def exists(self, sha256: str) -> bool:
        """Whether the object is there (one HEAD)."""
        try:
            self._call("head_object", Key=self.key(sha256))
        except ContentMissing:
            return False
        return True

    def size(self, sha256: str) -> int:
        """The object's length (one HEAD)."""
        return int(self._call("head_object", Key=self.key(sha256))["ContentLength"])

    def put(self, sha256: str, data: bytes) -> bool:
        """PUT the bytes unless the object exists; False if it did."""
        if self.exists(sha256):
            return False
        self._call("put_object", Key=self.key(sha256), Body=data,
                   ContentType="application/octet-stream")
        return True

    def open(self, sha256: str) -> OpenedContent:
        """The object's body as a stream, with its length."""
        return self._open_key(self.key(sha256))

    def get(self, sha256: str) -> bytes:
        """The object's bytes, refused over `max_bytes` before any is read."""
        stream, size = self.open(sha256)
        with closing(stream):
            if size > self.max_bytes:
                raise ContentTooLarge(sha256, size, self.max_bytes)
            return stream.read(self.max_bytes + 1)

    def delete(self, sha256: str) -> None:
        """Remove the original and its thumbnail (a missing object is no error in S3)."""
        self._call("delete_object", Key=self.key(sha256))
        self._call("delete_object", Key=self.thumbnail_key(sha256))

    def digests(self) -> Iterator[str]:
        """Digests of the originals under the prefix, listed a page at a time."""
        start = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=start):
                for entry in page.get("Contents", []):
                    digest = digest_of_key(entry["Key"][len(start):])
                    if digest is not None:
                        yield digest
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"S3 listing failed: {exc}") from exc

    def get_thumbnail(self, sha256: str) -> bytes | None:
        """The cached thumbnail, or None (one GET)."""
        try:
            stream, size = self._open_key(self.thumbnail_key(sha256))
        except ContentMissing:
            return None
        with closing(stream):
            if size > self.max_bytes:
                return None  # not a thumbnail of ours: it is made again
            return stream.read(self.max_bytes + 1)

    def _open_key(self, key: str) -> OpenedContent:
        got = self._call("get_object", Key=key)
        return OpenedContent(_Body(got["Body"]), int(got["ContentLength"]))

    def put_thumbnail(self, sha256: str, data: bytes) -> None:
        """PUT the thumbnail (overwrites are harmless: it is derived)."""
        self._call("put_object", Key=self.thumbnail_key(sha256), Body=data,
                   ContentType="image/jpeg")


class _Body:
    """A GET's streaming body as a readable stream whose connection errors are outages."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all when negative)."""
        try:
            return self._body.read(None if size < 0 else size)
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"S3 read failed: {exc}") from exc

    def close(self) -> None:
        """Release the connection."""
        self._body.close()
