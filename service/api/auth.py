"""Who may call what: bearer API keys, scopes, per-collection visibility and rate limits.

One `before_request` authenticates every request (except health, readiness and the OpenAPI
document) and stores the caller in `g.principal`; the scope a route needs is derived from its
endpoint and method in `required_scope`, not repeated in each view. Collection isolation is
applied below the views (service/auth/visibility.py), so an id in another collection is a 404.
"""

from __future__ import annotations

import logging
import math
import time

from flask import (
    Flask,
    Response,
    current_app,
    g,
    has_app_context,
    has_request_context,
    request,
)
from flask.typing import ResponseReturnValue
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from service.api.errors import error_response
from service.auth import service as keys
from service.auth.policy import auth_required, is_loopback
from service.auth.service import OPEN, Principal
from service.auth.visibility import install_visibility
from service.db import session_scope
from service.errors import Forbidden, NotFound, Unauthorized

log = logging.getLogger(__name__)

# Liveness, readiness and the API description stay open to every caller.
OPEN_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "health.openapi", "static",
                            "web.static"})
# Fitting code sets, evaluations and graph rebuilds touch whole collections or every one;
# /metrics names every collection and its size.
ADMIN_BLUEPRINTS = frozenset({"codes", "evaluations", "metrics"})
ADMIN_ENDPOINTS = frozenset({"graph.rebuild"})
# POSTs that only read (a query photo is uploaded, nothing is stored).
READ_ENDPOINTS = frozenset({"search.search", "explain.explain_upload"})
UPLOAD_ENDPOINTS = ("images.upload_image", "jobs.create_job")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The web page keeps its key in this cookie so that <img> tags and page loads carry it; the
# cookie is accepted for safe methods only, so a cross-site form cannot use it to write.
KEY_COOKIE = "lookalike_key"


def is_open_endpoint(endpoint: str | None) -> bool:
    """Whether a route is reachable without a key."""
    return endpoint is None or endpoint in OPEN_ENDPOINTS or endpoint.startswith("openapi_")


def required_scope(endpoint: str, method: str) -> str:
    """The scope a route needs: read for GETs and search, write for changes, admin for the rest."""
    blueprint = endpoint.split(".", 1)[0]
    if blueprint in ADMIN_BLUEPRINTS or endpoint in ADMIN_ENDPOINTS:
        return "admin"
    if method in SAFE_METHODS or endpoint in READ_ENDPOINTS:
        return "read"
    return "write"


def current_principal() -> Principal:
    """The caller of the current request."""
    return g.get("principal", OPEN)


def allowed_collections() -> frozenset[str] | None:
    """The collections the current caller may see (None: all, or outside a request)."""
    if not has_app_context():
        return None
    principal = g.get("principal")
    if principal is None:
        # A request refused before it was authenticated (e.g. the 401 page) sees nothing.
        enforced = has_request_context() and current_app.config.get("AUTH_ENFORCED")
        return frozenset() if enforced else None
    return principal.collections


def require_collection(name: str) -> str:
    """A collection the caller names for a write; one it may not see does not exist (404)."""
    if not current_principal().sees(name):
        raise NotFound("not_found", f"no collection {name!r}")
    return name


def _token() -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("unauthorized", "use 'Authorization: Bearer <API key>'")
        return value.strip()
    # The page's cookie only matters where keys are required (an old one must not lock a
    # loopback page out).
    if request.method in SAFE_METHODS and current_app.config["AUTH_ENFORCED"]:
        return request.cookies.get(KEY_COOKIE) or None
    return None


def _authenticate() -> None:
    """Identify the caller and check the route's scope (a before_request hook)."""
    endpoint = request.endpoint
    if is_open_endpoint(endpoint):
        return
    token = _token()
    if token is None:
        if current_app.config["AUTH_ENFORCED"]:
            raise Unauthorized("unauthorized", "this API needs a key: "
                               "'Authorization: Bearer <API key>'")
        g.principal = OPEN
        return
    with session_scope() as session:
        principal = keys.authenticate(token, session=session)
    g.principal = principal
    need = required_scope(str(endpoint), request.method)
    if not principal.allows(need):
        raise Forbidden("forbidden", f"this key's scope is {principal.scope!r}; "
                        f"this request needs {need!r}")


def _rate_key() -> str:
    principal = g.get("principal")
    if principal is not None and principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"ip:{request.remote_addr or '-'}"


def _rate_limited(exc: RateLimitExceeded) -> ResponseReturnValue:
    limiter: Limiter = current_app.extensions["lookalike_limiter"]
    current = limiter.current_limit
    wait = max(1, math.ceil(current.reset_at - time.time())) if current else 60
    body, status = error_response(  # type: ignore[misc]
        "rate_limited", f"rate limit exceeded ({exc.description}); retry in {wait} s", 429)
    body.headers["Retry-After"] = str(wait)
    return body, status


def init_rate_limits(app: Flask) -> Limiter:
    """Redis-backed limits per API key (per address when open): one for all, one for uploads."""
    config = app.config
    redis_url = config.get("REDIS_URL")
    wanted = config.get("RATE_LIMIT_ENABLED", "auto")
    enabled = bool(config.get("AUTH_ENFORCED")) if wanted == "auto" else bool(wanted)
    app.config.setdefault("RATELIMIT_ENABLED", enabled)
    limiter = Limiter(
        key_func=_rate_key,
        application_limits=[str(config["RATE_LIMIT_DEFAULT"])],
        storage_uri=redis_url or "memory://",
        # A Redis outage must not fail requests (uploads stay accepted, see docs/ingestion.md):
        # limits fall back to per-process memory until Redis answers again.
        storage_options={"socket_connect_timeout": 1, "socket_timeout": 1},
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        key_prefix="lookalike-rl",
        strategy="fixed-window",
        headers_enabled=True,
    )
    limiter.request_filter(lambda: is_open_endpoint(request.endpoint))

    @app.after_request
    def _retry_after_only_when_refused(response: Response) -> Response:
        # Flask-Limiter adds Retry-After to every limited response; it means "come back later"
        # only on a 429 or 503. (Registered first, so it runs after the limiter's hook.)
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)
        return response

    limiter.init_app(app)
    upload = limiter.shared_limit(str(config["RATE_LIMIT_UPLOAD"]), scope="uploads",
                                  methods=["POST"])
    for endpoint in UPLOAD_ENDPOINTS:
        if endpoint in app.view_functions:
            app.view_functions[endpoint] = upload(app.view_functions[endpoint])
    app.extensions["lookalike_limiter"] = limiter
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    return limiter


def announce_auth(app: Flask) -> None:
    """Say at start-up whether keys are required (and whether any exists): for the server only."""
    if app.config["AUTH_ENFORCED"]:
        with app.app_context(), session_scope() as session:
            try:
                active = keys.count_active_keys(session=session)
            except Exception:  # the database may not be up yet; /readyz reports that
                active = -1
        if active == 0:
            log.warning("API keys are required but none exists: every request will get 401; "
                        "create one with `lookalike keys create`")
    else:
        log.warning("API authentication is OFF: anyone who can reach %s can read, change and "
                    "delete every collection. Only run like this on loopback; set "
                    "LOOKALIKE_AUTH_REQUIRED=true (or bind another host) to require keys",
                    app.config.get("BIND_HOST") or "this server")


def init_auth(app: Flask) -> None:
    """Decide whether keys are required, then install authentication, isolation and limits."""
    enforced = auth_required(app.config)
    host = app.config.get("BIND_HOST")
    if not enforced and host and not is_loopback(host):
        raise RuntimeError(f"refusing to serve {host} without API keys: AUTH_REQUIRED is off "
                           "but the address is not loopback (docs/security.md)")
    app.config["AUTH_ENFORCED"] = enforced
    install_visibility(app.extensions["db_sessionmaker"], allowed_collections)
    app.before_request(_authenticate)
    init_rate_limits(app)
