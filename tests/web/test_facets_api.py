"""Facets and collections endpoints, and the HTML pages, through the Flask test client."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.web.views import page_modules

COLLECTION = "t-facets"
METADATA: list[dict[str, Any]] = [
    {"label": "Shirt", "price": 10, "released": "2024-01-05", "kids": False, "size": 38},
    {"label": "Shirt", "price": 25.5, "released": "2024-03-01", "kids": True, "size": 38},
    {"label": "Hat", "price": 40, "released": "2023-12-31"},
    {"label": "Dress", "tags": ["red"], "note": 3},
    {},
]


@pytest.fixture(scope="module")
def faceted(photos: list[Path], app: Any) -> list[str]:
    """Five images with known metadata (no worker: facets need no vectors)."""
    client = app.test_client()
    ids = []
    for path, meta in zip(photos, METADATA, strict=False):
        resp = client.post("/api/v1/images", content_type="multipart/form-data", data={
            "file": (io.BytesIO(path.read_bytes()), path.name), "collection": COLLECTION,
            "metadata": json.dumps(meta)})
        assert resp.status_code in (200, 202), resp.get_json()
        ids.append(resp.get_json()["id"])
    return ids


def by_key(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["key"]: f for f in body["facets"]}


def test_facets_count_values_and_ranges(client: FlaskClient, faceted: list[str]) -> None:
    resp = client.get(f"/api/v1/facets?collection={COLLECTION}")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert (body["total"], body["scanned"], body["sampled"]) == (5, 5, False)
    facets = by_key(body)
    assert set(facets) == {"label", "price", "released", "kids", "note",
                           "size"}  # arrays are left out
    assert facets["label"]["kind"] == "values" and facets["label"]["type"] == "string"
    assert facets["label"]["values"] == [{"value": "Shirt", "count": 2},
                                         {"value": "Dress", "count": 1},
                                         {"value": "Hat", "count": 1}]
    assert facets["kids"]["values"] == [{"value": False, "count": 1},
                                        {"value": True, "count": 1}]
    # Three prices on three images: no value repeats, so a range rather than a list.
    price = facets["price"]
    assert (price["type"], price["kind"], price["values"]) == ("number", "range", [])
    assert (price["count"], price["min"], price["max"]) == (3, 10, 40)
    # One note on one image: a repeated value would be listed; a single one is a range too.
    assert facets["note"]["kind"] == "range"
    assert facets["size"]["values"] == [{"value": 38, "count": 2}]
    released = facets["released"]
    assert (released["type"], released["kind"]) == ("date", "range")
    assert (released["min"], released["max"]) == ("2023-12-31", "2024-03-01")


def test_facets_switch_to_ranges_above_max_values(client: FlaskClient,
                                                  faceted: list[str]) -> None:
    facets = by_key(client.get(f"/api/v1/facets?collection={COLLECTION}&max_values=2")
                    .get_json())
    assert facets["price"]["kind"] == "range" and facets["price"]["values"] == []
    assert (facets["price"]["min"], facets["price"]["max"]) == (10, 40)
    # Strings with too many values have no useful facet: the page leaves them out.
    assert facets["label"]["kind"] == "none" and facets["label"]["distinct"] == 3
    assert facets["kids"]["kind"] == "values"


def test_facets_of_an_unknown_collection_are_empty_and_bad_input_is_400(
        client: FlaskClient) -> None:
    body = client.get("/api/v1/facets?collection=no-such-collection").get_json()
    assert body == {"collection": "no-such-collection", "total": 0, "scanned": 0,
                    "sampled": False, "facets": []}
    resp = client.get("/api/v1/facets?max_values=0")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_request"


def test_collections_list_names_with_counts(client: FlaskClient, faceted: list[str]) -> None:
    resp = client.get("/api/v1/collections")
    assert resp.status_code == 200
    items = resp.get_json()["items"]
    assert {"name": COLLECTION, "count": 5} in items
    names = [i["name"] for i in items]
    assert names == sorted(names)


def test_pages_render_html(client: FlaskClient, faceted: list[str]) -> None:
    page = client.get(f"/?collection={COLLECTION}")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '<label for="query-file"' in html and 'id="k"' in html
    assert f'<option value="{COLLECTION}" selected>{COLLECTION} (5)</option>' in html
    assert client.get("/browse").status_code == 200
    upload = client.get("/upload").get_data(as_text=True)
    assert 'data-jobs-enabled=' in upload
    detail = client.get(f"/images/{faceted[0]}?collection={COLLECTION}")
    assert detail.status_code == 200
    assert "More like this" in detail.get_data(as_text=True)
    js = client.get("/static/web/app.js")
    assert js.status_code == 200 and "javascript" in js.mimetype
    # Browsers run a module only when it is served as JavaScript (nosniff is on, too).
    assert '<script type="module" src="/static/web/app.js">' in html
    for name in page_modules():
        assert f'<link rel="modulepreload" href="/static/web/{name}">' in html
        module = client.get(f"/static/web/{name}")
        assert module.status_code == 200 and "javascript" in module.mimetype, name


def test_missing_image_page_is_html_not_json(client: FlaskClient) -> None:
    for image_id in (str(uuid.uuid4()), "not-an-id"):
        resp = client.get(f"/images/{image_id}")
        assert resp.status_code == 404 and resp.mimetype == "text/html"
        assert "Not found" in resp.get_data(as_text=True)
