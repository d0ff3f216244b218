"""The "why?" link under a result shows the match explanation."""

from __future__ import annotations

from typing import Any

from tests.web.test_browser import (  # noqa: F401  (fixtures are found by their names)
    COLLECTION,
    card_ids,
    page,
    pytestmark,
    seeded,
    shoot,
)


def test_why_shows_a_heatmap_and_shared_classes(page: Any,  # noqa: F811
                                                seeded: dict[str, list[str]]) -> None:  # noqa: F811
    shoe = seeded["Shoes"][0]
    page.goto(f"/?collection={COLLECTION}&like={shoe}")
    page.wait_for_selector("#results .card")
    first = card_ids(page)[0]
    assert first != shoe
    page.locator("#results .card .why").first.click()
    figure = page.locator(f'#results .card[data-id="{first}"] .why-figure')
    figure.wait_for()
    assert figure.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    assert figure.locator("figcaption").inner_text().startswith(("Both look like", "No shared"))
    shoot(page, "10-why-heatmap")
