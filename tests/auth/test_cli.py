"""`lookalike keys create|list|revoke`, the start-up rule of `lookalike run`, and the ingest
client sending $LOOKALIKE_API_KEY, against the real database."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import click
import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.serving import make_server

from service.app import create_app
from service.auth import service as keys
from service.auth.models import ApiKey
from service.cli.ingest import JobsClient
from service.cli.serve import _check_auth
from service.config import PROJECT_ROOT
from service.db import session_scope


def lookalike(settings: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": settings["DATABASE_URL"]}
    return subprocess.run([sys.executable, "-m", "service.cli", "keys", *args], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_create_prints_the_token_once_list_never_shows_it_revoke_stops_it(
        app: Flask, settings: dict[str, Any]) -> None:
    created = lookalike(settings, "create", "--scope", "write", "--collections", "cli-a,cli-b",
                        "--name", "from-cli")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("lk_") and token.count("_") >= 2
    prefix, secret = token.split("_", 2)[1:]
    with app.app_context(), session_scope() as session:
        principal = keys.authenticate(token, session=session)
        assert principal.scope == "write"
        assert principal.collections == frozenset({"cli-a", "cli-b"})
    listed = lookalike(settings, "list")
    assert listed.returncode == 0 and prefix in listed.stdout and "from-cli" in listed.stdout
    assert secret not in listed.stdout + listed.stderr + created.stderr
    revoked = lookalike(settings, "revoke", prefix)
    assert revoked.returncode == 0 and prefix in revoked.stdout
    with app.app_context(), session_scope() as session:
        with pytest.raises(keys.Unauthorized):
            keys.authenticate(token, session=session)
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        assert row is not None and row.revoked_at is not None
    assert "revoked" in lookalike(settings, "list").stdout


def test_create_refuses_a_scoped_key_without_collections(settings: dict[str, Any]) -> None:
    result = lookalike(settings, "create", "--scope", "read")
    assert result.returncode != 0 and "--collections" in result.stderr
    assert lookalike(settings, "revoke", "no-such-key").returncode != 0


def test_run_refuses_a_network_address_without_keys(settings: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    env: dict[str, str] = {}
    with pytest.raises(click.ClickException, match="refusing"):
        _check_auth({**settings, "AUTH_REQUIRED": False}, env, "0.0.0.0")
    _check_auth({**settings, "AUTH_REQUIRED": "auto"}, env, "127.0.0.1")
    assert env["LOOKALIKE_BIND_HOST"] == "127.0.0.1"
    assert "API keys are OFF" in capsys.readouterr().err
    _check_auth({**settings, "AUTH_REQUIRED": "auto"}, env, "0.0.0.0")  # keys required: runs
    assert env["LOOKALIKE_BIND_HOST"] == "0.0.0.0"


@pytest.fixture
def secure_url(settings: dict[str, Any]) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, create_app({**settings, "BIND_HOST": "0.0.0.0"}),
                         threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_ingest_client_sends_the_key_from_the_environment(
        app: Flask, secure_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with app.app_context(), session_scope() as session:
        token = keys.create_key(session=session, scope="read", collections=["cli-c"]).token
    missing = str(uuid.uuid4())
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    with pytest.raises(Exception, match="401"):
        JobsClient(secure_url).job(missing)
    monkeypatch.setenv("LOOKALIKE_API_KEY", token)
    with pytest.raises(Exception, match="404"):  # authenticated: the job simply does not exist
        JobsClient(secure_url).job(missing)
