"""Match explanations: a heatmap of the result's size, brightest where the query is."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage

from service.text.explain import upsample
from tests.api.test_images import upload
from tests.conftest import wait_for_status
from tests.text.conftest import jpeg


def square(pixels: np.ndarray, side: int) -> np.ndarray:
    """The centre square of a photo, resized."""
    img = PILImage.fromarray(pixels)
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.crop(box).resize((side, side), PILImage.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def collage(app: Flask, worker: object) -> dict[str, str]:
    """A cat photo, a coffee photo, and a 640 x 320 collage: the cat left, the coffee right."""
    import skimage.data

    client = app.test_client()
    cat, coffee = skimage.data.chelsea(), skimage.data.coffee()
    both = np.concatenate([square(cat, 320), square(coffee, 320)], axis=1)
    collection = f"collage-{uuid.uuid4().hex[:6]}"
    ids = {}
    for name, pixels in (("cat", cat), ("coffee", coffee), ("collage", both)):
        resp = upload(client, jpeg(pixels), collection=collection, name=f"{name}.jpg")
        ids[name] = resp.get_json()["id"]
    for image_id in ids.values():
        assert wait_for_status(client, image_id)["status"] == "ready"
    return ids


def test_png_has_the_result_size_and_classes(client: FlaskClient, collage) -> None:
    resp = client.get(f"/api/v1/explain?query_id={collage['cat']}&result_id={collage['collage']}")
    assert resp.status_code == 200, resp.get_data()[:300]
    assert resp.mimetype == "image/png"
    assert PILImage.open(io.BytesIO(resp.data)).size == (640, 320)
    classes = json.loads(resp.headers["X-Match-Classes"])
    assert any("cat" in label for label, _ in classes[:3]), classes


@pytest.mark.parametrize("query,left", [("cat", True), ("coffee", False)])
def test_heat_is_brightest_over_the_matching_half(client: FlaskClient, collage, query: str,
                                                   left: bool) -> None:
    resp = client.get(f"/api/v1/explain?query_id={collage[query]}"
                      f"&result_id={collage['collage']}&format=json")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert (body["width"], body["height"]) == (640, 320)
    heat = upsample(np.array(body["grid"], np.float32), (640, 320))
    left_mean, right_mean = heat[:, :320].mean(), heat[:, 320:].mean()
    assert (left_mean > right_mean + 0.15) if left else (right_mean > left_mean + 0.15), (
        left_mean, right_mean)
    assert (body["peak"]["x"] < 320) == left


def test_uploaded_query_and_errors(client: FlaskClient, collage) -> None:
    import skimage.data

    resp = client.post("/api/v1/explain", data={
        "file": (io.BytesIO(jpeg(skimage.data.coffee())), "q.jpg"),
        "result_id": collage["collage"], "format": "json"}, content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["peak"]["x"] >= 320
    missing = client.get(f"/api/v1/explain?query_id={collage['cat']}&result_id={uuid.uuid4()}")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    bad = client.get(f"/api/v1/explain?query_id={collage['cat']}")
    assert bad.status_code == 400
