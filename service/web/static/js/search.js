// The search page: a photo (picked, dropped or pasted) or a stored image (?like=<id>) is the
// query; k, model, metric and the filter shape it; "More results" follows the cursor.

import { API, ApiFailure, api } from "./api.js";
import { renderResults } from "./cards.js";
import { $, plural, readK } from "./dom.js";
import { setupFacets } from "./facets.js";
import { clearMessage, plainWords, showMessage } from "./messages.js";

function showQuery(src, alt, caption) {
  const preview = $("#query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = src;
  preview.alt = alt;
  $("#query-caption").textContent = caption;
  $("#query").hidden = false;
}

function readFilter(filterBox) {
  const text = filterBox.value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (exc) {
    throw new ApiFailure("bad_filter_json", exc.message, 400);
  }
}

// Drag and drop onto the zone, paste anywhere; a drop elsewhere must not navigate away.
function acceptFiles(dropzone, setFile) {
  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropzone.classList.add("over");
  });
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setFile(file);
    else showMessage("Nothing to search with: drop an image file.");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
    const image = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
    if (image) {
      event.preventDefault();
      setFile(image.getAsFile());
    } else if (!event.target.closest("input, textarea")) {
      showMessage("The clipboard holds no image. Copy a picture, then paste it here.");
    }
  });
}

export function searchPage() {
  const form = $("#search-form");
  const collection = form.dataset.collection;
  const fileInput = $("#query-file");
  const list = $("#results");
  const status = $("#results-status");
  const more = $("#more-results");
  const filterBox = $("#filter-json");
  const params = new URLSearchParams(location.search);
  const state = {
    file: null, likeId: params.get("like"), cursor: null, shown: 0, busy: false, again: false,
  };

  const hasQuery = () => Boolean(state.file || state.likeId);
  const rerun = () => {
    if (hasQuery()) run();
  };

  function setFile(file) {
    clearMessage();
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showMessage(`“${file.name}” is not an image (${file.type}). Choose a photo instead.`);
      return;
    }
    state.file = file;
    state.likeId = null;
    showQuery(URL.createObjectURL(file), `Your photo: ${file.name || "pasted image"}`,
              file.name || "Pasted image");
    // On a phone the results sit below the controls: bring them into view.
    if (window.matchMedia("(max-width: 799px)").matches) $("#query").scrollIntoView();
    run();
  }

  // The request for this search; the cursor is the API's opaque string, sent back as it came.
  function request(append) {
    const query = { k: readK($("#k"), 24), model: $("#model").value, metric: $("#metric").value };
    if (collection) query.collection = collection;
    const filter = readFilter(filterBox);
    if (filter) query.filter = filter;
    if (append && state.cursor) query.cursor = state.cursor;
    if (state.file) {
      const data = new FormData();
      data.append("file", state.file, state.file.name || "pasted.png");
      data.append("query", JSON.stringify(query));
      return { method: "POST", body: data };
    }
    query.image_id = state.likeId;
    return {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(query),
    };
  }

  function show(body, append) {
    const offset = append ? state.shown : 0;
    const why = state.file ? { file: state.file } : { id: state.likeId };
    renderResults(list, body.results, { append, collection, offset, why });
    state.shown = offset + body.results.length;
    state.cursor = body.next_cursor || null;
    more.hidden = !state.cursor;
    status.textContent = state.shown
      ? `${plural(state.shown, "result")}, best first ` +
        `(${body.model}, ${body.metric}, ${Math.round(body.took_ms)} ms).`
      : "No images match. Try removing a filter or another collection.";
    list.dataset.state = "done";
  }

  async function run(append = false) {
    if (!hasQuery()) {
      status.textContent = "Choose, drop or paste a photo first.";
      return;
    }
    if (state.busy) {
      // A change made while a search runs (a facet ticked, k edited) must not be lost.
      state.again = true;
      return;
    }
    state.busy = true;
    state.again = false;
    form.setAttribute("aria-busy", "true");
    status.textContent = "Searching…";
    clearMessage();
    try {
      show(await api("/search", request(append)), append);
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      showMessage(plainWords(error));
      // Old results under a failed search would read as its answer.
      list.replaceChildren();
      more.hidden = true;
      status.textContent = "The search did not run; see the message above.";
      list.dataset.state = "error";
    } finally {
      state.busy = false;
      form.removeAttribute("aria-busy");
      if (state.again) run();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  more.addEventListener("click", () => run(true));
  fileInput.addEventListener("change", () => setFile(fileInput.files[0]));
  ["k", "model", "metric"].forEach((id) => $("#" + id).addEventListener("change", rerun));
  acceptFiles($("#dropzone"), setFile);
  setupFacets({ collection, filterBox, onChange: rerun });

  if (state.likeId) {
    showQuery(`${API}/images/${encodeURIComponent(state.likeId)}/thumbnail`,
              "The stored image you searched with",
              "A stored image (it is left out of its own results)");
    run();
  }
}
