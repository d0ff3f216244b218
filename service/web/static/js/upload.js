// The upload page: images one by one with their metadata, each followed until its
// fingerprint is computed; the archive form and its jobs live in jobs.js.

import { ApiFailure, POLL_MS, api, pause } from "./api.js";
import { $, el } from "./dom.js";
import { clearMessage, plainWords, showMessage } from "./messages.js";

// The image once it is no longer pending, or null after five minutes.
async function waitUntilProcessed(id) {
  const deadline = Date.now() + 5 * 60 * 1000;
  while (Date.now() < deadline) {
    const image = await api(`/images/${encodeURIComponent(id)}`);
    if (image.status !== "pending") return image;
    await pause(POLL_MS);
  }
  return null;
}

async function uploadOne(list, file, collection, metadata) {
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
    const done = await waitUntilProcessed(body.id);
    if (!done) finish("processing", "Still processing; check back later.");
    else if (done.status === "ready") finish("ready", "Ready to search.");
    else finish("failed", "Could not be processed: " + (done.error || "unknown reason"));
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    finish("failed", plainWords(error));
    showMessage(`${file.name}: ${plainWords(error)}`);
  }
}

// Why the metadata text cannot be sent, or null when it is empty or a JSON object.
function metadataProblem(metadata) {
  if (!metadata) return null;
  let parsed;
  try {
    parsed = JSON.parse(metadata);
  } catch (exc) {
    return `The metadata is not valid JSON (${exc.message}). Write an object like {"label": "Shirt"}.`;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    return 'The metadata must be a JSON object, like {"label": "Shirt"}.';
  }
  return null;
}

export function uploadForm() {
  const form = $("#upload-form");
  const list = $("#upload-list");
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
    const problem = metadataProblem(metadata);
    if (problem) {
      showMessage(problem);
      $("#upload-metadata").focus();
      return;
    }
    // One at a time: each upload is a full request, and the server is shared.
    for (const file of files) await uploadOne(list, file, collection, metadata);
  });
}
