"""Keyset paging shared by the listing routes: (created_at, id) cursors, newest first."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from flask import current_app

from service.db import session_scope
from service.errors import ApiError
from service.signing import signing_key

T = TypeVar("T")
MAC_BYTES = 12
INVALID = "cursor is not one this API returned"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key() -> bytes:
    """The signing key, read once per process."""
    key = current_app.extensions.get("cursor_key")
    if key is None:
        with session_scope() as session:
            key = signing_key(session=session, configured=current_app.config.get("SECRET_KEY"))
        current_app.extensions["cursor_key"] = key
    return key


def _mac(token: str) -> str:
    return _b64(hmac.new(_key(), token.encode(), hashlib.sha256).digest()[:MAC_BYTES])


def seal(token: str | None) -> str | None:
    """A cursor signed with the server's key, so a client cannot forge or alter one."""
    return None if token is None else f"{token}.{_mac(token)}"


def unseal(cursor: str | None) -> str | None:
    """The token inside a cursor this API signed (None for the first page), or 400."""
    if not cursor:
        return None
    token, _, mac = cursor.rpartition(".")
    if not token or not hmac.compare_digest(mac.encode(), _mac(token).encode()):
        raise ApiError("invalid_cursor", INVALID)
    return token


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque, signed keyset cursor."""
    return seal(_b64(f"{created_at.isoformat()}|{row_id}".encode()))  # type: ignore[return-value]


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """Back from the opaque cursor (None for the first page), or 400."""
    token = unseal(cursor)
    if token is None:
        return None
    try:
        created, row_id = _unb64(token).decode().split("|", 1)
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_cursor", INVALID) from exc


def keyset_page(rows: Sequence[T], limit: int,
                key: Callable[[T], tuple[datetime, uuid.UUID]]) -> tuple[Sequence[T], str | None]:
    """Split `limit + 1` fetched rows into the page and the cursor of the next one."""
    page = rows[:limit]
    return page, (encode_cursor(*key(page[-1])) if len(rows) > limit else None)
