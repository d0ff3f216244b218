"""Each of the page's views in Debian's headless Chromium: search results page by page, range
facets, browse back and forth, a job followed from the upload page, and a walk through every
view that must leave nothing in the console (no JavaScript error, no CSP violation)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.web.test_browser import (  # noqa: F401  (fixtures are found by their names)
    COLLECTION,
    DESKTOP,
    WAIT_MS,
    card_ids,
    card_names,
    labelled,
    page,
    pytestmark,
    seeded,
    shoot,
)

# Chromium reports CSP refusals in the console; this makes sure of it for every directive.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error(`CSP violation: ${event.violatedDirective} blocked ${event.blockedURI}`);
});
"""


def is_search(response: Any) -> bool:
    return response.url.endswith("/api/v1/search") and response.request.method == "POST"


def is_listing(response: Any) -> bool:
    return urlsplit(response.url).path == "/api/v1/images"


def grid_ids(tab: Any, selector: str) -> list[str]:
    return tab.eval_on_selector_all(f"{selector} .card", "cs => cs.map(c => c.dataset.id)")


def jobs_api(base: str) -> None:
    paths = requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    if "/api/v1/jobs" not in paths:
        pytest.skip("the jobs API (POST /api/v1/jobs) is not registered in this app")


def test_more_results_sends_the_cursor_back_unchanged(page: Any,  # noqa: F811
                                                      seeded: dict[str, list[str]]) -> None:  # noqa: F811
    shirt = seeded["Shirt"][0]
    page.goto(f"/?collection={COLLECTION}&like={shirt}")
    page.wait_for_selector("#results .card")
    page.get_by_label("Results (k)").fill("3")
    with page.expect_response(is_search) as answered:
        page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#results .card').length === 3")
    cursor = answered.value.json()["next_cursor"]
    assert isinstance(cursor, str) and cursor
    top = card_ids(page)
    with page.expect_request(lambda r: r.url.endswith("/api/v1/search")) as sent:
        page.get_by_role("button", name="More results").click()
    page.wait_for_function("() => document.querySelectorAll('#results .card').length === 6")
    assert json.loads(sent.value.post_data or "{}")["cursor"] == cursor
    ids = card_ids(page)
    assert ids[:3] == top and len(set(ids)) == 6 and shirt not in ids
    ranks = page.eval_on_selector_all("#results .card .rank", "rs => rs.map(r => r.textContent)")
    assert ranks == [f"#{i}" for i in range(1, 7)]
    assert page.locator("#results-status").inner_text().startswith("6 results, best first")
    shoot(page, "11-more-results")


def test_a_range_facet_filters_and_clear_filters_undoes_it(
        page: Any, seeded: dict[str, list[str]]) -> None:  # noqa: F811
    page.goto(f"/?collection={COLLECTION}&like={seeded['Shirt'][0]}")
    page.wait_for_selector("#results .card")
    assert "Shirt" in card_names(page)
    price = page.locator("[data-facet=price]")
    assert price.get_attribute("data-kind") == "range"
    with page.expect_response(is_search):
        price.get_by_label("From").fill("60")
        price.get_by_label("From").press("Tab")  # a range applies on change, not per keystroke
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card .name')]"
        ".every(n => n.textContent === 'Shoes')")
    assert json.loads(page.locator("#filter-json").input_value()) == {"price": {"$gte": 60}}
    assert len(card_ids(page)) == len(seeded["Shoes"])
    shoot(page, "12-range-facet")
    with page.expect_response(is_search):
        page.get_by_role("button", name="Clear filters").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card .name')]"
        ".some(n => n.textContent === 'Shirt')")
    assert page.locator("#filter-json").input_value() == ""
    assert price.get_by_label("From").input_value() == ""


def test_browse_previous_page_shows_the_first_page_again(
        page: Any, seeded: dict[str, list[str]]) -> None:  # noqa: F811
    with page.expect_response(is_listing) as listed:
        page.goto(f"/browse?collection={COLLECTION}&limit=3")
    cursor = listed.value.json()["next_cursor"]
    page.wait_for_selector("#browse-grid .card")
    first = grid_ids(page, "#browse-grid")
    assert len(first) == 3 and page.get_by_role("button", name="Previous page").is_disabled()
    with page.expect_request(lambda r: urlsplit(r.url).path == "/api/v1/images") as sent:
        page.get_by_role("button", name="Next page").click()
    page.wait_for_function("() => document.querySelector('#page-number').textContent === 'Page 2'")
    assert parse_qs(urlsplit(sent.value.url).query)["cursor"] == [cursor]
    assert not set(grid_ids(page, "#browse-grid")) & set(first)
    assert page.locator("#browse-status").inner_text().startswith("Showing 4–6")
    page.get_by_role("button", name="Previous page").click()
    page.wait_for_function("() => document.querySelector('#page-number').textContent === 'Page 1'")
    assert grid_ids(page, "#browse-grid") == first
    assert page.get_by_role("button", name="Previous page").is_disabled()


def test_the_jobs_view_lists_and_follows_a_job_started_elsewhere(
        page: Any, live_server: str, clothing: Path, tmp_path: Path) -> None:  # noqa: F811
    jobs_api(live_server)
    collection = "web-e2e-jobs"
    archive = tmp_path / "hats.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in labelled(clothing, "Hat", 3, skip=4):
            zf.write(path, path.name)
    with archive.open("rb") as f:
        resp = requests.post(f"{live_server}/api/v1/jobs", timeout=30, data={
            "collection": collection}, files={"file": ("hats.zip", f, "application/zip")})
    assert resp.status_code in (200, 201, 202), resp.text
    job_id = resp.json()["id"]

    page.goto(f"/upload?collection={collection}")
    row = page.locator(f'#job-list li.job[data-id="{job_id}"]')
    row.wait_for()
    assert page.locator("#jobs-status").is_hidden()
    page.locator(f'#job-list li[data-id="{job_id}"][data-state="done"]').wait_for(timeout=60_000)
    assert "3 of 3" in row.inner_text()
    assert row.locator("progress").evaluate("bar => bar.value === bar.max")
    link = row.get_by_role("link", name=f"Browse “{collection}”")
    assert link.get_attribute("href") == f"/browse?collection={collection}"
    assert row.get_by_role("button", name="Cancel").count() == 0
    shoot(page, "13-job-listed-done")


@pytest.fixture()
def watched(page: Any, live_server: str) -> Iterator[tuple[Any, list[str]]]:  # noqa: F811
    """A fresh tab whose console errors, warnings about CSP and uncaught errors are collected."""
    context = page.context.browser.new_context(viewport=DESKTOP, base_url=live_server)
    context.add_init_script(script=REPORT_VIOLATIONS)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    problems: list[str] = []

    def on_console(message: Any) -> None:
        text = message.text
        if message.type == "error" or "Content Security Policy" in text:
            problems.append(f"console.{message.type}: {text} at {message.location}")

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    try:
        yield tab, problems
    finally:
        context.close()


def walk_every_view(tab: Any, clothing: Path) -> None:
    """Search, open an image, browse and upload as a person would."""
    # Search with a photo; ask why the best match matched.
    tab.goto(f"/?collection={COLLECTION}")
    tab.wait_for_selector("[data-facet=label] input")
    tab.locator("#query-file").set_input_files(str(labelled(clothing, "Shoes", 1)[0]))
    tab.wait_for_selector("#results .card")
    tab.locator("#results .card .why").first.click()
    tab.locator("#results .why-figure img").wait_for()
    # Open the first result: the image page, its similar, related and duplicate images.
    tab.locator("#results .card a").first.click()
    tab.wait_for_selector("#detail")
    tab.get_by_role("button", name="More like this").click()
    tab.wait_for_selector("#results .card")
    if tab.locator("#related").count():
        tab.wait_for_selector("#related[data-state=done]", state="attached")
        tab.get_by_role("button", name="Find duplicates").click()
        tab.wait_for_selector("#duplicates[data-state=done]", state="attached")
    # Browse two pages.
    tab.goto(f"/browse?collection={COLLECTION}&limit=4")
    tab.wait_for_selector("#browse-grid .card")
    tab.get_by_role("button", name="Next page").click()
    tab.wait_for_function("() => document.querySelector('#page-number').textContent === 'Page 2'")
    # Upload a photo and follow it until it can be searched; the jobs list loads beside it.
    tab.goto("/upload?collection=web-e2e-console")
    tab.get_by_label("Images", exact=True).set_input_files(
        str(labelled(clothing, "Hat", 1, skip=8)[0]))
    tab.get_by_role("button", name="Upload", exact=True).click()
    tab.locator('#upload-list li[data-state="ready"]').wait_for(timeout=60_000)
    if tab.locator("#archive-form").count():
        tab.wait_for_function("() => document.querySelector('#jobs-status').textContent"
                              " !== 'Loading jobs…'")


def test_no_javascript_error_or_csp_violation_in_any_view(
        watched: tuple[Any, list[str]], seeded: dict[str, list[str]],  # noqa: F811
        clothing: Path) -> None:
    tab, problems = watched
    try:
        walk_every_view(tab, clothing)
    finally:
        # Also when a step timed out: the console usually says why the view never appeared.
        assert problems == [], "\n".join(problems)
