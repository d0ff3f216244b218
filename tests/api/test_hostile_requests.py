"""Requests an attacker would send: forged cursors, loose types, junk fields, odd bodies."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from service.db import session_scope
from service.errors import ApiError
from service.images.models import Image
from service.search.types import Cursor
from tests.api.test_search import grid  # noqa: F401  (the module-scoped fixture)
from tests.images.test_content_race import random_png


def _forge(cursor: str, change: dict[int, object]) -> str:
    """Rewrite fields of a search cursor's payload and keep its signature."""
    token, _, mac = cursor.rpartition(".")
    fields = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for index, value in change.items():
        fields[index] = value
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")
    return f"{forged}.{mac}"


def test_search_cursors_are_signed(client: FlaskClient, grid) -> None:  # noqa: F811
    model, _, vectors = grid
    body = {"vector": vectors[0].tolist(), "model": model, "k": 5}
    first = client.post("/api/v1/search", json=body).get_json()
    cursor = first["next_cursor"]
    assert client.post("/api/v1/search", json=dict(body, cursor=cursor)).status_code == 200
    # Offset, ef_search and distance as an attacker would set them.
    for change in ({2: -1}, {3: 40000}, {0: -1e9}, {2: 10**9}):
        forged = client.post("/api/v1/search", json=dict(body, cursor=_forge(cursor, change)))
        assert forged.status_code == 400, change
        assert forged.get_json()["error"]["code"] == "invalid_cursor"
    unsigned = cursor.rpartition(".")[0]
    assert client.post("/api/v1/search", json=dict(body, cursor=unsigned)).status_code == 400


@pytest.mark.parametrize("offset,distance", [(-1, 0.5), (10, float("nan"))])
def test_cursor_fields_out_of_range_are_refused(offset: int, distance: float) -> None:
    """Beyond the signature: a text or image search never runs at a negative offset."""
    value = Cursor(distance, uuid.uuid4(), offset, 40, "fp").encode()
    with pytest.raises(ApiError) as refused:
        Cursor.decode(value, "fp")
    assert refused.value.code == "invalid_cursor"


def test_listing_cursors_are_signed(client: FlaskClient, grid) -> None:  # noqa: F811
    page = client.get("/api/v1/images?limit=2").get_json()
    cursor = page["next_cursor"]
    assert client.get(f"/api/v1/images?limit=2&cursor={cursor}").status_code == 200
    token, _, mac = cursor.rpartition(".")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    when, row = raw.split("|")
    forged = base64.urlsafe_b64encode(f"2999-01-01T00:00:00+00:00|{row}".encode()).decode()
    resp = client.get(f"/api/v1/images?limit=2&cursor={forged.rstrip('=')}.{mac}")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("k", [True, "10", 2.0, None])
def test_k_must_be_an_integer(client: FlaskClient, grid, k: object) -> None:  # noqa: F811
    model, _, vectors = grid
    resp = client.post("/api/v1/search", json={"vector": vectors[0].tolist(), "model": model,
                                                "k": k})
    assert resp.status_code == 400, resp.get_json()
    assert "k" in resp.get_json()["error"]["message"]


def test_unknown_multipart_fields_are_refused_and_nothing_is_stored(client: FlaskClient,
                                                                   app: Flask) -> None:
    data = random_png(uuid.uuid4().int % 2**32)
    resp = client.post("/api/v1/images", data={
        "file": (io.BytesIO(data), "x.png"), "colection": "typo", "evil": "1"},
        content_type="multipart/form-data")
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "invalid_request"
    with app.app_context(), session_scope() as session:
        digest = hashlib.sha256(data).hexdigest()
        assert session.scalar(select(Image.id).where(Image.sha256 == digest)) is None
    search = client.post("/api/v1/search", data={"file": (io.BytesIO(data), "x.png"),
                                                 "k": "3"}, content_type="multipart/form-data")
    assert search.status_code == 400


def test_a_form_of_too_many_parts_says_so(client: FlaskClient) -> None:
    fields = {f"f{i}": "x" for i in range(2000)}
    resp = client.post("/api/v1/images", data=fields, content_type="multipart/form-data")
    assert resp.status_code == 413
    error = resp.get_json()["error"]
    assert error["code"] == "too_many_parts" and "parts" in error["message"]


def test_patch_with_a_body_that_is_not_json(client: FlaskClient, grid) -> None:  # noqa: F811
    _, ids, _ = grid
    broken = client.patch(f"/api/v1/images/{ids[0]}", data='{"metadata": {"a": 1',
                          content_type="application/json")
    assert broken.status_code == 400
    assert broken.get_json()["error"]["code"] == "invalid_json"
    plain = client.patch(f"/api/v1/images/{ids[0]}", data='{"metadata": {}}',
                         content_type="text/plain")
    assert plain.status_code == 415
    assert plain.get_json()["error"]["code"] == "unsupported_media_type"
    assert client.patch(f"/api/v1/images/{ids[0]}", json={"metadata": {"a": 1}}).status_code \
        == 200


def test_an_error_never_echoes_a_long_id(client: FlaskClient) -> None:
    for route in ("/api/v1/images/", "/api/v1/evaluations/", "/api/v1/jobs/"):
        resp = client.get(route + "x" * 5000)
        assert resp.status_code == 404
        assert len(resp.get_data()) < 1000, route


def test_invisible_format_characters_leave_the_file_name(client: FlaskClient) -> None:
    data = random_png(uuid.uuid4().int % 2**32)
    resp = client.post("/api/v1/images", data={
        "file": (io.BytesIO(data), "cat\u202egnp.exe\u200b"),
        "collection": f"names-{uuid.uuid4().hex[:6]}"}, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["filename"] == "catgnp.exe"
