"""Errors that the API turns into `{"error": {"code", "message"}}` responses."""

from __future__ import annotations

import uuid


class ApiError(Exception):
    """A client-visible error with an HTTP status and a stable code."""

    status = 400
    # Extra response headers (e.g. WWW-Authenticate, Retry-After).
    headers: dict[str, str] | None = None

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status


class NotFound(ApiError):
    """The resource does not exist (or is not visible to the caller)."""

    status = 404


def parse_uuid(value: str | uuid.UUID, *, what: str) -> uuid.UUID:
    """A UUID from a path segment, or 404: a malformed id names nothing."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        shown = str(value) if len(str(value)) <= 64 else f"{str(value)[:64]}…"
        raise NotFound("not_found", f"no {what} {shown!r}") from exc


class Unauthorized(ApiError):
    """No credentials, or credentials that name no usable API key."""

    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="lookalike"'}


class Forbidden(ApiError):
    """The API key is valid but its scope does not allow this request."""

    status = 403


class Conflict(ApiError):
    """The request conflicts with the current state."""

    status = 409
