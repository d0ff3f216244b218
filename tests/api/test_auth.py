"""API keys through the API: 401/403 shapes, scopes, collection isolation on every route, the
auto-required rule and per-key rate limits, against the real database, Redis and worker."""

from __future__ import annotations

import io
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.api.auth import KEY_COOKIE
from service.app import create_app
from service.auth import service as keys
from service.auth.policy import auth_required, is_loopback
from service.db import session_scope
from tests.conftest import wait_for_status

pytestmark = pytest.mark.usefixtures("worker")
A, B = "iso-a", "iso-b"


@dataclass
class World:
    """Two collections with two ready images each, a job in B, and keys."""

    a_ids: list[str]
    b_ids: list[str]
    job_b: str
    read_a: str
    write_a: str
    write_b: str
    admin: str
    revoked: str


def _token(app: Flask, scope: str, collections: list[str] | None) -> str:
    with app.app_context(), session_scope() as session:
        return keys.create_key(session=session, scope=scope, collections=collections).token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _upload(client: FlaskClient, path: Path, collection: str,
            headers: dict[str, str] | None = None) -> Any:
    return client.post("/api/v1/images", headers=headers or {}, data={
        "file": (io.BytesIO(path.read_bytes()), path.name), "collection": collection,
        "metadata": '{"label": "x"}'}, content_type="multipart/form-data")


@pytest.fixture(scope="module")
def secure(settings: dict[str, Any]) -> Flask:
    """The API as it runs on a network address: keys required (AUTH_REQUIRED auto)."""
    return create_app({**settings, "BIND_HOST": "0.0.0.0"})


@pytest.fixture(scope="module")
def world(app: Flask, photos: list[Path]) -> World:
    client = app.test_client()  # the suite's app listens on loopback: open without a key
    ids: dict[str, list[str]] = {A: [], B: []}
    for i, path in enumerate(photos[:4]):
        resp = _upload(client, path, A if i < 2 else B)
        assert resp.status_code in (200, 202), resp.get_json()
        ids[A if i < 2 else B].append(resp.get_json()["id"])
    for image_id in ids[A] + ids[B]:
        assert wait_for_status(client, image_id)["status"] == "ready"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("one.jpg", photos[4].read_bytes())
    archive.seek(0)
    job = client.post("/api/v1/jobs", data={"file": (archive, "b.zip"), "collection": B},
                      content_type="multipart/form-data")
    assert job.status_code == 202, job.get_json()
    revoked = _token(app, "read", [A])
    with app.app_context(), session_scope() as session:
        keys.revoke_key(revoked.split("_")[1], session=session)
    return World(a_ids=ids[A], b_ids=ids[B], job_b=job.get_json()["id"],
                 read_a=_token(app, "read", [A]), write_a=_token(app, "write", [A]),
                 write_b=_token(app, "write", [B]), admin=_token(app, "admin", None),
                 revoked=revoked)


# ---- 401 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
    {"Authorization": "Bearer lk_000000000000_not-a-key"}, {"Authorization": "Bearer x" * 300},
])
def test_missing_or_bad_key_is_401_in_our_shape(secure: Flask, headers: dict[str, str]) -> None:
    resp = secure.test_client().get("/api/v1/images", headers=headers)
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert set(resp.get_json()["error"]) == {"code", "message"}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_is_401(secure: Flask, world: World) -> None:
    resp = secure.test_client().get("/api/v1/images", headers=_auth(world.revoked))
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json",
                                  "/static/web/app.js"])
def test_health_and_openapi_stay_open(secure: Flask, path: str) -> None:
    assert secure.test_client().get(path).status_code == 200


def test_every_api_route_needs_a_key(secure: Flask) -> None:
    client = secure.test_client()
    some = str(uuid.uuid4())
    for rule in secure.url_map.iter_rules():
        if rule.endpoint in ("static", "web.static", "health.healthz", "health.readyz",
                             "health.openapi") or rule.endpoint.startswith("openapi_"):
            continue
        path = rule.rule.replace("<image_id>", some).replace("<job_id>", some) \
            .replace("<run_id>", some).replace("<name>", "x")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            resp = client.open(path, method=method)
            assert resp.status_code == 401, (method, path, resp.status_code)


def test_key_cookie_works_for_reads_only(secure: Flask, world: World) -> None:
    client = secure.test_client()
    client.set_cookie(KEY_COOKIE, world.write_a)
    assert client.get(f"/api/v1/images/{world.a_ids[0]}/thumbnail").status_code == 200
    assert client.get("/").status_code == 200
    # A cross-site form would carry the cookie: writes (and search POSTs) need the header.
    resp = client.delete(f"/api/v1/images/{world.a_ids[0]}")
    assert resp.status_code == 401


# ---- 403: scopes --------------------------------------------------------------------------------
def test_read_key_reads_and_searches_but_cannot_write(secure: Flask, world: World,
                                                      photos: list[Path]) -> None:
    client = secure.test_client()
    h = _auth(world.read_a)
    assert client.get(f"/api/v1/images/{world.a_ids[0]}", headers=h).status_code == 200
    found = client.post("/api/v1/search", headers=h, json={"image_id": world.a_ids[0], "k": 3})
    assert found.status_code == 200, found.get_json()
    explained = client.post("/api/v1/explain", headers=h, data={
        "file": (io.BytesIO(photos[0].read_bytes()), "q.jpg"), "result_id": world.a_ids[1],
        "format": "json"}, content_type="multipart/form-data")
    assert explained.status_code == 200, explained.get_data(as_text=True)[:300]
    for resp in (
        _upload(client, photos[5], A, h),
        client.patch(f"/api/v1/images/{world.a_ids[0]}", headers=h, json={"metadata": {}}),
        client.delete(f"/api/v1/images/{world.a_ids[0]}", headers=h),
        client.post("/api/v1/jobs", headers=h, json={"items": [], "collection": A}),
    ):
        assert resp.status_code == 403, resp.get_json()
        assert resp.get_json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/v1/codes", None),
    ("POST", "/api/v1/codes", {"name": "c1", "method": "itq", "bits": 64}),
    ("POST", "/api/v1/evaluations", {"collection": A}),
    ("POST", "/api/v1/graph/rebuild", {"collection": A}),
])
def test_admin_routes_need_admin(secure: Flask, world: World, method: str, path: str,
                                 body: dict[str, Any] | None) -> None:
    client = secure.test_client()
    resp = client.open(path, method=method, headers=_auth(world.write_a), json=body)
    assert resp.status_code == 403, resp.get_json()
    assert client.get("/api/v1/codes", headers=_auth(world.admin)).status_code == 200


def test_admin_sees_every_collection(secure: Flask, world: World) -> None:
    client = secure.test_client()
    for image_id in world.a_ids + world.b_ids:
        assert client.get(f"/api/v1/images/{image_id}",
                          headers=_auth(world.admin)).status_code == 200


# ---- 404: collection isolation ------------------------------------------------------------------
ISOLATED_BY_ID = [
    ("GET", "/api/v1/images/{b}", None),
    ("GET", "/api/v1/images/{b}/file", None),
    ("GET", "/api/v1/images/{b}/thumbnail", None),
    ("PATCH", "/api/v1/images/{b}", {"metadata": {"stolen": True}}),
    ("DELETE", "/api/v1/images/{b}", None),
    ("GET", "/api/v1/images/{b}/related", None),
    ("POST", "/api/v1/search", {"image_id": "{b}", "k": 5}),
    ("GET", "/api/v1/jobs/{job}", None),
    ("GET", "/api/v1/jobs/{job}/items", None),
    ("POST", "/api/v1/jobs/{job}/cancel", None),
    ("GET", "/images/{b}", None),  # the web page of an image
    ("GET", "/api/v1/explain?query_id={a}&result_id={b}&format=json", None),
    ("GET", "/api/v1/explain?query_id={b}&result_id={a}&format=json", None),
]


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str):
        return (value.replace("{b}", world.b_ids[0]).replace("{job}", world.job_b)
                .replace("{a}", world.a_ids[0]))
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("method", "path", "body"), ISOLATED_BY_ID,
                         ids=[f"{m} {p}" for m, p, _ in ISOLATED_BY_ID])
def test_ids_in_other_collections_are_404(secure: Flask, world: World, method: str, path: str,
                                          body: dict[str, Any] | None) -> None:
    client = secure.test_client()
    resp = client.open(_fill(path, world), method=method, headers=_auth(world.write_a),
                       json=_fill(body, world))
    assert resp.status_code == 404, (resp.status_code, resp.get_data(as_text=True)[:300])
    if resp.is_json:  # exactly what an id that exists nowhere gets
        assert resp.get_json()["error"]["code"] in ("not_found", "unknown_model")
    # Nothing changed behind the 404; B's own key still sees its image and job untouched.
    mine = client.get(_fill("/api/v1/images/{b}", world), headers=_auth(world.write_b))
    assert mine.status_code == 200 and mine.get_json()["metadata"] == {"label": "x"}
    assert client.get(_fill("/api/v1/jobs/{job}", world),
                      headers=_auth(world.write_b)).status_code == 200


def test_writes_to_other_collections_are_404(secure: Flask, world: World,
                                             photos: list[Path]) -> None:
    client = secure.test_client()
    resp = _upload(client, photos[6], B, _auth(world.write_a))
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    job = client.post("/api/v1/jobs", headers=_auth(world.write_a),
                      json={"items": [{"path": "/nowhere.jpg"}], "collection": B})
    assert job.status_code == 404, job.get_json()


LISTINGS = [
    ("GET", "/api/v1/images", None),
    ("GET", "/api/v1/images?collection=iso-b", None),
    ("POST", "/api/v1/search", {"image_id": "{a}", "k": 50}),
    ("POST", "/api/v1/search", {"image_id": "{a}", "k": 50, "collection": "iso-b"}),
    ("POST", "/api/v1/search", {"image_id": "{a}", "k": 50, "metric": "l2",
                                "filter": {"label": "x"}}),
    ("GET", "/api/v1/jobs", None),
    ("GET", "/api/v1/jobs?collection=iso-b", None),
    ("GET", "/api/v1/clusters?collection=iso-b&threshold=2", None),
    ("GET", "/api/v1/duplicates?collection=iso-b&threshold=2", None),
    ("GET", "/api/v1/clusters?collection=iso-a&threshold=2", None),
    ("GET", "/api/v1/images/{a}/related?hops=3", None),
    ("GET", "/api/v1/facets", None),
    ("GET", "/api/v1/facets?collection=iso-b", None),
    ("GET", "/api/v1/collections", None),
    ("GET", "/", None),
    ("GET", "/browse?collection=iso-b", None),
]


@pytest.mark.parametrize(("method", "path", "body"), LISTINGS,
                         ids=[f"{m} {p} {b}" for m, p, b in LISTINGS])
def test_listings_show_only_allowed_collections(secure: Flask, world: World, method: str,
                                                path: str, body: dict[str, Any] | None) -> None:
    client = secure.test_client()
    body = {k: (v.replace("{a}", world.a_ids[0]) if isinstance(v, str) else v)
            for k, v in (body or {}).items()} or None
    resp = client.open(path.replace("{a}", world.a_ids[0]), method=method,
                       headers=_auth(world.read_a), json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    text = resp.get_data(as_text=True)
    # A collection the request names may be echoed back; nothing else of B may appear.
    names_b = B in path or B in str(body)
    for hidden in [*world.b_ids, world.job_b, *([] if names_b else [B])]:
        assert hidden not in text, (hidden, text[:500])
    if path == "/api/v1/facets":
        assert resp.get_json()["total"] == len(world.a_ids)
    if path == "/api/v1/images":
        assert {i["collection"] for i in resp.get_json()["items"]} == {A}
    # Admin sees B where it exists (the filter really hides something).
    if method == "POST" and "collection" not in (body or {}):
        every = client.open(path, method=method, headers=_auth(world.admin), json=body)
        assert any(r["collection"] == B for r in every.get_json()["results"])


def test_search_by_photo_sees_only_allowed_collections(secure: Flask, world: World,
                                                        photos: list[Path]) -> None:
    client = secure.test_client()
    # The query is B's own photo: with A's key its exact match must not come back.
    resp = client.post("/api/v1/search", headers=_auth(world.read_a), data={
        "file": (io.BytesIO(photos[2].read_bytes()), "q.jpg"), "query": '{"k": 50}'},
        content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_json()
    assert {r["collection"] for r in resp.get_json()["results"]} == {A}


# ---- open on loopback, required elsewhere -------------------------------------------------------
@pytest.mark.parametrize(("setting", "host", "required"), [
    ("auto", "127.0.0.1", False), ("auto", "::1", False), ("auto", "localhost", False),
    ("auto", "127.0.0.2", False), ("auto", "0.0.0.0", True), ("auto", "192.168.1.5", True),
    ("auto", "::", True), ("auto", None, True), (True, "127.0.0.1", True),
    ("false", "127.0.0.1", False), ("true", None, True),
])
def test_auth_is_required_unless_the_api_listens_on_loopback(setting: Any, host: str | None,
                                                             required: bool) -> None:
    assert auth_required({"AUTH_REQUIRED": setting, "BIND_HOST": host}) is required
    assert is_loopback("127.0.0.1") and not is_loopback("0.0.0.0")


def test_open_on_loopback_and_keys_still_scope(app: Flask, world: World,
                                               photos: list[Path]) -> None:
    client = app.test_client()
    assert app.config["AUTH_ENFORCED"] is False
    assert client.get("/api/v1/images").status_code == 200  # no key needed on loopback
    # A key sent anyway is honoured: its scope and collections apply.
    assert _upload(client, photos[5], A, _auth(world.read_a)).status_code == 403
    resp = client.get(f"/api/v1/images/{world.b_ids[0]}", headers=_auth(world.read_a))
    assert resp.status_code == 404
    assert client.get("/api/v1/images", headers=_auth(world.revoked)).status_code == 401
    # A stale page cookie does not lock a loopback API out (only a header is honoured here).
    client.set_cookie(KEY_COOKIE, world.revoked)
    assert client.get("/api/v1/images").status_code == 200


def test_network_address_without_keys_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError, match="refusing"):
        create_app({**settings, "BIND_HOST": "0.0.0.0", "AUTH_REQUIRED": False})
    assert create_app({**settings, "BIND_HOST": "0.0.0.0"}).config["AUTH_ENFORCED"] is True


# ---- 429 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(settings: dict[str, Any]) -> Flask:
    """Tiny limits counted in the real Redis (per day, so no window ends mid-test)."""
    return create_app({**settings, "BIND_HOST": "0.0.0.0", "RATE_LIMIT_ENABLED": True,
                       "RATE_LIMIT_DEFAULT": "3/day", "RATE_LIMIT_UPLOAD": "1/day"})


def test_requests_over_the_limit_get_429_with_retry_after(limited: Flask) -> None:
    client = limited.test_client()
    first, second = _token(limited, "read", [A]), _token(limited, "read", [A])
    for _ in range(3):
        ok = client.get("/api/v1/images", headers=_auth(first))
        assert ok.status_code == 200 and "Retry-After" not in ok.headers
        assert ok.headers["X-RateLimit-Limit"] == "3"
    resp = client.get("/api/v1/collections", headers=_auth(first))  # the limit spans routes
    assert resp.status_code == 429
    assert resp.get_json() == {"error": {"code": "rate_limited",
                                         "message": resp.get_json()["error"]["message"]}}
    assert 0 < int(resp.headers["Retry-After"]) <= 86400
    # Per key: another key is untouched; health checks are never limited.
    assert client.get("/api/v1/images", headers=_auth(second)).status_code == 200
    for _ in range(5):
        assert client.get("/healthz").status_code == 200


def test_uploads_have_their_own_lower_limit(limited: Flask, photos: list[Path]) -> None:
    client = limited.test_client()
    token = _token(limited, "write", ["rl-up"])
    assert _upload(client, photos[7], "rl-up", _auth(token)).status_code in (200, 202)
    resp = _upload(client, photos[8], "rl-up", _auth(token))
    assert resp.status_code == 429 and resp.get_json()["error"]["code"] == "rate_limited"
    assert "Retry-After" in resp.headers
    # Reads by the same key still have room under the general limit.
    assert client.get("/api/v1/images", headers=_auth(token)).status_code == 200


def test_pages_without_a_key_ask_for_one_and_show_nothing(secure: Flask, world: World) -> None:
    resp = secure.test_client().get("/browse")
    assert resp.status_code == 401 and resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert 'id="key-form"' in page
    assert A not in page and B not in page  # not even the collection names


def test_the_server_says_at_start_up_that_loopback_runs_open(
        app: Flask, secure: Flask, caplog: pytest.LogCaptureFixture) -> None:
    from service.api.auth import announce_auth

    _token(app, "read", [A])
    with caplog.at_level("WARNING"):
        announce_auth(app)
        announce_auth(secure)  # keys exist: nothing to say
    assert [r.getMessage() for r in caplog.records if "authentication is OFF" in r.getMessage()]
    assert not [r for r in caplog.records if "none exists" in r.getMessage()]


def test_openapi_documents_the_key_scheme_and_its_errors(secure: Flask) -> None:
    doc = secure.test_client().get("/openapi.json").get_json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    images = doc["paths"]["/api/v1/images"]["get"]
    assert {"401", "403", "429"} <= set(images["responses"])
    assert {"bearer": []} in images["security"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


def test_an_open_loopback_instance_does_not_throttle_its_user(settings: dict[str, Any]) -> None:
    """Local mode: a script uploading photo after photo must not meet a 429."""
    app = create_app({**settings, "BIND_HOST": "127.0.0.1", "RATE_LIMIT_ENABLED": "auto",
                      "RATE_LIMIT_DEFAULT": "3/day"})
    client = app.test_client()
    assert all(client.get("/api/v1/images?limit=1").status_code == 200 for _ in range(6))
    keyed = create_app({**settings, "BIND_HOST": "0.0.0.0", "RATE_LIMIT_ENABLED": "auto",
                        "RATE_LIMIT_DEFAULT": "3/day"})
    assert keyed.config["RATELIMIT_ENABLED"] is True
