"""The web page where API keys are required: it asks for one, then searches and shows
thumbnails with it, in Debian's headless Chromium against gunicorn and the real worker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from service.auth import service as keys
from service.config import PROJECT_ROOT
from service.db import session_scope
from service.services.ports import free_port
from tests.conftest import worker_env
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, WAIT_MS, _skip_reason

COLLECTION = "web-keys"
pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
              pytest.mark.usefixtures("worker")]


@pytest.fixture(scope="module")
def keyed_server(settings: dict[str, Any],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gunicorn on loopback, told it serves a network address: keys are required."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("keyed") / "gunicorn.log"
    env = {**worker_env(settings), "LOOKALIKE_BIND_HOST": "0.0.0.0"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--threads", "4", "service.wsgi:app"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_page_asks_for_a_key_then_searches_with_it(
        app: Flask, keyed_server: str, photos: list[Path]) -> None:
    from playwright.sync_api import sync_playwright

    with app.app_context(), session_scope() as session:
        token = keys.create_key(session=session, scope="write", collections=[COLLECTION]).token
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{keyed_server}/api/v1/images", timeout=10).status_code == 401
    ids = []
    for path in photos[:3]:
        resp = requests.post(f"{keyed_server}/api/v1/images", headers=auth, timeout=30, files={
            "file": (path.name, path.read_bytes(), "image/jpeg")},
            data={"collection": COLLECTION})
        assert resp.status_code in (200, 202), resp.text
        ids.append(resp.json()["id"])
    deadline = time.monotonic() + 90
    while any(requests.get(f"{keyed_server}/api/v1/images/{i}", headers=auth, timeout=10)
              .json()["status"] == "pending" for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.3)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=DESKTOP, base_url=keyed_server)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            # No key yet: a 401 page with a form, and no collection named anywhere.
            response = page.goto(f"/?collection={COLLECTION}")
            assert response is not None and response.status == 401
            assert "web-keys" not in page.locator("nav").inner_text()
            page.locator("#key-form input[name=key]").fill(token)
            page.locator("#key-form button").click()
            page.wait_for_selector("#query-file", state="attached")  # the search page now
            # A photo search goes through the API with the key; the thumbnails load with it.
            page.locator("#query-file").set_input_files(str(photos[0]))
            page.wait_for_selector("#results .card")
            first = page.eval_on_selector_all("#results .card",
                                              "cards => cards.map(c => c.dataset.id)")[0]
            assert first == ids[0]
            page.wait_for_function("() => { const img = document.querySelector("
                                   "'#results .card img'); return img && img.complete "
                                   "&& img.naturalWidth > 0; }")
        finally:
            context.close()
            browser.close()
