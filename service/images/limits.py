"""Process-wide decode limits: decoded bytes per image and decodes running at once.

The settings come from the running app (API request or Celery task) when there is one, so
every caller of the decoder is bounded without passing them down; else the defaults.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from flask import current_app, has_app_context

from service.config import DEFAULTS

_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}
_held = threading.local()


def setting(name: str) -> int:
    """An integer decode setting of the current app, or its default."""
    if has_app_context():
        return int(current_app.config.get(name, DEFAULTS[name]))
    return int(DEFAULTS[name])


@contextlib.contextmanager
def decode_slot() -> Iterator[None]:
    """Hold one of MAX_CONCURRENT_DECODES slots of this process (re-entrant in a thread)."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    size = max(1, setting("MAX_CONCURRENT_DECODES"))
    with _slots_lock:
        slots = _slots.setdefault(size, threading.BoundedSemaphore(size))
    with slots:
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
