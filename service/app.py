"""The Flask application factory."""

from __future__ import annotations

from typing import Any

from flask import Flask

from service.api import (
    codes,
    errors,
    evaluations,
    explain,
    facets,
    graph,
    health,
    images,
    jobs,
    metrics,
    search,
)
from service.api.auth import init_auth
from service.api.edge import init_edge
from service.api.errors import ApiJSONProvider
from service.api.metrics import init_request_telemetry
from service.api.openapi import spec
from service.config import load_settings
from service.db import init_db
from service.images.storage import open_store
from service.logs import configure_logging, resolve_format
from service.queue import celery_init_app
from service.web import views as web


def create_app(config: dict[str, Any] | None = None, *, log_format: str = "text") -> Flask:
    """Build the app: settings, database, broker, blueprints, error handlers, OpenAPI.

    `log_format` is what LOG_FORMAT=auto means here: json for the servers, text for the CLI.
    """
    app = Flask(__name__)
    app.config.from_mapping(load_settings(config))
    # Werkzeug refuses larger bodies with 413 before reading them.
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_BYTES"])
    app.config["MAX_FORM_MEMORY_SIZE"] = 1024 * 1024
    app.json = ApiJSONProvider(app)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    configure_logging(resolve_format(app.config.get("LOG_FORMAT"), default=log_format))

    init_db(app)
    celery_init_app(app)
    app.extensions["content_store"] = open_store(app.config)

    for module in (health, images, search, codes, jobs, graph, facets, web, evaluations,
                   explain, metrics):
        app.register_blueprint(module.bp)
    errors.register_error_handlers(app)
    spec.register(app)
    init_request_telemetry(app)  # first: refused requests are counted and get their id too
    init_edge(app)  # before authentication: a foreign Host or Origin gets no further
    init_auth(app)
    return app
