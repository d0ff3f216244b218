"""Errors that the API turns into `{"error": {"code", "message"}}` responses."""

from __future__ import annotations


class ApiError(Exception):
    """A client-visible error with an HTTP status and a stable code."""

    status = 400

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status


class NotFound(ApiError):
    """The resource does not exist (or is not visible to the caller)."""

    status = 404


class Conflict(ApiError):
    """The request conflicts with the current state."""

    status = 409
