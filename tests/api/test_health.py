"""Liveness, readiness and the generated OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from service.app import create_app
from service.services.ports import free_port


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json()["status"] == "ok"


def test_readyz_ok_with_real_services(client: FlaskClient) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["checks"] == {"database": "ok", "broker": "ok", "model": "ok"}


def test_readyz_fails_when_database_is_down(settings: dict[str, Any]) -> None:
    # A port where no PostgreSQL listens: the same as a database that went away.
    url = f"postgresql://postgres:x@127.0.0.1:{free_port()}/lookalike"
    client = create_app(dict(settings, DATABASE_URL=url)).test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["checks"]["database"].startswith("unreachable")
    assert body["checks"]["broker"] == "ok"


def test_openapi_describes_every_route(app: Any, client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "health.openapi") or rule.rule.startswith("/apidoc"):
            continue
        if rule.endpoint.startswith("web."):  # HTML pages and their static files
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, (path, method)


def test_unknown_route_and_method_are_json_errors(client: FlaskClient) -> None:
    resp = client.get("/api/v1/nothing")
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    resp = client.put("/api/v1/search")
    assert resp.status_code == 405 and resp.get_json()["error"]["code"]
