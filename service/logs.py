"""Log lines and their context: JSON or text, each carrying the request id that caused it.

The context (request_id, and a task's name and id in a worker) lives in a context variable:
the API binds it per request, queue.enqueue copies the request id into the Celery message's
headers, and the worker binds it again before the task runs, so one id follows an upload from
its response header to the worker's lines. Below every other module: it imports nothing of ours.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header that carries it (service/queue.py, workers/signals.py).
TASK_HEADER = "lookalike_request_id"
MAX_REQUEST_ID = 128
LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# Never mutated: bind() sets a new mapping, so the shared empty default stays empty.
_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("lookalike_log_context", default=_EMPTY)


def valid_request_id(value: str | None) -> str | None:
    """A caller's id if it is 1 to 128 printable ASCII characters without spaces, else None."""
    if not value or len(value) > MAX_REQUEST_ID:
        return None
    return value if all("!" <= c <= "~" for c in value) else None


def new_request_id() -> str:
    """A fresh id (32 hex digits)."""
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The request id of the work this thread is doing, if any."""
    return _context.get().get("request_id")


def log_context() -> Mapping[str, str]:
    """Every field bound for this thread's log lines."""
    return _context.get()


def bind(**fields: str | None) -> Token[Mapping[str, str]]:
    """Add fields to this thread's log context (None removes one); returns the reset token."""
    merged = {**_context.get(), **fields}
    return _context.set({k: v for k, v in merged.items() if v is not None})


def reset(token: Token[Mapping[str, str]] | None = None) -> None:
    """Restore the context as it was before `bind` (or empty it)."""
    if token is not None:
        try:
            _context.reset(token)
            return
        except ValueError:  # made in another context: nothing to restore there
            pass
    _context.set(_EMPTY)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (request_id always, None when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "request_id"):
            record.request_id = None
        return True


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: timestamp, level, logger, message, request_id, then the rest."""

    def __init__(self) -> None:
        super().__init__(["levelname", "name", "message", "request_id"],
                         rename_fields={"levelname": "level", "name": "logger"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        """Put the UTC timestamp first, then python-json-logger's fields and extras."""
        log_data["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)


class TextFormatter(logging.Formatter):
    """The readable line, with the request id in brackets ("-" outside a request)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Format with "-" standing for a missing request id."""
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def resolve_format(value: str | None, *, default: str) -> str:
    """LOG_FORMAT's value, with "auto" (or nothing) meaning the caller's default."""
    value = (value or "auto").strip().lower()
    if value == "auto":
        return default
    if value not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT must be json, text or auto, not {value!r}")
    return value


def stream_handler(fmt: str = "json") -> logging.Handler:
    """A stderr handler in `fmt`, with the context filter (marked as ours for reconfiguring)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.lookalike = True  # type: ignore[attr-defined]
    return handler


def configure_logging(fmt: str, level: int | str = logging.INFO) -> None:
    """Send the root logger's lines to stderr in `fmt`, replacing a handler set up here before.

    Handlers that others installed (pytest's capture, for one) are left as they are.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "lookalike", False):
            root.removeHandler(handler)
    root.addHandler(stream_handler(fmt))
    root.setLevel(level)
