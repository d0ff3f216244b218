"""What an image's caller may send: a collection name, a metadata object, a file name."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from service.errors import ApiError

MAX_COLLECTION_LENGTH = 128
# Deeper metadata is refused (filters may only reach depth 8 anyway).
MAX_METADATA_DEPTH = 32
MAX_TAGS = 100
MAX_TAG_CHARS = 100


def validate_collection(name: str) -> str:
    """A collection name: 1-128 printable characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_COLLECTION_LENGTH:
        raise ApiError("invalid_collection", "collection must be 1 to 128 characters")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ApiError("invalid_collection", "collection must not contain control characters")
    return name


def _depth(value: Any) -> int:
    """How deeply containers nest (iteratively: hostile input must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_METADATA_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict)
                                                      else item))
    return deepest


def validate_metadata(meta: Any, *, max_bytes: int) -> dict[str, Any]:
    """Metadata must be a JSON object that PostgreSQL can store as jsonb."""
    if not isinstance(meta, dict):
        raise ApiError("invalid_metadata", "metadata must be a JSON object")
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise ApiError("invalid_metadata",
                       f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
    try:
        text = json.dumps(meta, allow_nan=False)
        # Lone surrogates ("\ud800") parse as JSON but no database text can hold them.
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ApiError("invalid_metadata", f"metadata is not valid JSON: {exc}") from exc
    if len(text.encode()) > max_bytes:
        raise ApiError("invalid_metadata", f"metadata is larger than {max_bytes} bytes")
    if "\\u0000" in text:
        raise ApiError("invalid_metadata", "metadata must not contain NUL characters")
    tags = meta.get("tags")
    # User tags are full-text searched (weight A); keep them a list of words.
    if tags is not None and (not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(
            isinstance(t, str) and 0 < len(t) <= MAX_TAG_CHARS for t in tags)):
        raise ApiError("invalid_metadata", f"metadata.tags must be a list of at most {MAX_TAGS} "
                       f"strings of 1 to {MAX_TAG_CHARS} characters")
    return meta


def clean_filename(name: str | None) -> str | None:
    """Keep only the last path component, without control characters."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Control and format characters: C0/C1 controls, and invisible ones such as U+202E that
    # reverse how the rest of a name is shown ("photo\u202egpj.exe").
    base = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf"))[:255]
    return base or None
