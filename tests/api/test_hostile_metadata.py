"""Hostile metadata and filenames: each is a clear 4xx or stored exactly, never a 500, and a
refused request writes nothing (no row, no file, metadata unchanged)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, inspect, select

from service.db import get_engine, session_scope
from service.images.models import Image

DEEP = '{"a":' * 10_000 + "1" + "}" * 10_000
HOSTILE_KEYS = {"a'; DROP TABLE images;--": 1, "$.x": 2, "a->b": 3, "a->>'b'": 4,
                "metadata.x": 5, "x\"y": 6, "{a,b}": 7, "%s": 8, ":name": 9, "": 10}

REFUSED_RAW = {
    "deep": DEEP,
    "deep_list": "[" * 10_000 + "]" * 10_000,
    "deep_40": '{"a":' * 40 + "1" + "}" * 40,  # parses, but deeper than metadata may be
    "huge": json.dumps({"x": "y" * 200_000}),
    "list": "[1, 2]",
    "string": '"text"',
    "number": "3",
    "null": "null",
    "nul_value": '{"a": "x\\u0000y"}',
    "nul_key": '{"a\\u0000": 1}',
    "lone_surrogate": '{"a": "\\ud800"}',
    "nan": '{"a": NaN}',
    "not_json": "{'a': 1}",
    "trailing": '{"a": 1} x',
}


def _upload(client: FlaskClient, data: bytes, *, metadata: str | None = None,
            name: str = "photo.jpg", collection: str = "t-hostile") -> Any:
    form: dict[str, Any] = {"file": (io.BytesIO(data), name), "collection": collection}
    if metadata is not None:
        form["metadata"] = metadata
    return client.post("/api/v1/images", data=form, content_type="multipart/form-data")


def _rows(app: Flask) -> int:
    with app.app_context(), session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Image)) or 0)


@pytest.mark.parametrize("case", sorted(REFUSED_RAW))
def test_hostile_metadata_on_upload_is_400_and_writes_nothing(
        app: Flask, client: FlaskClient, photos: list[Path], case: str) -> None:
    before = _rows(app)
    resp = _upload(client, photos[9].read_bytes(), metadata=REFUSED_RAW[case])
    assert resp.status_code in (400, 413), (case, resp.status_code, resp.get_data()[:200])
    assert set(resp.get_json()["error"]) == {"code", "message"}
    assert _rows(app) == before


@pytest.mark.parametrize("case", sorted(REFUSED_RAW))
def test_hostile_metadata_on_patch_is_400_and_changes_nothing(
        client: FlaskClient, photos: list[Path], case: str) -> None:
    created = _upload(client, photos[10].read_bytes(), metadata='{"keep": true}')
    assert created.status_code in (200, 202)
    image_id = created.get_json()["id"]
    body = '{"metadata": ' + REFUSED_RAW[case] + "}"
    resp = client.patch(f"/api/v1/images/{image_id}", data=body,
                        content_type="application/json")
    assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.get_data()[:200])
    assert set(resp.get_json()["error"]) == {"code", "message"}
    assert client.get(f"/api/v1/images/{image_id}").get_json()["metadata"] == {"keep": True}


@pytest.mark.parametrize("body", [DEEP, "[" * 10_000 + "]" * 10_000,
                                  '{"k": 5, "vector": [1], "filter": ' + DEEP + "}"])
def test_deep_json_bodies_are_400_on_every_json_route(client: FlaskClient, body: str) -> None:
    for path in ("/api/v1/search", "/api/v1/jobs", "/api/v1/codes", "/api/v1/graph/rebuild"):
        resp = client.post(path, data=body, content_type="application/json")
        assert resp.status_code == 400, (path, resp.status_code, resp.get_data()[:200])
        assert set(resp.get_json()["error"]) == {"code", "message"}


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/search", '{"k": 3, "vector": [0.1], "filter": {"a": "\\ud800"}}'),
    ("/api/v1/search", '{"k": 3, "vector": [0.1], "collection": "\\udfff"}'),
    ("/api/v1/jobs", '{"collection": "\\ud800", "items": [{"path": "/x.jpg"}]}'),
    ("/api/v1/images?collection=%ED%A0%80", None),
])
def test_lone_surrogates_anywhere_are_4xx(client: FlaskClient, path: str,
                                          body: str | None) -> None:
    resp = (client.post(path, data=body, content_type="application/json") if body
            else client.get(path))
    assert 200 <= resp.status_code < 500, (path, resp.status_code, resp.get_data()[:200])
    assert resp.status_code != 500


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/evaluations", {"collection": "a\u0000b"}),
    ("/api/v1/search", {"k": 3, "vector": [0.1], "collection": "a\u0000b"}),
    ("/api/v1/search", {"k": 3, "vector": [0.1], "filter": {"a\u0000": 1}}),
    ("/api/v1/jobs", {"collection": "a\u0000b", "items": [{"path": "/x.jpg"}]}),
    ("/api/v1/graph/rebuild", {"collection": "a\u0000b"}),
])
def test_nul_characters_in_any_json_field_are_4xx(client: FlaskClient, path: str,
                                                  body: dict[str, Any]) -> None:
    resp = client.post(path, json=body)
    assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.get_data()[:200])
    assert set(resp.get_json()["error"]) == {"code", "message"}


def test_keys_with_sql_and_json_path_syntax_are_stored_verbatim(
        app: Flask, client: FlaskClient, photos: list[Path]) -> None:
    meta = {**HOSTILE_KEYS, "long": "z" * 60_000, "nested": {"$or": [{"a->b": "'"}]}}
    resp = _upload(client, photos[11].read_bytes(), metadata=json.dumps(meta))
    assert resp.status_code in (200, 202), resp.get_json()
    image_id = resp.get_json()["id"]
    assert client.get(f"/api/v1/images/{image_id}").get_json()["metadata"] == meta
    patched = client.patch(f"/api/v1/images/{image_id}", json={"metadata": HOSTILE_KEYS})
    assert patched.status_code == 200 and patched.get_json()["metadata"] == HOSTILE_KEYS
    # Filtering by those keys binds them as parameters: a 200 (or a clear 400), never a 500.
    for key in HOSTILE_KEYS:
        found = client.post("/api/v1/search", json={
            "vector": [0.1] * 1280, "k": 3, "filter": {key: HOSTILE_KEYS[key]}})
        assert found.status_code in (200, 400, 409), (key, found.get_json())
    with app.app_context():
        assert "images" in inspect(get_engine()).get_table_names()


@pytest.mark.parametrize("name", [
    "../../../etc/passwd", "/absolute/path/photo.jpg", "..\\..\\windows\\photo.jpg",
    "bad\x00na\rme\n\x1b[31m.jpg", "tab\tand\x7fdel.jpg", "x" * 1000 + ".jpg", "../", "..",
])
def test_hostile_filenames_keep_only_a_clean_last_component(
        app: Flask, client: FlaskClient, photos: list[Path], name: str) -> None:
    collection = f"t-name-{abs(hash(name)) % 10**8}"
    before = _rows(app)
    resp = _upload(client, photos[9].read_bytes(), name=name, collection=collection)
    if resp.status_code == 400:  # a name that breaks the multipart header: no file at all
        assert resp.get_json()["error"]["code"] == "missing_file"
        assert _rows(app) == before
        return
    assert resp.status_code in (200, 202), resp.get_json()
    stored = resp.get_json()["filename"]
    if stored is not None:
        assert "/" not in stored and "\\" not in stored and len(stored) <= 255
        assert not any(ord(c) < 32 or c == "\x7f" for c in stored)
    root = Path(app.config["STORAGE_DIR"])
    assert not any("passwd" in p.name or "windows" in str(p) for p in root.rglob("*"))


def test_a_form_missing_a_required_field_is_400_not_500(client: FlaskClient) -> None:
    # Spectree quotes the whole form, the uploaded file included, in its validation error.
    resp = client.post("/api/v1/explain", data={"file": (io.BytesIO(b"\xff\xd8junk"), "f"),
                                                "\x0e\x7f": "{}"},
                       content_type="multipart/form-data")
    assert resp.status_code == 400, resp.get_data()[:300]
    assert set(resp.get_json()["error"]) == {"code", "message"}
