"""Checks at the HTTP edge that hold with or without the proxy in front.

Open mode (no keys, loopback only) trusts whoever reaches the socket, so it must make sure the
request really comes from this machine's own pages and tools: a Host that is not a loopback
name (or a configured one) is DNS rebinding, and an unsafe method from another Origin is a
cross-site form or fetch (multipart POSTs need no CORS preflight). Every response also tells
browsers not to frame, sniff or leak the page.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request
from werkzeug.middleware.proxy_fix import ProxyFix

from service.errors import ApiError, Forbidden

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# The page loads only its own script and stylesheet; previews are blob: URLs of picked files.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
# spectree's documentation pages load their viewers from CDNs with inline bootstraps.
DOCS_CSP = "frame-ancestors 'none'; object-src 'none'; base-uri 'none'"
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class HostNotAllowed(ApiError):
    """The Host header names a server this one is not configured to be."""

    status = 421


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header's lower-case name and port, or None if it is malformed."""
    value = value.strip().lower()
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.path or parts.query or parts.username is not None:
        return None
    return name, port


def is_loopback_name(name: str) -> bool:
    """Whether a host name always means this machine: localhost or a loopback address."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(config: dict[str, Any] | Any) -> list[str]:
    """ALLOWED_HOSTS as lower-case names; a leading dot allows the domain and its subdomains."""
    value = config.get("ALLOWED_HOSTS") or []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip().lower() for v in value if str(v).strip()]


def host_allowed(name: str, allowed: list[str]) -> bool:
    """Whether a Host name is loopback or matches the allow-list."""
    if is_loopback_name(name):
        return True
    for entry in allowed:
        if entry == "*" or entry == name:
            return True
        if entry.startswith(".") and (name == entry[1:] or name.endswith(entry)):
            return True
    return False


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether an Origin header names the server that the Host header names."""
    try:
        parts = urlsplit(origin.strip().lower())
        origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    target = split_host(host)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or target is None:
        return False
    name, port = target
    if port is None:
        # Behind a TLS proxy the Origin says https while this hop is plain http: a Host
        # without a port means the default port of whichever scheme the browser used.
        return name == parts.hostname and origin_port == DEFAULT_PORTS[parts.scheme]
    return name == parts.hostname and port == origin_port


def _check_request() -> None:
    config = current_app.config
    allowed = allowed_hosts(config)
    open_mode = not config.get("AUTH_ENFORCED")
    host = request.headers.get("Host")
    if host is not None and (open_mode or allowed):
        target = split_host(host)
        if target is None or not host_allowed(target[0], allowed):
            raise HostNotAllowed("host_not_allowed", f"this server does not answer to Host "
                                 f"{host[:100]!r}: use 127.0.0.1 or localhost, or add the "
                                 "name to LOOKALIKE_ALLOWED_HOSTS")
    # With keys, a cross-site page has no credentials to send (the key cookie only reads).
    if not open_mode or request.method not in UNSAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    cross = request.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site"
    if cross or (origin is not None and not same_origin(origin, host or "", request.scheme)):
        raise Forbidden("cross_site_request", "changes are only accepted from this server's "
                        "own pages or from clients that send no Origin (curl, the CLI)")


def _add_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    endpoint = request.endpoint or ""
    docs = endpoint.startswith("openapi_") and response.mimetype == "text/html"
    response.headers.setdefault("Content-Security-Policy", DOCS_CSP if docs else PAGE_CSP)
    return response


def init_edge(app: Flask) -> None:
    """Trust the configured proxy hops, check Host and Origin first, add browser headers."""
    hops = int(app.config.get("TRUSTED_PROXIES") or 0)
    if hops:
        # Only the embedded nginx (or compose's) reaches gunicorn then; it sets the client's
        # address, so rate limits count clients and not the proxy.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.before_request(_check_request)
    app.after_request(_add_headers)
