// The browse page: a collection's images newest first, a page at a time. Each page's cursor
// is kept as the API returned it, so "Previous page" asks for exactly the page seen before.

import { ApiFailure, api } from "./api.js";
import { card } from "./cards.js";
import { $ } from "./dom.js";
import { plainWords, showMessage } from "./messages.js";

export function browsePage() {
  const root = $("#browse");
  const collection = root.dataset.collection;
  const params = new URLSearchParams(location.search);
  const limit = Math.max(1, Math.min(200, parseInt(params.get("limit"), 10) || 24));
  const grid = $("#browse-grid");
  const status = $("#browse-status");
  const prev = $("#prev-page");
  const next = $("#next-page");
  const cursors = [null]; // cursors[i] opens page i + 1
  let page = 0;
  let nextCursor = null;

  async function load() {
    const query = new URLSearchParams({ limit: String(limit) });
    if (collection) query.set("collection", collection);
    if (cursors[page]) query.set("cursor", cursors[page]);
    status.textContent = "Loading…";
    try {
      const body = await api("/images?" + query.toString());
      grid.replaceChildren(...body.items.map((item) => card(item, { collection })));
      nextCursor = body.next_cursor || null;
      status.textContent = body.items.length
        ? `Showing ${page * limit + 1}–${page * limit + body.items.length}, newest first.`
        : "No images here yet. Upload some from the Upload page.";
      $("#page-number").textContent = `Page ${page + 1}`;
      prev.disabled = page === 0;
      next.disabled = !nextCursor;
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      showMessage(plainWords(error));
      status.textContent = "The images could not be loaded.";
    }
  }

  next.addEventListener("click", () => {
    if (!nextCursor) return;
    page += 1;
    cursors[page] = nextCursor;
    load();
  });
  prev.addEventListener("click", () => {
    if (page === 0) return;
    page -= 1;
    load();
  });
  load();
}
