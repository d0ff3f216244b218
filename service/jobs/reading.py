"""Reading a batch's claimed items: their files within the limits, and the vectors of those
that decode (one model run for the batch, however many files are bad)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.embedding.session import Embedder, Embeddings
from service.embedding.transforms import batch, preprocess
from service.images.decode import ImageDecodeError, image_header
from service.jobs.paths import readable_source


@dataclass
class BatchSettings:
    """What a batch needs from the configuration."""

    storage_dir: str
    roots: list[str]
    batch_size: int
    max_pixels: int
    max_bytes: int
    max_attempts: int = 3


@dataclass(frozen=True)
class ClaimedItem:
    """A claimed item's fields, copied out so that later rollbacks cause no lazy reloads."""

    id: int
    name: str
    source: str | None
    meta: dict[str, Any]


def read_item(item: ClaimedItem, settings: BatchSettings) -> bytes:
    """The item's bytes: a regular file, not through a final symlink, within the size limit."""
    if not item.source:
        raise FileNotFoundError("the item has no file")
    path = readable_source(item.source, storage_dir=settings.storage_dir, roots=settings.roots)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > settings.max_bytes:
            raise ValueError(f"the file is larger than the limit of {settings.max_bytes} bytes")
        return fh.read(settings.max_bytes + 1)


def read_reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file no longer exists"
    if isinstance(exc, PermissionError):
        return f"the file may not be read: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the file could not be read: {exc.strerror}"
    return str(exc)


def embed_valid(embedder: Embedder, datas: list[bytes], *,
                max_pixels: int) -> tuple[Embeddings, dict[int, str]]:
    """Vectors (and logits) of the decodable files, in order, and why the others failed.

    One `embed_bytes` call in the common case; a bad file makes it decode each file alone to
    find the culprits, then runs the model once over the rest.
    """
    if not datas:
        return Embeddings(np.zeros((0, embedder.info.dim), np.float32), None), {}
    try:
        return embedder.embed_bytes(datas, max_pixels=max_pixels), {}
    except Exception:  # noqa: BLE001 (any decoder failure: find which file it was below)
        pass
    arrays, errors = [], {}
    for i, data in enumerate(datas):
        try:
            arrays.append(preprocess(data, embedder.info.preprocessing, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            errors[i] = exc.message
        except Exception as exc:  # noqa: BLE001 (Pillow raises many types on hostile input)
            errors[i] = f"the image could not be decoded: {exc}"
    if not arrays:
        return Embeddings(np.zeros((0, embedder.info.dim), np.float32), None), errors
    return embedder.run(batch(arrays)), errors


def header(data: bytes) -> tuple[str, int, int]:
    """Format and size after EXIF orientation (the pixels were decoded by the embedder)."""
    return image_header(data)
