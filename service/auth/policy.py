"""Whether API keys are required: the rule shared by the API, `lookalike run` and its proxy."""

from __future__ import annotations

import ipaddress
from typing import Any


def is_loopback(host: str | None) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_required(config: dict[str, Any] | Any) -> bool:
    """AUTH_REQUIRED true/false, or "auto": required unless BIND_HOST is a loopback address."""
    value = config.get("AUTH_REQUIRED", "auto")
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        if lowered != "auto":
            raise RuntimeError(f"AUTH_REQUIRED must be true, false or auto, not {value!r}")
        return not is_loopback(config.get("BIND_HOST"))
    return bool(value)
