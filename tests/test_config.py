"""One settings object: typed values from the environment, precedence, and its generated docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service import config
from service.config import PROJECT_ROOT, Settings, load_settings, settings_table


def test_docs_list_every_setting_as_generated() -> None:
    page = (PROJECT_ROOT / "docs" / "settings.md").read_text()
    generated = page.split("<!-- generated: begin -->\n")[1].split("<!-- generated: end -->")[0]
    assert generated == settings_table(), "run: python -m service.config, into docs/settings.md"
    for name in Settings.model_fields:
        assert f"`LOOKALIKE_{name}`" in generated


def test_values_from_the_environment_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_JOB_ITEM_TIMEOUT", "60")
    monkeypatch.setenv("LOOKALIKE_INGEST_ROOTS", '["/srv/photos"]')
    monkeypatch.setenv("LOOKALIKE_RATE_LIMIT_ENABLED", "false")
    monkeypatch.setenv("LOOKALIKE_AUTH_REQUIRED", "true")
    monkeypatch.setenv("LOOKALIKE_CELERY", '{"task_default_queue": "other"}')
    values = load_settings()
    assert values["JOB_ITEM_TIMEOUT"] == 60.0
    assert values["INGEST_ROOTS"] == ["/srv/photos"]
    assert values["RATE_LIMIT_ENABLED"] is False and values["AUTH_REQUIRED"] is True
    assert values["CELERY"] == {"task_default_queue": "other"}
    monkeypatch.setenv("LOOKALIKE_AUTH_REQUIRED", "auto")
    assert load_settings()["AUTH_REQUIRED"] == "auto"


def test_a_bad_value_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_JOB_BATCH_SIZE", "many")
    with pytest.raises(ValidationError, match="JOB_BATCH_SIZE"):
        load_settings()
    monkeypatch.setenv("LOOKALIKE_JOB_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="JOB_BATCH_SIZE"):
        load_settings()


def test_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Overrides, then LOOKALIKE_X, then the plain name, then the embedded services, then none."""
    monkeypatch.setattr(config, "VAR_DIR", tmp_path)
    for name in ("DATABASE_URL", "LOOKALIKE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings()["DATABASE_URL"] is None
    (tmp_path / config.SERVICES_STATE_FILE).write_text(json.dumps(
        {"DATABASE_URL": "postgresql://embedded", "REDIS_URL": "redis://embedded"}))
    assert load_settings()["DATABASE_URL"] == "postgresql://embedded"
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain")
    assert load_settings()["DATABASE_URL"] == "postgresql://plain"
    monkeypatch.setenv("LOOKALIKE_DATABASE_URL", "postgresql://prefixed")
    assert load_settings()["DATABASE_URL"] == "postgresql://prefixed"
    assert load_settings({"DATABASE_URL": "postgresql://given"})["DATABASE_URL"] \
        == "postgresql://given"
    assert load_settings()["REDIS_URL"] == "redis://embedded"


def test_overrides_are_validated_and_flask_keys_pass_through() -> None:
    values = load_settings({"MAX_UPLOAD_BYTES": 1024, "TESTING": True})
    assert values["MAX_UPLOAD_BYTES"] == 1024 and values["TESTING"] is True
    with pytest.raises(ValidationError):
        load_settings({"MAX_UPLOAD_BYTES": "lots"})
