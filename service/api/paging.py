"""Keyset paging shared by the listing routes: (created_at, id) cursors, newest first."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from service.errors import ApiError

T = TypeVar("T")


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque keyset cursor."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """Back from the opaque cursor (None for the first page), or 400."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, row_id = raw.split("|", 1)
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_cursor", "cursor is not one this API returned") from exc


def keyset_page(rows: Sequence[T], limit: int,
                key: Callable[[T], tuple[datetime, uuid.UUID]]) -> tuple[Sequence[T], str | None]:
    """Split `limit + 1` fetched rows into the page and the cursor of the next one."""
    page = rows[:limit]
    return page, (encode_cursor(*key(page[-1])) if len(rows) > limit else None)
