// Lookalike's page: plain JavaScript over the JSON API (/api/v1), no build step.
"use strict";

(function () {
  const API = "/api/v1";
  // Filter keys that name real columns must be spelled "metadata.<key>" (docs/search.md).
  const COLUMNS = new Set(["collection", "status", "created_at", "id"]);
  const POLL_MS = 500;

  const $ = (selector, root = document) => root.querySelector(selector);

  class ApiFailure extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  // Issue 9: where the API requires keys, the page keeps one in a cookie (so that page loads
  // and <img> thumbnails carry it) and sends it as a bearer header on every API call (the
  // server accepts the cookie alone only for reads).
  const KEY_COOKIE = "lookalike_key";

  function storedKey() {
    const match = document.cookie.match(new RegExp("(?:^|; )" + KEY_COOKIE + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : "";
  }

  function storeKey(key) {
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; Path=/; SameSite=Strict${secure}`;
  }

  async function api(path, options = {}, retried = false) {
    let response;
    const key = storedKey();
    const sent = key
      ? { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } }
      : options;
    try {
      response = await fetch(API + path, sent);
    } catch (_) {
      throw new ApiFailure("network", "", 0);
    }
    if (response.status === 401 && !retried) {
      const entered = window.prompt("This Lookalike needs an API key (lk_…):", "");
      if (entered) {
        storeKey(entered.trim());
        return api(path, options, true);
      }
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null; // A proxy's HTML error page, say: reported by status below.
    }
    if (!response.ok) {
      const error = body && body.error ? body.error : { code: "http_error", message: "" };
      throw new ApiFailure(error.code, error.message || "", response.status);
    }
    return body;
  }

  const keyForm = $("#key-form");
  if (keyForm) {
    keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      storeKey(new FormData(keyForm).get("key").trim());
      location.reload();
    });
  }

  // What an error means, in plain words; the server's own message adds the detail.
  function plainWords(error) {
    const detail = error.message ? ` (${error.message})` : "";
    switch (error.code) {
      case "not_an_image":
      case "corrupt_image":
      case "invalid_image":
        return "That file is not an image Lookalike can read. Use a JPEG, PNG, WebP, GIF, BMP or TIFF photo" + detail + ".";
      case "empty_file":
        return "That file is empty. Choose a photo with something in it.";
      case "image_too_large":
      case "payload_too_large":
        return "That file is too large to upload" + detail + ".";
      case "invalid_filter":
        return "The filter was not accepted: " + error.message + ". Fix it or clear the filters.";
      case "bad_filter_json":
        return "The filter is not valid JSON: " + error.message + ".";
      case "invalid_metadata":
        return "The metadata was not accepted: " + error.message + ".";
      case "unknown_model":
        return "No images have been processed with that model yet. Pick another model" + detail + ".";
      case "not_ready":
        return "This image is still being processed. Try again in a few seconds.";
      case "not_found":
        return "That image no longer exists.";
      case "network":
        return "Could not reach the server. Check the connection and try again.";
      default:
        if (error.status >= 500) {
          return "Something went wrong on the server (status " + error.status + "). Try again in a moment.";
        }
        return error.message || "That did not work (status " + error.status + ").";
    }
  }

  function showMessage(text, kind = "error") {
    const box = $("#message");
    if (!box) return;
    box.textContent = text;
    box.className = "message " + kind;
    box.hidden = false;
  }

  function clearMessage() {
    const box = $("#message");
    if (box) {
      box.hidden = true;
      box.textContent = "";
    }
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function formatValue(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // A short name for an image: its label (or title, name), else its file name.
  function nameOf(item) {
    const meta = item.metadata || {};
    for (const key of ["label", "title", "name", "category"]) {
      if (typeof meta[key] === "string" && meta[key]) return meta[key];
    }
    return item.filename || "Image";
  }

  function metaLine(meta) {
    return Object.entries(meta || {})
      .filter(([, v]) => v === null || typeof v !== "object")
      .slice(0, 3)
      .map(([k, v]) => `${k}: ${formatValue(v)}`)
      .join(" · ");
  }

  // Issue 10: "why?" under a result fetches the match explanation: a heatmap PNG over the
  // result, with the classes both images share in a header.
  async function explainMatch(resultId, source) {
    const key = storedKey();
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    let response;
    try {
      if (source.file) {
        const data = new FormData();
        data.append("file", source.file, source.file.name || "pasted.png");
        data.append("result_id", resultId);
        response = await fetch(`${API}/explain`, { method: "POST", body: data, headers });
      } else {
        const query = `query_id=${encodeURIComponent(source.id)}` +
          `&result_id=${encodeURIComponent(resultId)}`;
        response = await fetch(`${API}/explain?${query}`, { headers });
      }
    } catch (_) {
      throw new ApiFailure("network", "", 0);
    }
    if (!response.ok) throw new ApiFailure("explain_failed", "", response.status);
    let classes = [];
    try {
      classes = JSON.parse(response.headers.get("X-Match-Classes") || "[]");
    } catch (_) {
      classes = [];
    }
    return { url: URL.createObjectURL(await response.blob()), classes };
  }

  function whyButton(item, name, source) {
    const button = el("button", { type: "button", class: "why", text: "why?" });
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const { url, classes } = await explainMatch(item.id, source);
        const shared = classes.slice(0, 3)
          .map(([label, score]) => `${label} ${Math.round(score * 100)}%`).join(", ");
        button.replaceWith(el("figure", { class: "why-figure" },
          el("img", { src: url, alt: `Where ${name} matches the query (bright = similar)` }),
          el("figcaption", { class: "meta muted",
                             text: shared ? `Both look like: ${shared}` : "No shared class" })));
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        button.disabled = false;
        button.textContent = "why? (failed, retry)";
      }
    });
    return button;
  }

  // One result or browse card; everything goes through textContent, never innerHTML.
  function card(item, { rank = null, collection = "", why = null } = {}) {
    const name = nameOf(item);
    const href = `/images/${encodeURIComponent(item.id)}` +
      (collection ? `?collection=${encodeURIComponent(collection)}` : "");
    const hops = item.hops !== undefined
      ? `${item.hops} hop${item.hops === 1 ? "" : "s"}, distance ${item.distance.toFixed(3)}` : "";
    let alt = `${name}, ${item.status || "stored"}`;
    if (rank !== null) alt = `Result ${rank}: ${name}, score ${item.score.toFixed(3)}`;
    else if (hops) alt = `${name}, ${hops}`;
    const img = el("img", {
      src: `${API}/images/${encodeURIComponent(item.id)}/thumbnail`, alt, loading: "lazy",
      width: 256, height: 256,
    });
    const body = el("div", { class: "card-body" });
    if (rank !== null) {
      body.append(el("p", { class: "score" },
        el("span", { class: "rank", text: `#${rank}` }), ` score ${item.score.toFixed(3)}`));
    } else if (hops) {
      body.append(el("p", { class: "score", text: hops }));
    } else if (item.status) {
      body.append(el("p", {}, el("span", { class: `badge badge-${item.status}`, text: item.status })));
    }
    body.append(el("p", { class: "name", text: name }));
    const line = metaLine(item.metadata);
    if (line) body.append(el("p", { class: "meta muted", text: line }));
    if (item.collection && !collection) {
      body.append(el("p", { class: "meta muted", text: `in ${item.collection}` }));
    }
    return el("li", { class: "card", "data-id": item.id },
      el("a", { href, class: "card-link" }, img, body),
      rank !== null && why ? whyButton(item, name, why) : null);
  }

  function renderResults(list, hits,
                         { append = false, collection = "", offset = 0, why = null } = {}) {
    if (!append) list.replaceChildren();
    hits.forEach((hit, i) => list.append(card(hit, { rank: offset + i + 1, collection, why })));
  }

  // ---------------------------------------------------------------- search page
  function searchPage() {
    const form = $("#search-form");
    const collection = form.dataset.collection;
    const fileInput = $("#query-file");
    const dropzone = $("#dropzone");
    const list = $("#results");
    const status = $("#results-status");
    const more = $("#more-results");
    const filterBox = $("#filter-json");
    const params = new URLSearchParams(location.search);
    const state = {
      file: null, likeId: params.get("like"), cursor: null, shown: 0, busy: false, again: false,
    };

    function hasQuery() {
      return Boolean(state.file || state.likeId);
    }

    function setFile(file) {
      clearMessage();
      if (!file) return;
      if (file.type && !file.type.startsWith("image/")) {
        showMessage(`“${file.name}” is not an image (${file.type}). Choose a photo instead.`);
        return;
      }
      state.file = file;
      state.likeId = null;
      const preview = $("#query-preview");
      if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
      preview.src = URL.createObjectURL(file);
      preview.alt = `Your photo: ${file.name || "pasted image"}`;
      $("#query-caption").textContent = file.name || "Pasted image";
      $("#query").hidden = false;
      // On a phone the results sit below the controls: bring them into view.
      if (window.matchMedia("(max-width: 799px)").matches) $("#query").scrollIntoView();
      run();
    }

    function readFilter() {
      const text = filterBox.value.trim();
      if (!text) return null;
      try {
        return JSON.parse(text);
      } catch (exc) {
        throw new ApiFailure("bad_filter_json", exc.message, 400);
      }
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
        const query = {
          k: Math.max(1, Math.min(1000, parseInt($("#k").value, 10) || 24)),
          model: $("#model").value,
          metric: $("#metric").value,
        };
        if (collection) query.collection = collection;
        const filter = readFilter();
        if (filter) query.filter = filter;
        if (append && state.cursor) query.cursor = state.cursor;
        let options;
        if (state.file) {
          const data = new FormData();
          data.append("file", state.file, state.file.name || "pasted.png");
          data.append("query", JSON.stringify(query));
          options = { method: "POST", body: data };
        } else {
          query.image_id = state.likeId;
          options = {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify(query),
          };
        }
        const body = await api("/search", options);
        const offset = append ? state.shown : 0;
        const why = state.file ? { file: state.file } : { id: state.likeId };
        renderResults(list, body.results, { append, collection, offset, why });
        state.shown = offset + body.results.length;
        state.cursor = body.next_cursor || null;
        more.hidden = !state.cursor;
        status.textContent = state.shown
          ? `${state.shown} result${state.shown === 1 ? "" : "s"}, best first ` +
            `(${body.model}, ${body.metric}, ${Math.round(body.took_ms)} ms).`
          : "No images match. Try removing a filter or another collection.";
        list.dataset.state = "done";
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
    ["k", "model", "metric"].forEach((id) => $("#" + id).addEventListener("change", () => {
      if (hasQuery()) run();
    }));

    // Drag and drop onto the zone; a drop elsewhere must not navigate away to the file.
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

    // ---- facets -> filter
    const facetList = $("#facet-list");
    const facetStatus = $("#facets-status");

    function filterKey(key) {
      return COLUMNS.has(key) ? `metadata.${key}` : key;
    }

    function facetsToFilter() {
      const filter = {};
      for (const group of facetList.querySelectorAll("[data-facet]")) {
        const key = filterKey(group.dataset.facet);
        if (group.dataset.kind === "values") {
          const chosen = Array.from(group.querySelectorAll("input:checked"))
            .map((box) => JSON.parse(box.dataset.value));
          if (chosen.length === 1) filter[key] = chosen[0];
          else if (chosen.length > 1) filter[key] = { $in: chosen };
        } else {
          const isDate = group.dataset.type === "date";
          const read = (input) => {
            if (!input.value) return null;
            return isDate ? input.value : Number(input.value);
          };
          const lo = read(group.querySelector("[data-bound=min]"));
          const hi = read(group.querySelector("[data-bound=max]"));
          const condition = {};
          if (lo !== null) condition.$gte = lo;
          if (hi !== null) condition.$lte = hi;
          if (Object.keys(condition).length) filter[key] = condition;
        }
      }
      filterBox.value = Object.keys(filter).length ? JSON.stringify(filter) : "";
      if (hasQuery()) run();
    }

    function facetGroup(facet, index) {
      const legend = el("legend", {},
        facet.key, el("span", { class: "muted", text: ` (${facet.count})` }));
      const group = el("fieldset", {
        class: "facet", "data-facet": facet.key, "data-kind": facet.kind, "data-type": facet.type,
      }, legend);
      if (facet.kind === "values") {
        facet.values.forEach((v, j) => {
          const id = `facet-${index}-${j}`;
          const box = el("input", { type: "checkbox", id, "data-value": JSON.stringify(v.value) });
          group.append(el("div", { class: "check" }, box,
            el("label", { for: id }, formatValue(v.value),
              el("span", { class: "count", text: ` ${v.count}` }))));
        });
      } else {
        const type = facet.type === "date" ? "date" : "number";
        const bound = (which, value) => {
          const id = `facet-${index}-${which}`;
          const shown = type === "date" ? String(value).slice(0, 10) : value;
          const input = el("input", {
            id, type, "data-bound": which, placeholder: String(shown), step: type === "number" ? "any" : null,
          });
          return el("div", { class: "field" },
            el("label", { for: id, text: which === "min" ? "From" : "To" }), input);
        };
        group.append(el("div", { class: "range" }, bound("min", facet.min), bound("max", facet.max)));
        group.append(el("p", { class: "muted small",
          text: `${formatValue(facet.min)} to ${formatValue(facet.max)}` }));
      }
      return group;
    }

    async function loadFacets() {
      try {
        const query = collection ? `?collection=${encodeURIComponent(collection)}` : "";
        const body = await api("/facets" + query);
        const usable = body.facets.filter((f) => f.kind !== "none");
        facetList.replaceChildren(...usable.map(facetGroup));
        facetStatus.textContent = usable.length
          ? (body.sampled ? `Counted over the newest ${body.scanned} of ${body.total} images.` : "")
          : "These images have no metadata to filter on.";
        facetStatus.hidden = !facetStatus.textContent;
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        facetStatus.textContent = "Filters could not be loaded: " + plainWords(error);
      }
    }

    facetList.addEventListener("change", facetsToFilter);
    filterBox.addEventListener("change", () => {
      if (hasQuery()) run();
    });
    $("#clear-filters").addEventListener("click", () => {
      facetList.querySelectorAll("input").forEach((input) => {
        if (input.type === "checkbox") input.checked = false;
        else input.value = "";
      });
      facetsToFilter();
    });

    loadFacets();
    if (state.likeId) {
      const preview = $("#query-preview");
      preview.src = `${API}/images/${encodeURIComponent(state.likeId)}/thumbnail`;
      preview.alt = "The stored image you searched with";
      $("#query-caption").textContent = "A stored image (it is left out of its own results)";
      $("#query").hidden = false;
      run();
    }
  }

  // ---------------------------------------------------------------- browse page
  function browsePage() {
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

  // ---------------------------------------------------------------- upload page
  async function waitUntilProcessed(id, onStatus) {
    const deadline = Date.now() + 5 * 60 * 1000;
    while (Date.now() < deadline) {
      const image = await api(`/images/${encodeURIComponent(id)}`);
      if (image.status !== "pending") return image;
      onStatus(image);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    return null;
  }

  function uploadPage() {
    const form = $("#upload-form");
    const list = $("#upload-list");

    async function uploadOne(file, collection, metadata) {
      const status = el("span", { class: "upload-status", text: "Uploading…" });
      const links = el("span", { class: "upload-links" });
      const row = el("li", { "data-state": "uploading" },
        el("strong", { text: file.name }), " — ", status, " ", links);
      list.prepend(row);
      const finish = (state, text) => {
        row.dataset.state = state;
        status.textContent = text;
      };
      try {
        if (file.type && !file.type.startsWith("image/")) {
          throw new ApiFailure("not_an_image", `${file.name} is ${file.type}`, 400);
        }
        const data = new FormData();
        data.append("file", file, file.name);
        data.append("collection", collection);
        if (metadata) data.append("metadata", metadata);
        const body = await api("/images", { method: "POST", body: data });
        const where = `collection=${encodeURIComponent(body.collection)}`;
        links.append(el("a", { href: `/images/${body.id}?${where}`, text: "View" }), " · ",
          el("a", { href: `/?like=${body.id}&${where}`, text: "Find similar" }));
        row.dataset.id = body.id;
        if (body.duplicate) {
          finish("ready", "Already in this collection.");
          return;
        }
        finish("processing", "Stored; computing its fingerprint…");
        const done = await waitUntilProcessed(body.id, () => {});
        if (!done) finish("processing", "Still processing; check back later.");
        else if (done.status === "ready") finish("ready", "Ready to search.");
        else finish("failed", "Could not be processed: " + (done.error || "unknown reason"));
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        finish("failed", plainWords(error));
        showMessage(`${file.name}: ${plainWords(error)}`);
      }
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearMessage();
      const files = Array.from($("#upload-file").files);
      if (!files.length) {
        showMessage("Choose at least one image to upload.");
        $("#upload-file").focus();
        return;
      }
      const collection = $("#upload-collection").value.trim() || "default";
      const metadata = $("#upload-metadata").value.trim();
      if (metadata) {
        let parsed;
        try {
          parsed = JSON.parse(metadata);
        } catch (exc) {
          showMessage(`The metadata is not valid JSON (${exc.message}). Write an object like {"label": "Shirt"}.`);
          $("#upload-metadata").focus();
          return;
        }
        if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
          showMessage('The metadata must be a JSON object, like {"label": "Shirt"}.');
          $("#upload-metadata").focus();
          return;
        }
      }
      // One at a time: each upload is a full request, and the server is shared.
      for (const file of files) await uploadOne(file, collection, metadata);
    });

    const archive = $("#archive-form");
    if (archive) jobsView(archive);
  }

  // ---------------------------------------------------------------- jobs (archive ingestion)
  const FINISHED = new Set(["done", "failed", "cancelled"]);

  function jobsView(form) {
    const list = $("#job-list");
    const status = $("#jobs-status");
    const collection = $("#archive").dataset.collection;
    const rows = new Map(); // job id -> its list item, redrawn in place while it runs

    function jobRow(job) {
      let row = rows.get(job.id);
      if (!row) {
        row = el("li", { class: "job", "data-id": job.id });
        rows.set(job.id, row);
        list.prepend(row);
      }
      const settled = job.done + job.failed + job.duplicates + job.cancelled;
      const label = `${job.source || "archive"} into “${job.collection}”`;
      const parts = [`${settled} of ${job.total}`];
      if (job.duplicates) parts.push(`${job.duplicates} already stored`);
      if (job.failed) parts.push(`${job.failed} failed`);
      if (!FINISHED.has(job.status) && job.rate) parts.push(`${job.rate.toFixed(1)} images/s`);
      if (!FINISHED.has(job.status) && job.eta_s !== null && job.eta_s !== undefined) {
        parts.push(`about ${Math.ceil(job.eta_s)} s left`);
      }
      const bar = el("progress", {
        max: Math.max(1, job.total), value: settled, "aria-label": `Progress of ${label}`,
      });
      const head = el("p", {}, el("strong", { text: label }), " ",
        el("span", { class: `badge badge-${job.status}`, text: job.status }));
      const children = [head, bar, el("p", { class: "job-counts", text: parts.join(" · ") })];
      if (job.errors && job.errors.length) {
        children.push(el("ul", { class: "job-errors" },
          ...job.errors.map((e) => el("li", { text: `${e.name}: ${e.error || "failed"}` }))));
      }
      const actions = el("p", { class: "job-actions" });
      if (!FINISHED.has(job.status)) {
        const cancel = el("button", { type: "button", class: "secondary", text: "Cancel" });
        cancel.addEventListener("click", async () => {
          cancel.disabled = true;
          try {
            jobRow(await api(`/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
          } catch (error) {
            if (!(error instanceof ApiFailure)) throw error;
            showMessage(plainWords(error));
          }
        });
        actions.append(cancel);
      } else {
        actions.append(el("a", {
          href: `/browse?collection=${encodeURIComponent(job.collection)}`,
          text: `Browse “${job.collection}”`,
        }));
      }
      children.push(actions);
      row.dataset.state = job.status;
      row.replaceChildren(...children);
      return row;
    }

    async function follow(id) {
      for (;;) {
        const job = await api(`/jobs/${encodeURIComponent(id)}`);
        jobRow(job);
        if (FINISHED.has(job.status)) return job;
        await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      }
    }

    function followQuietly(id) {
      follow(id).catch((error) => {
        if (!(error instanceof ApiFailure)) throw error;
        showMessage("Lost track of a job: " + plainWords(error));
      });
    }

    async function loadJobs() {
      try {
        const query = new URLSearchParams({ limit: "10" });
        if (collection) query.set("collection", collection);
        const body = await api("/jobs?" + query.toString());
        body.items.slice().reverse().forEach(jobRow);
        status.textContent = body.items.length ? "" : "No jobs yet.";
        status.hidden = body.items.length > 0;
        body.items.filter((job) => !FINISHED.has(job.status)).forEach((job) => followQuietly(job.id));
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        status.textContent = "Jobs could not be loaded: " + plainWords(error);
      }
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearMessage();
      const file = $("#archive-file").files[0];
      if (!file) {
        showMessage("Choose an archive (.zip, .tar or .tar.gz) to upload.");
        $("#archive-file").focus();
        return;
      }
      const data = new FormData();
      data.append("file", file, file.name);
      const metadata = $("#archive-metadata").files[0];
      if (metadata) data.append("metadata", metadata, metadata.name);
      data.append("collection", $("#archive-collection").value.trim() || "default");
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      status.hidden = false;
      status.textContent = `Uploading ${file.name}…`;
      try {
        const created = await api("/jobs", { method: "POST", body: data });
        status.hidden = true;
        followQuietly(created.id);
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        status.textContent = "";
        showMessage(`${file.name}: ${plainWords(error)}`);
      } finally {
        button.disabled = false;
      }
    });
    loadJobs();
  }

  // ---------------------------------------------------------------- image page
  function imagePage() {
    const root = $("#detail");
    const id = root.dataset.imageId;
    const collection = root.dataset.collection;
    if ($("#related")) relatedImages(id, collection);
    if ($("#find-duplicates")) duplicateFinder(id, collection);
    const list = $("#results");
    const status = $("#results-status");
    $("#like-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      clearMessage();
      status.textContent = "Searching…";
      try {
        const body = await api("/search", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({
            image_id: id, collection,
            k: Math.max(1, Math.min(1000, parseInt($("#like-k").value, 10) || 12)),
            model: $("#like-model").value,
          }),
        });
        renderResults(list, body.results, { collection });
        status.textContent = body.results.length
          ? `${body.results.length} similar images in “${collection}”, best first.`
          : "No other images in this collection yet.";
        list.dataset.state = "done";
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        showMessage(plainWords(error));
        status.textContent = "The search did not run; see the message above.";
      }
    });
  }

  // Graph neighbours and near-duplicates (issue 6's endpoints), shown on the image page.
  async function relatedImages(id, collection) {
    const list = $("#related");
    const status = $("#related-status");
    try {
      const body = await api(`/images/${encodeURIComponent(id)}/related?limit=12`);
      list.replaceChildren(...body.items.map((item) => card(item, { collection })));
      status.textContent = body.items.length
        ? "Reached over the nearest-neighbour graph, fewest hops first."
        : "No related images on the graph yet.";
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      status.textContent = "Related images are not available: " + plainWords(error);
    }
    list.dataset.state = "done";
  }

  function duplicateFinder(id, collection) {
    const button = $("#find-duplicates");
    const list = $("#duplicates");
    const status = $("#duplicates-status");
    button.addEventListener("click", async () => {
      button.disabled = true;
      status.textContent = "Looking for near-duplicates…";
      try {
        const body = await api(`/duplicates?collection=${encodeURIComponent(collection)}`);
        const group = body.clusters.find((c) => c.ids.includes(id));
        const others = group ? group.ids.filter((other) => other !== id) : [];
        const items = await Promise.all(
          others.slice(0, 24).map((other) => api(`/images/${encodeURIComponent(other)}`)));
        list.replaceChildren(...items.map((item) => card(item, { collection })));
        status.textContent = others.length
          ? `${others.length} near-duplicate${others.length === 1 ? "" : "s"} of this image.`
          : "No near-duplicates of this image in this collection.";
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        status.textContent = "Duplicates could not be found: " + plainWords(error);
      } finally {
        button.disabled = false;
        list.dataset.state = "done";
      }
    });
  }

  const pages = { search: searchPage, browse: browsePage, upload: uploadPage };
  document.addEventListener("DOMContentLoaded", () => {
    if ($("#detail")) imagePage();
    else if (pages[document.body.dataset.page]) pages[document.body.dataset.page]();
  });
})();
