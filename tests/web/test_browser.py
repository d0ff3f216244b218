"""The web page end to end: gunicorn + the real worker, driven in Debian's headless Chromium."""

from __future__ import annotations

import csv
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.config import PROJECT_ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "web"
COLLECTION = "web-e2e"
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 30_000


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return ("Debian's chromium is not at /usr/bin/chromium: `make test` installs it when run "
                "as root (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[dev]'"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
              pytest.mark.usefixtures("worker")]


def labelled(clothing: Path, label: str, count: int, skip: int = 0) -> list[Path]:
    """The first photos with this label in the shared dataset."""
    with (clothing / "labels.csv").open() as f:
        rows = [r["file"] for r in csv.DictReader(f) if r["label"] == label]
    return [clothing / name for name in rows[skip:skip + count]]


def wait_ready(base: str, image_id: str, timeout: float = 60.0) -> None:
    """Poll the API until the worker has embedded the image."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/api/v1/images/{image_id}", timeout=10).json()["status"]
        if status != "pending":
            assert status == "ready"
            return
        time.sleep(0.2)
    raise AssertionError(f"{image_id} not embedded after {timeout}s")


@pytest.fixture(scope="module")
def seeded(live_server: str, clothing: Path) -> dict[str, list[str]]:
    """Shirts and shoes with metadata in one collection, embedded by the worker."""
    ids: dict[str, list[str]] = {}
    for label, price in (("Shirt", 20), ("Shoes", 60)):
        for i, path in enumerate(labelled(clothing, label, 5, skip=1)):
            with path.open("rb") as f:
                resp = requests.post(f"{live_server}/api/v1/images", timeout=30, files={
                    "file": (path.name, f, "image/jpeg")}, data={
                    "collection": COLLECTION,
                    "metadata": f'{{"label": "{label}", "price": {price + i}}}'})
            assert resp.status_code in (200, 202), resp.text
            ids.setdefault(label, []).append(resp.json()["id"])
    for image_id in sum(ids.values(), []):
        wait_ready(live_server, image_id)
    return ids


@pytest.fixture(scope="module")
def page(live_server: str) -> Iterator[Any]:
    """A desktop-sized page in Debian's Chromium (Playwright gives it a fresh profile)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=DESKTOP, base_url=live_server)
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        yield tab
        context.close()
        browser.close()


def shoot(page: Any, name: str, *, phone: bool = False) -> None:
    """A full-page screenshot under test-artifacts/web/ (at phone width when asked)."""
    if phone:
        page.set_viewport_size(PHONE)
    page.evaluate("window.scrollTo(0, 0)")  # the sticky controls follow the scroll position
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if phone:
        page.set_viewport_size(DESKTOP)


def card_ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")


def card_names(page: Any) -> list[str]:
    return page.eval_on_selector_all("#results .card .name", "ns => ns.map(n => n.textContent)")


def test_upload_search_filter_and_more_like_this(page: Any, seeded: dict[str, list[str]],
                                                 clothing: Path) -> None:
    query_photo = labelled(clothing, "Shirt", 1)[0]

    # 1. Upload one photo with metadata through the Upload page; it becomes ready.
    page.goto(f"/upload?collection={COLLECTION}")
    page.get_by_label("Images", exact=True).set_input_files(str(query_photo))
    page.get_by_label("Metadata (a JSON object, optional)").fill('{"label": "Shirt", "price": 19}')
    page.get_by_role("button", name="Upload", exact=True).click()
    row = page.locator('#upload-list li[data-state="ready"]')
    row.wait_for()
    uploaded = row.get_attribute("data-id")
    assert uploaded and "Ready to search" in row.inner_text()
    shoot(page, "01-upload-ready")

    # 2. Search with the same photo (file picker): it comes first, then the other shirts.
    page.goto(f"/?collection={COLLECTION}")
    page.wait_for_selector("[data-facet=label] input")  # facets loaded
    page.get_by_label("Results (k)").fill("8")
    page.locator("#query-file").set_input_files(str(query_photo))
    page.wait_for_selector("#results .card")
    assert card_ids(page)[0] == uploaded
    first_score = float(page.locator("#results .card .score").first.inner_text().split()[-1])
    assert first_score > 0.99
    assert page.locator("#query-preview").is_visible()
    shoot(page, "02-search-results")
    shoot(page, "02-search-results-phone", phone=True)

    # 3. A facet becomes the filter: only shoes remain, so the grid changes.
    before = card_ids(page)
    page.locator("[data-facet=label] label", has_text="Shoes").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card .name')]"
        ".every(n => n.textContent === 'Shoes')")
    after = card_ids(page)
    assert after != before and uploaded not in after
    assert set(card_names(page)) == {"Shoes"} and len(after) == len(seeded["Shoes"])
    assert '"label":"Shoes"' in page.locator("#filter-json").input_value()
    shoot(page, "03-filtered-shoes")

    # 4. Click a result: its detail page; "More like this" searches by its id.
    clicked = after[0]
    page.locator("#results .card a").first.click()
    page.wait_for_url(f"**/images/{clicked}*")
    assert page.locator("figure img").evaluate("img => img.complete && img.naturalWidth > 0")
    page.get_by_role("button", name="More like this").click()
    page.wait_for_selector("#results .card")
    similar = card_ids(page)
    assert clicked not in similar and len(similar) >= 5
    # Its nearest neighbours are the other shoes.
    assert set(card_names(page)[:3]) == {"Shoes"}
    # The graph sections answer in words whether or not there is anything to show.
    page.wait_for_selector("#related[data-state=done]", state="attached")
    assert page.locator("#related-status").inner_text() != "Loading related images…"
    page.get_by_role("button", name="Find duplicates").click()
    page.wait_for_selector("#duplicates[data-state=done]", state="attached")
    assert "duplicate" in page.locator("#duplicates-status").inner_text()
    shoot(page, "04-detail-more-like-this")
    shoot(page, "04-detail-more-like-this-phone", phone=True)


def test_drop_and_paste_search(page: Any, seeded: dict[str, list[str]],
                               clothing: Path) -> None:
    shoe = labelled(clothing, "Shoes", 1, skip=1)[0]  # stored as seeded["Shoes"][0]
    page.goto(f"/?collection={COLLECTION}")
    data = list(shoe.read_bytes())
    make_file = ("(bytes) => { const dt = new DataTransfer();"
                 " dt.items.add(new File([new Uint8Array(bytes)], 'shoe.jpg',"
                 " {type: 'image/jpeg'})); return dt; }")
    dt = page.evaluate_handle(make_file, data)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
    page.wait_for_selector("#results .card")
    assert card_ids(page)[0] == seeded["Shoes"][0]

    page.evaluate("() => document.querySelector('#results').replaceChildren()")
    page.evaluate("(dt) => document.dispatchEvent(new ClipboardEvent('paste',"
                  " {clipboardData: dt, bubbles: true}))", dt)
    page.wait_for_selector("#results .card")
    assert card_ids(page)[0] == seeded["Shoes"][0]
    assert page.locator("#query-caption").inner_text() == "shoe.jpg"


def test_errors_are_plain_words(page: Any, seeded: dict[str, list[str]],
                                clothing: Path) -> None:
    page.goto(f"/?collection={COLLECTION}")
    # A file that claims to be a JPEG but is not: the server refuses it, the page says why.
    page.locator("#query-file").set_input_files(
        files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"just some text"}])
    message = page.get_by_role("alert")
    message.wait_for()
    assert "not an image Lookalike can read" in message.inner_text()
    shoot(page, "05-error-not-an-image")

    # A filter the API rejects: the message names the offending part.
    page.locator("#query-file").set_input_files(str(labelled(clothing, "Shirt", 1)[0]))
    page.wait_for_selector("#results .card")
    page.locator("#filter-details summary").click()
    page.locator("#filter-json").fill('{"price": {"$gt": [1]}}')
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_selector("#results[data-state=error]", state="attached")
    text = message.inner_text()
    assert "The filter was not accepted" in text and "filter.price.$gt" in text
    shoot(page, "06-error-bad-filter")

    # An image that does not exist: an HTML page with a way back, not JSON.
    page.goto("/images/00000000-0000-0000-0000-000000000000")
    assert page.get_by_role("heading", name="Not found").is_visible()


def test_browse_pages_and_switch_collection(page: Any, seeded: dict[str, list[str]]) -> None:
    page.goto(f"/browse?collection={COLLECTION}&limit=4")
    # The first Tab lands on the skip link, which shows itself when focused.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    assert page.locator(".skip").bounding_box()["x"] >= 0
    page.wait_for_selector("#browse-grid .card")
    first = page.eval_on_selector_all("#browse-grid .card", "cs => cs.map(c => c.dataset.id)")
    assert len(first) == 4
    page.get_by_role("button", name="Next page").click()
    page.wait_for_function("() => document.querySelector('#page-number').textContent === 'Page 2'")
    second = page.eval_on_selector_all("#browse-grid .card", "cs => cs.map(c => c.dataset.id)")
    assert len(second) == 4 and not set(first) & set(second)
    shoot(page, "07-browse-page-2")
    shoot(page, "07-browse-page-2-phone", phone=True)
    # Keyboard only: focus the collection switcher, pick "All collections", press Switch.
    page.get_by_label("Collection").select_option("")
    page.get_by_role("button", name="Switch").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => !location.search.includes('web-e2e')")
    assert page.get_by_role("heading", name="Browse all collections").is_visible()


def test_archive_ingestion_shows_progress_until_done(page: Any, live_server: str,
                                                    clothing: Path, tmp_path: Path) -> None:
    paths = requests.get(f"{live_server}/openapi.json", timeout=10).json()["paths"]
    if "/api/v1/jobs" not in paths:
        pytest.skip("the jobs API (POST /api/v1/jobs) is not registered in this app")
    hats = labelled(clothing, "Hat", 4)
    archive = tmp_path / "hats.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in hats:
            zf.write(path, f"hats/{path.name}")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("file,label\n" + "".join(f"hats/{p.name},Hat\n" for p in hats))

    page.goto("/upload?collection=web-e2e-archive")
    page.locator("#archive-file").set_input_files(str(archive))
    page.locator("#archive-metadata").set_input_files(str(metadata))
    page.get_by_role("button", name="Start ingestion").click()
    job = page.locator("#job-list li.job").first
    job.wait_for()
    page.locator('#job-list li[data-state="done"]').wait_for(timeout=60_000)
    assert "4 of 4" in job.inner_text()
    assert job.locator("progress").evaluate("bar => bar.value === bar.max")
    shoot(page, "08-archive-job-done")
    shoot(page, "08-archive-job-done-phone", phone=True)
    listed = requests.get(f"{live_server}/api/v1/images?collection=web-e2e-archive",
                          timeout=10).json()["items"]
    assert len(listed) == 4 and {i["metadata"].get("label") for i in listed} == {"Hat"}
