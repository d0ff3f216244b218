"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from service.config import load_settings
from service.db import init_db
from service.images.storage import ContentStore
from service.queue import celery_init_app


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings, database, broker, blueprints, error handlers, OpenAPI."""
    app = Flask(__name__)
    app.config.from_mapping(load_settings(config))
    # Werkzeug refuses larger bodies with 413 before reading them.
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_BYTES"])
    app.config["MAX_FORM_MEMORY_SIZE"] = 1024 * 1024
    from service.api.errors import ApiJSONProvider

    app.json = ApiJSONProvider(app)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    init_db(app)
    celery_init_app(app)
    app.extensions["content_store"] = ContentStore(app.config["STORAGE_DIR"])

    from service.api import errors, health, images, search
    from service.api.openapi import spec

    app.register_blueprint(health.bp)
    app.register_blueprint(images.bp)
    app.register_blueprint(search.bp)
    from service.api import codes  # Issue 6: hashing (and graph) endpoints.

    app.register_blueprint(codes.bp)
    from service.api import jobs  # Issue 5: bulk ingestion jobs.

    app.register_blueprint(jobs.bp)
    from service.api import graph  # Issue 6: clusters, duplicates, related images.

    app.register_blueprint(graph.bp)
    from service.api import facets  # Issue 8: facets and collections for the web page.
    from service.web import views as web  # Issue 8: the HTML page at /.

    app.register_blueprint(facets.bp)
    app.register_blueprint(web.bp)
    from service.api import evaluations

    app.register_blueprint(evaluations.bp)
    from service.api import explain  # Issue 10: why a result matched.

    app.register_blueprint(explain.bp)
    errors.register_error_handlers(app)
    spec.register(app)
    from service.api.auth import init_auth  # Issue 9: API keys, isolation, rate limits.
    from service.api.edge import init_edge

    init_edge(app)  # before authentication: a foreign Host or Origin gets no further
    init_auth(app)
    return app
