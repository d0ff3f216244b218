"""HTML pages: search by photo, browse, upload, image detail. The JSON API does the work."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, render_template, request
from werkzeug.exceptions import HTTPException

from service.db import session_scope
from service.embedding import registry
from service.errors import ApiError
from service.images import facets as facet_service
from service.images import service as images

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static/web")

METRICS = ("cosine", "l2", "inner_product", "l1", "chebyshev")
METRIC_LABELS = {"cosine": "Cosine", "l2": "Euclidean (L2)", "inner_product": "Inner product",
                 "l1": "Manhattan (L1)", "chebyshev": "Chebyshev"}


@bp.app_template_global("page_modules")
@cache
def page_modules() -> list[str]:
    """The modules app.js imports, as static file names, for the pages' modulepreload links."""
    # Preloading the whole graph fetches it in one round instead of one per import level.
    folder = Path(bp.static_folder or "") / "js"
    return [f"js/{path.name}" for path in sorted(folder.glob("*.js"))]


def _page_context(active: str) -> dict[str, Any]:
    """What every page's header needs: the collections and the one chosen."""
    with session_scope() as session:
        collections = facet_service.collection_counts(session=session)
    chosen = request.args.get("collection") or ""
    return {"active": active, "collections": collections, "collection": chosen,
            "jobs_enabled": "jobs" in current_app.blueprints,
            "graph_enabled": "graph" in current_app.blueprints}


def _model_names() -> list[str]:
    """Installed models, the default first (the page offers these)."""
    default = str(current_app.config["DEFAULT_MODEL"])
    names = [m.name for m in registry.installed(Path(current_app.config["MODEL_DIR"]))]
    return [default] + [n for n in names if n != default]


@bp.get("/")
def search_page() -> str:
    """Search by photo, with k, model, metric and metadata facets."""
    return render_template("search.html", models=_model_names(), metrics=METRICS,
                           metric_labels=METRIC_LABELS, **_page_context("search"))


@bp.get("/browse")
def browse_page() -> str:
    """A collection's images, newest first, page by page."""
    return render_template("browse.html", **_page_context("browse"))


@bp.get("/upload")
def upload_page() -> str:
    """Upload single images (and archives, once the jobs API is there)."""
    return render_template("upload.html", **_page_context("upload"))


@bp.get("/images/<image_id>")
def image_page(image_id: str) -> str:
    """One image: the full picture, its metadata, and "more like this"."""
    with session_scope() as session:
        image = images.get_image(image_id, session=session)
        record = {"id": str(image.id), "collection": image.collection, "status": image.status,
                  "error": image.error, "metadata": image.meta, "width": image.width,
                  "height": image.height, "format": image.format, "bytes": image.bytes,
                  "filename": image.filename, "created_at": image.created_at}
    return render_template("image.html", image=record, models=_model_names(),
                           metadata_json=json.dumps(record["metadata"], indent=2,
                                                    ensure_ascii=False),
                           **_page_context("browse"))


@bp.errorhandler(ApiError)
def _page_api_error(exc: ApiError) -> tuple[str, int]:
    # A page answers in HTML, never with the API's JSON error body.
    return _error_page(exc.status, exc.message)


@bp.errorhandler(HTTPException)
def _page_http_error(exc: HTTPException) -> tuple[str, int]:
    return _error_page(exc.code or 500, exc.description or exc.name)


def _error_page(status: int, message: str) -> tuple[str, int]:
    titles = {404: "Not found", 400: "That did not work", 401: "API key needed"}
    try:
        context = _page_context("")
    except Exception:  # The database may be what failed: still show the message.
        context = {"active": "", "collections": [], "collection": "", "jobs_enabled": False,
                   "graph_enabled": False}
    return render_template("error.html", status=status, title=titles.get(status, "Error"),
                           message=message, **context), status
