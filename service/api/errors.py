"""Every error leaves the API as `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service.errors import ApiError

log = logging.getLogger(__name__)
# Messages may quote what the client sent (an id, a value): an error never echoes more.
MAX_MESSAGE = 2000


class ApiJSONProvider(DefaultJSONProvider):
    """Flask's JSON, able to mention an uploaded file (spectree's validation errors quote the
    multipart form, file included, before our hook replaces them: without this, a form missing
    a required field was a 500)."""

    @staticmethod
    def default(o: Any) -> Any:
        """An uploaded file by name; anything else as Flask does."""
        if isinstance(o, FileStorage):
            return f"<file {o.filename!r}>"
        return DefaultJSONProvider.default(o)


def error_response(code: str, message: str, status: int) -> ResponseReturnValue:
    """The JSON error body with its status; a message quoting the request is cut short."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "…"
    return jsonify({"error": {"code": code, "message": message}}), status


def _unavailable(code: str, message: str) -> ResponseReturnValue:
    body, status = error_response(code, message, 503)  # type: ignore[misc]
    body.headers["Retry-After"] = "5"
    return body, status


def register_error_handlers(app: Flask) -> None:
    """Install handlers for domain errors, HTTP errors and anything unexpected."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        body, status = error_response(exc.code, exc.message, exc.status)  # type: ignore[misc]
        body.headers.update(exc.headers or {})
        return body, status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> ResponseReturnValue:
        limit = app.config["MAX_UPLOAD_BYTES"]
        size = request.content_length
        if size is not None and size <= limit:
            # Werkzeug raises the same error for a form of too many parts.
            parts = request.max_form_parts
            return error_response("too_many_parts",
                                  f"the form has more than {parts} parts", 413)
        return error_response("payload_too_large",
                              f"the request body is larger than {limit} bytes", 413)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        if exc.response is not None and exc.response.is_json:
            return exc.response  # already shaped (e.g. by a validation hook)
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(code, exc.description or exc.name, exc.code or 500)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database_down(exc: Exception) -> ResponseReturnValue:
        log.warning("database unavailable: %s", exc)
        return _unavailable("database_unavailable", "the database is unavailable; retry later")

    @app.errorhandler(OSError)
    def _storage_down(exc: OSError) -> ResponseReturnValue:
        # Reached only by I/O errors nothing handled: the storage directory, not the client.
        log.warning("storage unavailable: %s", exc)
        return _unavailable("storage_unavailable", "file storage is unavailable; retry later")

    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError) -> ResponseReturnValue:
        # Only client JSON nests this deeply (10,000 levels of brackets, say): a 400, not a 500.
        return error_response("invalid_request", "the request's JSON is nested too deeply", 400)

    @app.errorhandler(UnicodeEncodeError)
    def _not_unicode(exc: UnicodeEncodeError) -> ResponseReturnValue:
        # JSON may carry lone surrogates ("\ud800") that no database text can hold.
        return error_response("invalid_text", "text must be valid Unicode (no lone "
                              "surrogates)", 400)

    @app.errorhandler(DataError)
    def _bad_data(exc: DataError) -> ResponseReturnValue:
        # SQLSTATE class 22 is the client's data: NUL characters PostgreSQL text cannot hold
        # ("\u0000"), numbers out of range. A 400 naming the problem, not a 500.
        log.info("data refused by the database: %s", str(exc.orig).splitlines()[0])
        return error_response("invalid_text", "the request holds a value the database cannot "
                              "store (e.g. a NUL character or a number out of range)", 400)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error")
        return error_response("internal_error", "an unexpected error occurred", 500)
